"""Convert a checkpoint written by an older gptrain, which the safe loader refuses, into the current format.

    python scripts/convert_checkpoint.py runs/tiny/checkpoints/step_00000150.pt [MORE.pt ...]

Older checkpoints held Python's and NumPy's random-number states (unused: every step reseeds torch). NumPy objects
are outside what torch's restricted unpickler (`torch.load(..., weights_only=True)`) loads, so gptrain refuses such a
file. This script refuses, without loading, a file whose pickle names anything but the few NumPy objects of that
state (checkpoint.OLD_FORMAT_GLOBALS: an array, its dtype and NumPy's array constructor); it then loads the file with
the restricted unpickler, those names allowed and nothing else, drops the two random-number states, checks that the
result loads with nothing extra allowed, and rewrites the file atomically (temporary file, fsync, rename). A file that
already loads safely is left as it is. Convert only files you trust all the same: they came from a run folder.
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout, not installed: as train.py

from training import checkpoint
from training.cli import run_script


def numpy_state_globals() -> list:
    """The objects of checkpoint.OLD_FORMAT_GLOBALS that this NumPy has (the restricted unpickler's extra names)."""
    import numpy as np

    found = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            found.append(importlib.import_module(module)._reconstruct)
        except (ImportError, AttributeError):
            pass
    return found


def converted_bytes(path: Path) -> bytes:
    """The bytes of the converted checkpoint: torch.save of the old state without its Python/NumPy RNG states."""
    refused = checkpoint.unsafe_globals(path)
    if not checkpoint.is_old_format(refused):  # not what an older gptrain wrote: never loaded, even here
        raise ValueError(checkpoint.refusal_message(path, refused))
    with torch.serialization.safe_globals(numpy_state_globals()):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path}: not a gptrain checkpoint (no model/config entries)")
    rng = state.get("rng")
    if isinstance(rng, dict):
        state["rng"] = {k: v for k, v in rng.items() if k not in ("python", "numpy")}
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: still not loadable with weights_only=True after dropping the random-number "
                         f"states ({type(e).__name__}: {e}); the file was left as it was") from None
    return buf.getvalue()


def convert(path: str | Path) -> bool:
    """Rewrite one checkpoint file in the current format; False if it already was in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not checkpoint.unsafe_globals(path):
        checkpoint.read(path)  # a clear error for a file that is not a checkpoint at all
        print(f"{path}: already loads with weights_only=True; left as it is")
        return False
    checkpoint.atomic_write_bytes(path, converted_bytes(path))
    print(f"{path}: converted (Python and NumPy random-number states dropped)")
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("paths", nargs="+", metavar="CHECKPOINT", help="checkpoint file (RUN/checkpoints/step_*.pt)")
    for path in p.parse_args(argv).paths:
        convert(path)


if __name__ == "__main__":
    run_script(main)
