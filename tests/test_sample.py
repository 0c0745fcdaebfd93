"""scripts/sample.py: greedy decoding equals the model's argmax continuation, sampling is reproducible by seed and
degenerates to greedy with top-k 1 or a tiny top-p, chat mode renders a user turn, and errors are clear."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.tokenizer import ASSISTANT_ID, END_ID, EOT_ID, USER_ID
from training.load import load_run

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gptrain_script_sample", ROOT / "scripts" / "sample.py")
sample = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


def run_sample(*argv) -> list[str]:
    return sample.main([str(a) for a in argv] + ["--device", "cpu"])


def test_greedy_is_the_argmax_continuation(tiny_run, capsys):
    texts = run_sample(tiny_run, "--prompt", "def main(", "--temperature", 0, "--max-new-tokens", 12)
    assert capsys.readouterr().out == "def main(" + texts[0] + "\n"
    run = load_run(tiny_run, "cpu", "fp32")
    ids = run.tok.encode("def main(")
    with torch.no_grad():
        for _ in range(12):  # full forward each step, no KV cache: an independent reference
            nxt = run.model(torch.tensor([ids]))[0, -1].argmax().item()
            if nxt == EOT_ID:
                break
            ids.append(nxt)
    assert texts[0] == run.tok.decode(ids[len(run.tok.encode("def main(")):])
    assert run_sample(tiny_run, "--prompt", "def main(", "--temperature", 0, "--max-new-tokens", 12) == texts


def test_sampling_is_reproducible_and_filters_reduce_to_greedy(tiny_run):
    args = [tiny_run, "--prompt", "import ", "--max-new-tokens", 16, "--num-samples", 3]
    first = run_sample(*args, "--seed", 1, "--temperature", 1.0)
    assert run_sample(*args, "--seed", 1, "--temperature", 1.0) == first
    assert run_sample(*args, "--seed", 2, "--temperature", 1.0) != first
    assert len(set(first)) > 1  # three different samples
    greedy = run_sample(*args, "--temperature", 0)
    assert run_sample(*args, "--temperature", 1.5, "--top-k", 1) == greedy
    assert run_sample(*args, "--temperature", 1.5, "--top-p", 1e-9) == greedy


def test_chat_mode_answers_a_user_turn(tiny_run):
    run = load_run(tiny_run, "cpu", "fp32")
    (reply,) = run_sample(tiny_run, "--chat", "--prompt", "What is 2+3?", "--temperature", 0, "--max-new-tokens", 10)
    # The chat format written out (data/chat.py's docstring): <|user|>content<|end|><|assistant|>; then greedy
    # decoding by a full forward per token (no KV cache, not model.generate), stopping at <|end|>.
    ids = [USER_ID, *run.tok.encode("What is 2+3?"), END_ID, ASSISTANT_ID]
    reply_ids = []
    with torch.no_grad():
        for _ in range(10):
            nxt = run.model(torch.tensor([ids + reply_ids]))[0, -1].argmax().item()
            if nxt == END_ID:
                break
            reply_ids.append(nxt)
    assert reply == run.tok.decode(reply_ids)


def test_bad_input(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError):
        run_sample(tmp_path / "missing")
    with pytest.raises(ValueError, match="--top-p"):
        run_sample(tiny_run, "--top-p", 1.5)
    (tmp_path / "empty").mkdir()
    cli = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), str(tmp_path / "empty")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and cli.stderr.startswith("error: ") and "holds no checkpoint" in cli.stderr
