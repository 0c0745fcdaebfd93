"""scripts/evaluate.py: every figure in the JSON, bits per byte by hand, accuracy that SFT lifts, agreement with
the trainer's own validation, TensorBoard output, torchrun, and clear errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.load import load_run

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gptrain_script_evaluate", ROOT / "scripts" / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)

VAL_TEXT = "\n".join(f"def area_{i}(width, height):\n    return width * height + {i}  # rectangle number {i}\n"
                     for i in range(12))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="module")
def sft_run(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    """tiny_run fine-tuned on the built-in synthetic tasks for 80 steps (about 10 s); (run folder, summary)."""
    from train import main

    out = tmp_path_factory.mktemp("sft") / "run"
    summary = main(["--stage", "sft", "--init-from", str(tiny_run), "--out", str(out), "--train.max_steps=80",
                    "--train.lr=3e-3", "--train.warmup_steps=5", "--data.synthetic_train=1000", "--eval.interval=0",
                    "--log.health_interval=0", "--log.hist_interval=0", "--eval.sample_tokens=8"])
    return out, summary


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_text")
    (root / "train").mkdir()
    (root / "val").mkdir()
    (root / "train" / "a.txt").write_text("x = 1\n" * 50)
    (root / "val" / "b.txt").write_text(VAL_TEXT)
    return root


def run_eval(*argv) -> dict:
    return evaluate.main([str(a) for a in argv] + ["--device", "cpu"])


def test_json_has_every_field(tiny_run, sft_run, small_text, tmp_path):
    run_dir, _ = sft_run
    out = tmp_path / "eval.json"
    result = run_eval(run_dir, "--data", small_text, "--chat-data", "synthetic", "--preference-data", "synthetic",
                      "--max-examples", 24, "--prompt", "What is 2+3?", "--json", out)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("val_loss", "perplexity", "bits_per_byte", "accuracy", "preference_accuracy", "reward_margin",
                "checkpoint", "data", "tokens", "bytes", "logp_accuracy", "logp_margin", "examples", "pairs",
                "reference", "samples", "accuracy_by_task"):
        assert key in saved, key
    assert set(saved["data"]) == {"text", "chat", "preference"}
    assert saved["checkpoint"] == str(Path(load_run(run_dir, "cpu").ckpt["path"]).resolve())
    assert saved["examples"] == saved["pairs"] == 24
    assert saved["perplexity"] == pytest.approx(math.exp(saved["val_loss"]))
    assert saved["reward_margin"] == pytest.approx(saved["chosen_reward"] - saved["rejected_reward"], abs=1e-6)
    assert Path(saved["reference"]).resolve() == Path(load_run(tiny_run, "cpu").ckpt["path"]).resolve()  # init_from
    assert 0 <= saved["preference_accuracy"] <= 1 and 0 <= saved["logp_accuracy"] <= 1
    assert saved["samples"][0]["prompt"] == "What is 2+3?" and "<|" not in saved["samples"][0]["completion"]


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are given: logits (1, T, V), whatever the inputs."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, x):
        return self.logits


def test_bits_per_byte_leaves_out_special_targets_by_hand():
    """Vocabulary (<|endoftext|> 0 bytes, 'a' 1 byte, 'bc' 2 bytes); targets a, <|endoftext|>, bc, ignored, with
    probabilities 1/2, 1/4, 1/8: nats ln 2, ln 4, ln 8. loss averages all three targets: 6 ln 2 / 3 = 2 ln 2. Bits per
    byte leaves the end-of-text target out of both sums: (ln 2 + ln 8) / (ln 2 x 3 bytes) = 4/3 (counting its nats
    would give 6 ln 2 / (3 ln 2) = 2)."""
    from model.losses import IGNORE
    from training.evaluation import lm_figures

    probs = torch.tensor([[[1 / 4, 1 / 2, 1 / 4], [1 / 4, 1 / 2, 1 / 4], [1 / 2, 3 / 8, 1 / 8], [1 / 3, 1 / 3, 1 / 3]]])
    targets = torch.tensor([[1, 0, 2, IGNORE]])
    byte_lengths = torch.tensor([0, 1, 2])
    f = lm_figures(FixedLogits(probs.log()), [(torch.zeros_like(targets), targets)], byte_lengths, nullcontext())
    assert f["tokens"] == 3 and f["bytes"] == 3
    assert f["loss"] == pytest.approx(2 * math.log(2), rel=1e-6)
    assert f["perplexity"] == pytest.approx(4.0, rel=1e-6)
    assert f["bpb"] == pytest.approx(4 / 3, rel=1e-6)


def test_bits_per_byte_by_hand(tiny_run, tmp_path):
    # The same document twice: the token stream is document, end-of-text, document, end-of-text whatever the order,
    # so an end-of-text token sits among the scored targets
    source = tmp_path / "two_docs"
    for split in ("train", "val"):
        (source / split).mkdir(parents=True)
        for name in ("a.txt", "b.txt"):
            (source / split / name).write_text(VAL_TEXT)
    result = run_eval(tiny_run, "--data", source, "--batch-size", 3)
    run = load_run(tiny_run, "cpu", "fp32")
    T = run.gcfg.block_size
    ids = (run.tok.encode(VAL_TEXT) + [0]) * 2  # each document and its end-of-text token
    n_blocks = (len(ids) - 1) // T
    assert n_blocks >= 3
    x = torch.tensor([ids[i * T: i * T + T] for i in range(n_blocks)])
    y = torch.tensor([ids[i * T + 1: i * T + T + 1] for i in range(n_blocks)])
    assert (y == 0).sum() == 1
    with torch.no_grad():
        nats = F.cross_entropy(run.model(x).flatten(0, 1), y.flatten(), reduction="none")  # (n_blocks * T,)
    text = y.flatten() != 0  # the end-of-text target is left out of bits per byte, not of the loss
    tokens = y.numel()
    nbytes = sum(len(run.tok.decode([t]).encode("utf-8")) for t in y.flatten().tolist() if t != 0)  # ASCII text
    assert (result["tokens"], result["bytes"]) == (tokens, nbytes)
    assert result["val_loss"] == pytest.approx(nats.sum().item() / tokens, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats[text].sum().item() / (math.log(2) * nbytes), rel=1e-5)
    assert nats[~text].item() > 1e-3 * nats.sum().item()  # large enough that counting it would fail the line above


def test_default_data_is_the_runs_validation_split(tiny_run):
    """Without --data a pre-training run is scored on its own validation split; over the tokens the trainer scored
    last, the figures equal its last validation."""
    last_val = [r for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]
    n = int(last_val[-1]["val/tokens"])
    result = run_eval(tiny_run, "--max-tokens", n)
    assert list(result["data"]) == ["text"]
    assert result["data"]["text"].startswith(f"{load_run(tiny_run, 'cpu').cfg.data.source} (val split")
    assert result["tokens"] == n
    assert result["val_loss"] == pytest.approx(last_val[-1]["val/loss"], rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(last_val[-1]["val/bpb"], rel=1e-5)


def test_sft_lifts_accuracy(tiny_run, sft_run):
    run_dir, summary = sft_run
    before = run_eval(tiny_run, "--chat-data", "synthetic", "--max-examples", 100)
    after = run_eval(run_dir)  # an SFT run's default: its own chat validation data
    assert after["data"] == {"chat": before["data"]["chat"]} and after["examples"] == 200
    after = run_eval(run_dir, "--max-examples", 100)  # the trainer's 100 accuracy examples
    assert after["accuracy"] == summary["val"]["accuracy"]  # the same criterion as the trainer's validation
    assert after["accuracy"] > before["accuracy"], (before, after)
    assert set(after["accuracy_by_task"]) == {"add", "count", "reverse", "sort"}


def test_tensorboard_writes_eval_scalars(sft_run):
    run_dir, _ = sft_run
    n_events = len(list(run_dir.glob("events.out.tfevents.*")))
    run_eval(run_dir, "--chat-data", "synthetic", "--max-examples", 8, "--tensorboard", "--prompt", "Sort: 3 1 2")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 80 and "eval/accuracy" in last and "eval/accuracy/sort" in last
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == n_events + 1


def test_bad_input_is_a_clear_error(tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        run_eval(tmp_path / "empty", "--json", out)
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        run_eval(tmp_path / "missing", "--json", out)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "2+2?", "answer": "4"}\n' * 5)
    with pytest.raises(ValueError, match=r"fields \['answer', 'question'\]"):
        run_eval(tiny_run, "--data", odd, "--json", out)
    with pytest.raises(ValueError, match="needs 'messages', or 'prompt' and 'completion'"):
        run_eval(tiny_run, "--chat-data", odd, "--json", out)
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"prompt": "2+2?", "completion": "4"}\n' * 5)
    with pytest.raises(ValueError, match=r"missing \['chosen', 'rejected'\]"):
        run_eval(tiny_run, "--preference-data", chats, "--json", out)
    assert not out.exists()


def test_torchrun_figures_equal_single_process(tiny_run, small_text, tmp_path):
    """Two processes split the blocks, examples and pairs; the reduced figures are the single-process ones."""
    args = [str(tiny_run), "--data", str(small_text), "--preference-data", "synthetic", "--reference", str(tiny_run),
            "--max-examples", 6, "--device", "cpu"]
    args = [str(a) for a in args]
    single = evaluate.main(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "evaluate.py"), *args, "--json", str(tmp_path / "dist.json")]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=120)
    dist = json.loads((tmp_path / "dist.json").read_text())
    assert dist["world_size"] == 2
    for key in ("tokens", "bytes", "pairs"):
        assert dist[key] == single[key]
    for key in ("val_loss", "bits_per_byte", "logp_accuracy", "logp_margin", "preference_accuracy"):
        assert dist[key] == pytest.approx(single[key], rel=1e-5, abs=1e-5), key  # sums in another order


def test_chat_prompts_without_room_to_reply_are_not_scored(tiny_run, tmp_path, capsys):
    """A prompt of block_size tokens or more would be cut by generate(): like the trainer's validation, evaluate.py
    leaves it out and says so, instead of scoring a reply to a truncated prompt."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("What is 2+3?", "5"), ("word " * 200, "long"), ("Reverse: a b", "b a"))]
    data = tmp_path / "chat"
    data.mkdir()
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(tiny_run, "--chat-data", data)
    assert result["examples"] == 2
    assert "chat: 1 of 3 prompts not scored: 64 tokens or longer" in capsys.readouterr().err
