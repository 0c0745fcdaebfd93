"""Interruptions: SIGTERM / SIGINT (StopSignal) and the trainer's fault-injection test hook (GPTRAIN_FAULT)."""

from __future__ import annotations

import os
import signal
import time

import torch

from training.monitor import print0


class StopSignal:
    """SIGTERM / SIGINT request a checkpoint and a clean exit at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print0(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class FaultInjection:
    """Test hook: GPTRAIN_FAULT="nan_loss@STEP" or "inf_grad@STEP", optionally ":RANK" (default every rank), makes
    that step's loss NaN or one gradient inf, to exercise the non-finite paths with real processes;
    "slow@STEP" makes every step from STEP on SLOW_FAULT_SECONDS longer (a machine slowing down mid-run).
    Kill -9 at a deterministic moment: "kill@STEP" in the middle of step STEP (after its backward, before its update),
    "kill_after_tmp@STEP" once the save at STEP has written and fsynced its temporary file, "kill_after_rename@STEP"
    once that file is renamed into place but before the `latest` pointer is rewritten."""

    KINDS = ("nan_loss", "inf_grad", "slow", "kill", "kill_after_tmp", "kill_after_rename")
    SAVE_EVENTS = {"kill_after_tmp": "tmp_written", "kill_after_rename": "renamed"}  # checkpoint.save's hook events
    SLOW_FAULT_SECONDS = 0.1

    def __init__(self, spec: str) -> None:
        kind, _, where = spec.partition("@")
        step, _, rank = where.partition(":")
        if kind not in self.KINDS or not step.isdigit():
            raise ValueError(f"GPTRAIN_FAULT={spec!r}: expected KIND@STEP[:RANK], KIND one of {self.KINDS}")
        self.kind, self.step, self.rank = kind, int(step), int(rank) if rank else None

    def due(self, step: int, rank: int) -> bool:
        """Whether the mid-step fault fires in step `step` (1-based) on `rank`."""
        if self.kind in self.SAVE_EVENTS:
            return False
        return (step >= self.step if self.kind == "slow" else step == self.step) and self.rank in (None, rank)

    def apply(self, loss_sum: torch.Tensor, params: list[torch.Tensor]) -> None:
        if self.kind == "nan_loss":
            loss_sum.fill_(float("nan"))
        elif self.kind == "inf_grad":
            params[0].grad.view(-1)[0] = float("inf")
        elif self.kind == "kill":
            self.kill()
        else:
            time.sleep(self.SLOW_FAULT_SECONDS)

    def save_hook(self, step: int, rank: int):
        """checkpoint.save's hook for the save at `step`: kills the process at this fault's event, if it is due."""
        def hook(event: str) -> None:
            if self.SAVE_EVENTS.get(self.kind) == event and step == self.step and self.rank in (None, rank):
                self.kill()
        return hook

    @staticmethod
    def kill() -> None:
        print0("GPTRAIN_FAULT: SIGKILL")
        os.kill(os.getpid(), signal.SIGKILL)
