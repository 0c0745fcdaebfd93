"""Checkpoints: one file per save, written atomically, a `latest` pointer, keep the newest k.

Layout of a run folder's checkpoints:
    RUN/checkpoints/step_00000100.pt   a complete checkpoint (torch.save of a dict, full un-sharded state)
    RUN/checkpoints/latest             the file name of the checkpoint written last (for people and tools)
A save writes `step_....pt.tmp`, flushes and fsyncs it, renames it into place, and only then rewrites `latest`
(the same way). A process killed mid-write leaves at most a stray .tmp file, which is ignored and cleaned up.
So every `step_*.pt` is complete, and the newest checkpoint is the one with the highest step (parsed as an integer):
`latest` is never trusted over it, since a process killed between the rename and the pointer leaves it stale.

A checkpoint holds only tensors, plain containers, strings and numbers, and is read with torch's restricted unpickler
(`weights_only=True`): a file from elsewhere cannot run code when it is loaded. Files of an older gptrain (they held
NumPy random-number state) are refused with the command that converts one you trust (scripts/convert_checkpoint.py).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch

CKPT_DIR = "checkpoints"
LATEST = "latest"
STEP_FILE = re.compile(r"step_(\d+)\.pt")  # step_00000100.pt; more digits once a step passes 10**8
CONVERT_SCRIPT = "scripts/convert_checkpoint.py"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in a checkpoints folder, by step (.tmp files never count)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_FILE.fullmatch(p.name)) and p.is_file()]
    return sorted(found)


def save(run_dir: str | Path, step: int, state: dict, keep: int = 2,
         hook: Callable[[str], None] | None = None) -> Path:
    """Write state as the checkpoint of `step`, point `latest` at it, keep the newest `keep` by step.

    The file just written is always kept, even when a newer step exists (a stray file of a killed process).
    `hook(event)`, if given, is called at the moments a crash matters: "tmp_written" (the temporary file is complete
    and fsynced, not yet renamed) and "renamed" (the checkpoint is in place, `latest` not yet rewritten); the
    trainer's fault injection kills the process there in tests.
    """
    assert keep >= 1, keep  # config.validate refuses ckpt.keep < 1
    ckpt_dir = Path(run_dir) / CKPT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if hook is not None:
        hook("tmp_written")
    os.replace(tmp, path)
    _fsync_dir(ckpt_dir)
    if hook is not None:
        hook("renamed")
    atomic_write_bytes(ckpt_dir / LATEST, path.name.encode())
    done = complete_checkpoints(ckpt_dir)
    kept = {p for _, p in done[-keep:]} | {path}
    for _, old in done:
        if old not in kept:
            old.unlink()
    for stray in ckpt_dir.glob("*.tmp"):
        stray.unlink()
    return path


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (highest step), or None. A file path is returned as is."""
    p = Path(run_dir)
    if p.is_file():
        return p
    done = complete_checkpoints(p / CKPT_DIR)
    return done[-1][1] if done else None


def load(run_dir: str | Path, map_location="cpu") -> dict:
    """Load the newest complete checkpoint of `run_dir` (or a checkpoint file). Clear error if there is none."""
    path = latest(run_dir)
    if path is None:
        if not Path(run_dir).exists():
            raise FileNotFoundError(f"{run_dir}: no such run folder or checkpoint file")
        raise ValueError(f"{run_dir} holds no checkpoint (expected {Path(run_dir) / CKPT_DIR / 'step_*.pt'})")
    state = read(path, map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path}: not a gptrain checkpoint (no model/config entries)")
    state["path"] = str(path)
    return state


def read(path: str | Path, map_location="cpu"):
    """torch.load with the restricted unpickler; a refused or unreadable file raises ValueError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # a global outside the allow-list, or a corrupt pickle
        refused = unsafe_globals(path)
        if not refused:
            raise ValueError(f"{path}: not a readable gptrain checkpoint (UnpicklingError: {e})") from None
        raise ValueError(refusal_message(path, refused)) from None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable gptrain checkpoint ({type(e).__name__}: {e})") from None


def unsafe_globals(path: str | Path) -> list[str]:
    """The functions and classes outside torch's allow-list that a file's pickle names (read without running any)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch.save file at all
        return []


# What NumPy's random-number state (`np.random.get_state()`: a uint32 array) pickles as: all an older gptrain
# checkpoint named beyond torch's allow-list (numpy 1.x spells the module `numpy.core`, 2.x `numpy._core`).
OLD_FORMAT_GLOBALS = frozenset({"numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
                                "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"})


def is_old_format(refused: list[str]) -> bool:
    """Only the NumPy objects of the random-number state gptrain saved before checkpoints held plain values only."""
    return bool(refused) and set(refused) <= OLD_FORMAT_GLOBALS


def refusal_message(path: str | Path, refused: list[str]) -> str:
    if is_old_format(refused):
        return (f"{path}: written by an older gptrain (it holds NumPy random-number state, {', '.join(refused)}), "
                f"which the safe loader refuses, since unpickling such objects could run code. If you trust the "
                f"file, convert it once with: python {CONVERT_SCRIPT} {path}")
    return (f"{path}: refused, its pickle names {', '.join(refused)}; a gptrain checkpoint holds only tensors, plain "
            f"containers, strings and numbers, and loading anything else could run code. Nothing was loaded")


def clean_state_dict(sd: dict) -> dict:
    """Strip wrapper prefixes (torch.compile's `_orig_mod.`, DDP's `module.`) so any wrapper loads any checkpoint."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out
