"""Checkpoints: the newest complete file wins over a stale pointer, keep-k never deletes a fresh save, only plain
values are saved and only the restricted unpickler reads them (a file that would run code is refused by every entry
point), resume on a machine with other GPUs, and kill -9 at the deterministic moments of a save loses nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_ARGS
from tests.script_runner import run_commands
from train import main
from training import checkpoint
from training.run_state import rng_state, set_rng_state

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


# ----------------------------------------------------------------------------------------------- newest wins
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


# ----------------------------------------------------------------------------------------------- RNG state
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


# ----------------------------------------------------------------------------------------------- safe loading
def leaves(obj, path="state"):
    """(path, value) of every non-container value in a nested dict/list/tuple."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{path}: key {k!r} of type {type(k).__name__}"
            yield from leaves(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_a_checkpoint_holds_only_tensors_containers_strings_and_numbers(tiny_run):
    path = checkpoint.latest(tiny_run)
    state = torch.load(path, map_location="cpu", weights_only=True)
    odd = [(p, type(v).__name__) for p, v in leaves(state)
           if not isinstance(v, (torch.Tensor, str, int, float, bool, type(None)))]
    assert odd == []
    assert set(state["rng"]) == {"torch"}  # a CPU run: the CPU generator only
    assert checkpoint.unsafe_globals(path) == []


class RunsCode:
    """Pickles as a call of os.system (a REDUCE of posix.system): loading it with the full unpickler runs it."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"gptrain_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_run(tiny_run: Path, dest: Path) -> Path:
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("events.out.tfevents.*"))
    return dest


def test_a_checkpoint_that_would_run_code_is_refused_by_every_entry_point(tiny_run, tmp_path):
    evil_run = copy_run(tiny_run, tmp_path / "evil")
    path = checkpoint.latest(evil_run)
    marker = tmp_path / "code_ran"
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["payload"] = RunsCode(f"touch {shlex.quote(str(marker))}")
    torch.save(state, path)  # otherwise valid, the newest checkpoint, named by the pointer

    with pytest.raises(ValueError, match=re.escape(str(path)) + r": refused, its pickle names posix\.system"):
        checkpoint.load(evil_run)
    scripts = ROOT / "scripts"
    commands = {
        "sample.py": [scripts / "sample.py", evil_run, "--device", "cpu", "--max-new-tokens", 2],
        "evaluate.py": [scripts / "evaluate.py", evil_run, "--device", "cpu"],
        "evaluate.py --reference": [scripts / "evaluate.py", tiny_run, "--preference-data", "synthetic",
                                    "--max-examples", 2, "--reference", evil_run, "--device", "cpu"],
        "export_hf.py": [scripts / "export_hf.py", evil_run, tmp_path / "export"],
        "train.py --init-from": [ROOT / "train.py", "--stage", "sft", "--init-from", evil_run, "--out",
                                 tmp_path / "sft", "--data.synthetic_train=50"],
        "train.py --resume": [ROOT / "train.py", "--out", evil_run, "--resume"],
    }
    # one interpreter runs the six command lines in turn (tests/script_runner.py): each as `python SCRIPT ...` would
    for name, cli in zip(commands, run_commands(list(commands.values()), cwd=ROOT, env=ENV), strict=True):
        assert cli["exit"] == 1, (name, cli["exit"], cli["stderr"][-2000:])
        assert f"error: {path}: refused, its pickle names posix.system" in cli["stderr"], (name, cli["stderr"][-2000:])
        assert not marker.exists(), f"{name} ran the checkpoint's code"
    assert not (tmp_path / "export").exists() and not (tmp_path / "sft").exists()
    # The conversion script never loads it either, and leaves it as it was.
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": refused, its pickle names posix\.system"):
        load_script("convert_checkpoint").convert(path)
    assert not marker.exists() and checkpoint.unsafe_globals(path) == ["posix.system"]


def test_an_older_checkpoint_is_refused_with_how_to_convert_it(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "old")
    path = checkpoint.latest(run)
    current = torch.load(path, map_location="cpu", weights_only=True)
    # What gptrain wrote before checkpoints held plain values only: Python's and NumPy's global RNG states too.
    old = {**current, "rng": {"python": random.getstate(), "numpy": np.random.get_state(), **current["rng"]}}
    torch.save(old, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": written by an older gptrain .*NumPy") as e:
        checkpoint.load(run)
    assert str(e.value).endswith(f"convert it once with: python scripts/convert_checkpoint.py {path}")

    cli = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", str(path)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert f"{path}: converted" in cli.stdout
    assert not list(path.parent.glob("*.tmp"))
    converted = checkpoint.load(run)
    assert set(converted["rng"]) == {"torch"} and torch.equal(converted["rng"]["torch"], current["rng"]["torch"])
    assert converted.keys() - {"path"} == current.keys()
    assert all(torch.equal(converted["model"][k], v) for k, v in current["model"].items())
    assert {k: v for k, v in converted.items() if k not in ("model", "optimizer", "rng", "path")} == \
        {k: v for k, v in current.items() if k not in ("model", "optimizer", "rng")}
    # Once converted it is left alone.
    before = path.read_bytes()
    assert load_script("convert_checkpoint").convert(path) is False and path.read_bytes() == before


# ----------------------------------------------------------------------------------------------- kill -9
def test_kill_9_at_any_moment_loses_no_saved_checkpoint(tmp_path, corpus_dir):
    """Four launches of train.py, each but the last killed by SIGKILL at a deterministic moment (GPTRAIN_FAULT):
    the newest loadable checkpoint is never older than the last one the logs reported saved."""
    out = tmp_path / "run"
    args = run_args(corpus_dir, out, "--train.max_steps=8", "--ckpt.interval=2", "--ckpt.keep=2")
    reported: list[int] = []  # steps of every "saved ..." line so far, over all launches
    losses: dict[int, float] = {}

    def launch(argv: list[str], fault: str | None, resumed_at: int | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in ENV.items() if k != "GPTRAIN_FAULT"} | ({"GPTRAIN_FAULT": fault} if fault else {})
        logged = len(metrics_steps(out)) if (out / "metrics.jsonl").exists() else 0
        proc = subprocess.run([sys.executable, "-u", "train.py", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        saved = re.findall(r"^saved .*step_(\d+)\.pt \(", proc.stdout, flags=re.M)
        reported.extend(int(s) for s in saved)
        if resumed_at is not None:
            assert f"resumed from {out / checkpoint.CKPT_DIR / f'step_{resumed_at:08d}.pt'} at step {resumed_at}" \
                in proc.stdout, proc.stdout[-3000:]
        assert checkpoint.load(out)["step"] >= max(reported)
        for step, loss in metrics_steps(out)[logged:]:  # a step run twice (before and after a kill) is identical
            assert losses.setdefault(step, loss) == loss, step
        return proc

    first = launch(args, "kill_after_tmp@4", None)  # the save at 4: temporary file complete, not renamed
    assert first.returncode == -9, first.stderr[-3000:]
    assert reported == [2] and checkpoint.load(out)["step"] == 2
    assert (out / checkpoint.CKPT_DIR / "step_00000004.pt.tmp").is_file()

    second = launch(["--out", str(out), "--resume"], "kill_after_rename@6", 2)  # 6 in place, pointer still at 4
    assert second.returncode == -9, second.stderr[-3000:]
    assert reported == [2, 4] and pointer(out) == "step_00000004.pt" and checkpoint.load(out)["step"] == 6

    third = launch(["--out", str(out), "--resume"], "kill@7", 6)  # mid-step 7: after the backward, before the update
    assert third.returncode == -9, third.stderr[-3000:]
    assert reported == [2, 4] and checkpoint.load(out)["step"] == 6

    last = launch(["--out", str(out), "--resume"], None, 6)
    assert last.returncode == 0, last.stderr[-3000:]
    assert reported == [2, 4, 8] and checkpoint.load(out)["step"] == 8 and sorted(losses) == list(range(1, 9))
    assert step_files(out) == ["step_00000006.pt", "step_00000008.pt"] and pointer(out) == "step_00000008.pt"
    assert not list((out / checkpoint.CKPT_DIR).glob("*.tmp"))


class _NumpyCall:
    """Pickles as a call of a NumPy function that writes a file: a NumPy name that is not random-number state."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return np.savetxt, (str(self.marker), np.zeros(1))


def test_the_converter_refuses_numpy_names_beyond_the_old_rng_state(tiny_run, tmp_path):
    """Only the old RNG state's NumPy names are let through (and only by the restricted unpickler): a pickle that
    names another NumPy function is refused by the converter too, and the function never runs."""
    run = copy_run(tiny_run, tmp_path / "numpy_call")
    path = checkpoint.latest(run)
    state = torch.load(path, map_location="cpu", weights_only=True)
    marker = tmp_path / "ran.txt"
    state["rng"]["numpy"] = np.random.get_state()
    state["payload"] = _NumpyCall(marker)
    torch.save(state, path)
    refused = checkpoint.unsafe_globals(path)
    assert any("savetxt" in name for name in refused) and not checkpoint.is_old_format(refused)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": refused, its pickle names .*savetxt"):
        checkpoint.load(run)
    with pytest.raises(ValueError, match=r"refused, its pickle names .*savetxt"):
        load_script("convert_checkpoint").convert(path)
    assert not marker.exists()
