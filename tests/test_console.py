"""What a training run prints at start-up and at validation: a short summary of the config instead of all of it
(which stays in config.toml), and validation counts printed as the integers they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from data.preference import PreferenceBatcher, load_preferences
from train import main
from training.config import parse_args, to_toml
from training.evaluation import lm_figures
from training.load import load_run
from training.stages.dpo import DPO, preference_figures


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


def short_run_args(corpus_dir: Path, out: Path) -> list[str]:
    return ["--data", str(corpus_dir), "--out", str(out), "--model.vocab_size=384", "--model.n_layer=2",
            "--model.n_embd=64", "--model.n_head=4", "--model.block_size=64", "--train.batch_size=16",
            "--train.optimizer=adamw", "--train.warmup_steps=10", "--train.max_steps=2", "--train.device=cpu",
            "--eval.interval=1", "--eval.max_tokens=4096", "--eval.sample_tokens=8", "--log.health_interval=0",
            "--log.hist_interval=0", "--log.tensorboard=false", "--data.num_proc=1"]


def test_start_up_summary_and_integer_counts(tmp_path, corpus_dir, capsys):
    out = tmp_path / "run"
    argv = short_run_args(corpus_dir, out)
    summary = main(argv)
    printed = capsys.readouterr().out

    # The summary, line for line (every value below is one given above or a pretrain default).
    start = printed.index("gptrain | ")
    shown = printed[start:].splitlines()[:7]
    assert shown == [
        f"gptrain | stage pretrain | data {corpus_dir} | out {out} | device cpu | precision fp32",
        "shape: modern, 2 layers x 64 wide, 4 heads, context 64, vocab 384, QK-norm (preset tiny)",
        "optimizer: adamw lr 0.003 (betas 0.9, 0.95), weight decay 0.1; gradient norm clipped at 1",
        "schedule: wsd: 10 warmup steps, flat, then the last 30% of the steps decay linearly to 0.1 x the peak lr",
        "budget: 2 steps; validation every 1 steps, a checkpoint every 500 steps (newest 2 kept)",
        # In the order of the config's sections; time_budget_min is off because max_steps was given.
        "changed from the pretrain defaults: model.vocab_size=384, model.block_size=64, model.n_layer=2, "
        "model.n_head=4, model.n_embd=64, data.num_proc=1, train.max_steps=2, train.time_budget_min=0.0, "
        "train.batch_size=16, train.warmup_steps=10, train.optimizer=adamw, train.device=cpu, eval.interval=1, "
        "eval.max_tokens=4096, eval.sample_tokens=8, log.health_interval=0, log.hist_interval=0, "
        "log.tensorboard=false",
        f"every setting: {out / 'config.toml'}",
    ]
    assert "[train]" not in printed and 'stage = "pretrain"' not in printed  # the TOML is no longer printed
    assert (out / "config.toml").read_text() == to_toml(parse_args(argv))  # and is still written whole

    # Validation lines: floats with 4 decimals, the counts as integers, equal to the run's figures.
    val_lines = [line for line in printed.splitlines() if line.startswith("val ")]
    assert len(val_lines) == 3  # step 0, step 1, the final one (step 2, the whole split)
    pattern = re.compile(r"val loss \d+\.\d{4} \| perplexity \d+\.\d{4} \| tokens (\d+) \| bpb \d+\.\d{4} \| "
                         r"bytes (\d+)")
    matches = [pattern.fullmatch(line) for line in val_lines]
    assert all(matches), val_lines
    counts = [tuple(int(n) for n in m.groups()) for m in matches]
    assert counts[0] == counts[1] == (4096, summary["first_val"]["bytes"])  # 64 blocks of 64 targets
    assert counts[2] == (summary["val"]["tokens"], summary["val"]["bytes"])
    assert all(type(summary["val"][k]) is int for k in ("tokens", "bytes"))


def test_lm_figures_counts_are_ints():
    from model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=16, block_size=4, n_layer=1, n_head=1, n_embd=8))
    x = torch.tensor([[1, 2, 3, 4]])
    y = torch.tensor([[2, 3, -100, 5]])  # three targets
    f = lm_figures(model, [(x, y)], torch.full((16,), 2), torch.autocast("cpu", enabled=False))
    assert (f["tokens"], f["bytes"]) == (3, 6) and type(f["tokens"]) is int and type(f["bytes"]) is int


def test_dpo_pair_count_is_an_int(tiny_run):
    run = load_run(tiny_run, "cpu", "fp32")
    pairs, _ = load_preferences("synthetic", "validation", run.tok, 64, seed=0, n_synthetic=6)
    batcher = PreferenceBatcher(pairs, 4, shuffle=False)
    batches = [batcher.next_batch() for _ in range(2)]  # 4 + 4 rows of the 6 pairs (the second wraps around)
    f = preference_figures(run.model, DPO(0.1, "sigmoid", 0.0, reference=run.model), batches,
                           torch.autocast("cpu", enabled=False))
    assert f["pairs"] == 8 and type(f["pairs"]) is int
