"""Checkpoints: the newest complete file wins over a stale pointer, keep-k never deletes a fresh save, only plain
values are saved and only the restricted unpickler reads them (a file that would run code is refused by every entry
point), resume on a machine with other GPUs, and kill -9 at the deterministic moments of a save loses nothing."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_ARGS
from train import main
from training import checkpoint
from training.loop import rng_state, set_rng_state

ROOT = Path(__file__).resolve().parent.parent
# Subprocesses import this checkout's packages (scripts/ alone would find an installed copy first).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


def run_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--out", str(out), *TINY_ARGS, "--log.interval=1", "--eval.interval=0",
            "--train.batch_size=8", *extra]


def fake_state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "config": {}, "step": step}


def pointer(run: Path) -> str:
    return (run / checkpoint.CKPT_DIR / checkpoint.LATEST).read_text()


def step_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / checkpoint.CKPT_DIR).glob("step_*.pt"))


def metrics_steps(run: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every metrics.jsonl record with a loss, in the order written (runs append)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


# ----------------------------------------------------------------------------------------------- item 1: newest wins
def test_latest_is_the_highest_step_not_the_pointer_or_the_name_order(tmp_path):
    checkpoint.save(tmp_path, 5, fake_state(5), keep=5)
    checkpoint.save(tmp_path, 7, fake_state(7), keep=5)
    # Killed after step 7 was renamed into place, before the pointer was rewritten: the pointer names step 5.
    (tmp_path / checkpoint.CKPT_DIR / checkpoint.LATEST).write_text("step_00000005.pt")
    assert checkpoint.latest(tmp_path).name == "step_00000007.pt"
    assert checkpoint.load(tmp_path)["step"] == 7
    # Past 10**8 steps the name grows a digit: "step_100000000.pt" sorts before "step_99999999.pt" by name.
    checkpoint.save(tmp_path, 99_999_999, fake_state(99_999_999), keep=5)
    checkpoint.save(tmp_path, 100_000_000, fake_state(100_000_000), keep=5)
    assert checkpoint.load(tmp_path)["step"] == 100_000_000
    checkpoint.save(tmp_path, 100_000_001, fake_state(100_000_001), keep=2)  # keep-k counts steps, not names
    assert step_files(tmp_path) == ["step_100000000.pt", "step_100000001.pt"]
    # Stray files never count: a temporary file, other names.
    (tmp_path / checkpoint.CKPT_DIR / "step_200000000.pt.tmp").write_bytes(b"partial")
    (tmp_path / checkpoint.CKPT_DIR / "step_x.pt").write_bytes(b"junk")
    assert checkpoint.latest(tmp_path).name == "step_100000001.pt"


def test_keep_never_deletes_the_checkpoint_just_written(tmp_path):
    checkpoint.save(tmp_path, 10, fake_state(10), keep=1)  # a stray newer file, e.g. of a killed process
    path = checkpoint.save(tmp_path, 6, fake_state(6), keep=1)
    assert path.is_file() and torch.equal(checkpoint.load(path)["model"]["w"], torch.full((2,), 6.0))
    assert (tmp_path / checkpoint.CKPT_DIR / pointer(tmp_path)).is_file() and pointer(tmp_path) == path.name
    # The newest k by step stay too; the newest complete checkpoint is still the one loaded.
    assert step_files(tmp_path) == ["step_00000006.pt", "step_00000010.pt"]
    assert checkpoint.load(tmp_path)["step"] == 10
    for step in (11, 12, 13):
        checkpoint.save(tmp_path, step, fake_state(step), keep=2)
    assert step_files(tmp_path) == ["step_00000012.pt", "step_00000013.pt"]


def test_resume_after_a_kill_between_rename_and_pointer_continues_from_the_newest(tmp_path, corpus_dir, capsys):
    out = tmp_path / "run"
    main(run_args(corpus_dir, out, "--train.max_steps=8", "--ckpt.interval=2", "--ckpt.keep=4"))
    straight = metrics_steps(out)
    assert [s for s, _ in straight] == list(range(1, 9))
    # Stage the crash: the save at step 6 was renamed into place and the process died before the pointer was
    # rewritten; step 4 had already gone (keep) and step 8 was never reached.
    ckdir = out / checkpoint.CKPT_DIR
    (ckdir / "step_00000004.pt").unlink()
    (ckdir / "step_00000008.pt").unlink()
    (ckdir / checkpoint.LATEST).write_text("step_00000002.pt")
    capsys.readouterr()
    summary = main(["--out", str(out), "--resume", "--ckpt.keep=1"])
    assert f"resumed from {ckdir / 'step_00000006.pt'} at step 6" in capsys.readouterr().out
    # Only steps 7 and 8 ran again, with the uninterrupted run's losses, bit for bit.
    assert metrics_steps(out)[len(straight):] == straight[6:]
    assert summary["step"] == 8 and step_files(out) == ["step_00000008.pt"] and pointer(out) == "step_00000008.pt"


# ----------------------------------------------------------------------------------------------- item 3: RNG state
class FakeCuda:
    """A machine with `n` GPUs as far as the RNG functions go: set_rng_state(state, device) raises IndexError for a
    device it does not have, as torch.cuda.default_generators[index] does."""

    def __init__(self, monkeypatch, n: int) -> None:
        self.n, self.set_calls = n, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((16,), 7, dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((16,), i, dtype=torch.uint8)
                                                                      for i in range(n)])
        # set_rng_state_all calls the module-level set_rng_state of torch.cuda.random
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", self.set_rng_state)

    def set_rng_state(self, new_state, device="cuda") -> None:
        index = 0 if device == "cuda" else int(device)  # "cuda": the current device, which is 0 here
        if index >= self.n:
            raise IndexError(f"no CUDA device {index} on a machine with {self.n}")
        self.set_calls.append((index, new_state.clone()))


def test_set_rng_state_on_a_machine_with_fewer_gpus_or_none(monkeypatch):
    cpu = torch.get_rng_state()
    state = torch.full((16,), 7, dtype=torch.uint8)
    # Rank 0 of an 8-GPU machine, as an older gptrain saved it: every device's state (and Python's and NumPy's,
    # which a converted checkpoint no longer has and which are ignored).
    eight_states = {"torch": cpu, "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(8)],
                    "python": random.getstate(), "numpy": np.random.get_state()}
    torch.manual_seed(123)  # move the CPU generator; restoring must bring it back
    one = FakeCuda(monkeypatch, 1)
    set_rng_state(eight_states)  # resumed on a machine with one GPU: only this device's entry is set
    assert torch.equal(torch.get_rng_state(), cpu)
    assert [(i, s.tolist()) for i, s in one.set_calls] == [(0, [0] * 16)]
    one.set_calls.clear()
    set_rng_state({"torch": cpu, "cuda": state})  # this format: one device's state, set on the current device
    assert [(i, s.tolist()) for i, s in one.set_calls] == [(0, [7] * 16)]
    # No GPU at all: the CUDA state is skipped, the CPU state restored.
    none = FakeCuda(monkeypatch, 0)
    torch.manual_seed(5)
    set_rng_state({"torch": cpu, "cuda": state})
    assert none.set_calls == [] and torch.equal(torch.get_rng_state(), cpu)


def test_rng_state_holds_the_cpu_and_this_devices_generator_only(monkeypatch):
    FakeCuda(monkeypatch, 8)
    saved = rng_state()
    assert set(saved) == {"torch", "cuda"} and torch.equal(saved["torch"], torch.get_rng_state())  # no Python/NumPy
    assert torch.equal(saved["cuda"], torch.full((16,), 7, dtype=torch.uint8))  # one device's state, not eight
    FakeCuda(monkeypatch, 0)
    assert set(rng_state()) == {"torch"}
