"""Numeric precision, shared by training (training/loop.py) and inference (training/load.py).

    precision = resolve_precision("auto", device)   # fp32 | bf16 | fp16
    with autocast_ctx(precision, device):            # autocast for bf16 / fp16, a no-op for fp32
        logits = model(idx)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from training.monitor import print0


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            print0("warning: fp16 on CPU is emulated and slow; it is meant for tests")
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"  # a CPU without bf16 matrix units runs bf16 matmuls ~100x slower than fp32


def autocast_ctx(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return nullcontext()
