"""The run's mutable state as one value, and the one place a checkpoint's contents are put together.

RunState holds what changes as a run goes (steps, skipped steps, tokens seen, the planned step count, elapsed time)
plus the stage's loader state and the RNG state at save time. `sched_step` (the learning-rate schedule's step) is
derived, never stored apart: step - skipped. build_checkpoint() turns a RunState and the weights into the dict that
training/checkpoint.py saves; training/loop.py and training/load.py:save_run both call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from training.config import Config, to_dict


def rng_state() -> dict:
    """The torch generator states of this process: CPU, and the current CUDA device's if there is one (tensors).

    Nothing else: Python's and NumPy's global generators are unused by training (every step reseeds torch from
    step_seed), and a checkpoint holds only what the restricted unpickler loads."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: another machine may have fewer GPUs
    return state


def set_rng_state(state: dict) -> None:
    """Restore rng_state()'s states as far as this machine has them: a checkpoint from a machine with more, fewer or
    no GPUs resumes (the next step reseeds every generator anyway)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # an older gptrain saved every device's state: take this device's, if any
        index = torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)  # the current device


@dataclass
class RunState:
    """Where a run stands. `loader` is anything with state_dict/load_state_dict (the stage); None for a run folder
    written from given weights (load.save_run), which then has neither loader nor RNG state."""

    step: int = 0  # steps attempted (an fp16-skipped step counts)
    skipped: int = 0  # fp16 steps whose update the GradScaler skipped
    tokens_seen: int = 0
    max_steps: int | None = None  # applied updates to run; None until a time budget has been planned
    elapsed_before: float = 0.0  # seconds spent by earlier processes of this run (before a resume)
    loader: object | None = None
    consecutive_skips: int = 0  # not saved: a resumed run starts counting again
    t_start: float | None = field(default=None, repr=False)  # this process's perf_counter at the loop's start

    @property
    def sched_step(self) -> int:
        """The schedule's step: updates applied so far (a skipped step does not advance the schedule)."""
        return self.step - self.skipped

    def start_clock(self) -> None:
        self.t_start = time.perf_counter()

    def elapsed(self, now: float | None = None) -> float:
        """Seconds this run has spent, earlier processes included."""
        if self.t_start is None:
            return self.elapsed_before
        return self.elapsed_before + ((time.perf_counter() if now is None else now) - self.t_start)

    def state_dict(self) -> dict:
        has_loader = self.loader is not None
        return {"step": self.step, "sched_step": self.sched_step,  # sched_step: for readers of older versions
                "max_steps": self.max_steps, "skipped_steps": self.skipped, "tokens_seen": self.tokens_seen,
                "elapsed": self.elapsed(), "loader": self.loader.state_dict() if has_loader else None,
                "rng": rng_state() if has_loader else None}

    def load_state_dict(self, d: dict) -> None:
        """A checkpoint's run state; its sched_step is read as derived (step - skipped_steps)."""
        self.step, self.skipped, self.tokens_seen = d["step"], d["skipped_steps"], d["tokens_seen"]
        self.max_steps, self.elapsed_before = d["max_steps"], d["elapsed"]
        if self.loader is not None:
            self.loader.load_state_dict(d["loader"])
            set_rng_state(d["rng"])


def build_checkpoint(state: RunState, model: dict, optimizer: dict | None, scaler: dict | None, cfg: Config,
                     gcfg, tok, world_size: int = 1, stage: str | None = None, init_from: str | None = None,
                     init_from_checkpoint: str | None = None) -> dict:
    """The checkpoint dict: weights, optimizer and scaler state, the run state, and what every reader needs to
    rebuild the model (model_config, tokenizer, config). stage / init_from default to the config's."""
    return {
        "model": model, "optimizer": optimizer, "scaler": scaler, **state.state_dict(),
        "config": to_dict(cfg), "model_config": gcfg.to_dict(), "tokenizer": tok.backend.to_str(),
        "tokenizer_hash": tok.hash, "world_size": world_size,
        "init_from": cfg.init_from if init_from is None else init_from,
        "stage": cfg.stage if stage is None else stage, "init_from_checkpoint": init_from_checkpoint,
    }
