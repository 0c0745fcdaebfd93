"""Monitoring: console lines, TensorBoard and metrics.jsonl, written by rank 0 only.

On every other rank the Monitor is a no-op, so the loop calls it unconditionally (no `if rank == 0` around it).
metrics.jsonl holds one JSON object per logged step, its keys named as the TensorBoard tags.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (torch.distributed may or may not be initialised)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        print(*args, **kwargs, flush=True)
    elif torch.distributed.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def fmt_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Monitor:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir))

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        """Log scalars under their tags to TensorBoard and as one line of metrics.jsonl."""
        if not self.enabled:
            return
        if self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.writer is not None:
            # TensorBoard renders text as markdown: keep generated code readable.
            self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.enabled and self.writer is not None:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(clean, metrics, run_name=".")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()


def step_flops(model, batches: list[dict], reference_forward: bool = False,
               input_keys: tuple[str, ...] = ("input_ids",)) -> int:
    """Model FLOPs of one step's micro-batches on this rank, in train/mfu's convention (model/gpt.py: 6N + 12 L d T
    per token, full attention, the PaLM / nanoGPT one): each model input (B, T) at its own padded length T, which
    is block_size in pre-training and the batch's longest example in SFT and DPO. A live DPO reference adds its
    forward pass over the same inputs (2N + 4 L d T per token). input_keys: the batch's model inputs, each (B, T)
    (the stage says which: DPO's are chosen and rejected)."""
    total = 0
    for batch in batches:
        for key in input_keys:
            if key in batch:
                B, T = batch[key].shape
                per_token = model.flops_per_token(T)
                if reference_forward:
                    per_token += model.flops_per_token(T, forward_only=True)
                total += B * T * per_token
    return total


class Throughput:
    """Tokens/s and MFU over the steps since the last report (host time; the loop syncs once per step anyway).

    MFU = model FLOPs per second (step_flops: 6N + 12 L d T, the PaLM convention) / peak FLOP/s."""

    def __init__(self, peak_flops: float) -> None:
        self.peak = peak_flops
        self.t_last = time.perf_counter()
        self.tokens = self.flops = 0

    def add(self, tokens: int, flops: int) -> None:
        self.tokens += tokens
        self.flops += flops

    def report(self) -> tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        tps = self.tokens / dt
        mfu = self.flops / dt / self.peak if self.peak > 0 else 0.0
        self.t_last, self.tokens, self.flops = now, 0, 0
        return tps, mfu

    def reset(self) -> None:
        self.t_last, self.tokens, self.flops = time.perf_counter(), 0, 0
