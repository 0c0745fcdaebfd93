"""Parameter groups, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from training.config import TrainSection


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (2-D weights: linear layers and embeddings) only, never on norms and biases."""
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # a tied weight appears once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "matrices"},
        {"params": no_decay, "weight_decay": 0.0, "name": "vectors"},
    ]


def build_optimizer(model: torch.nn.Module, t: TrainSection, device_type: str) -> torch.optim.Optimizer:
    groups = param_groups(model, t.weight_decay)
    # The fused kernel updates all parameters in one pass; it exists for CUDA and (recent torch) CPU tensors.
    fused = device_type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=fused)
    except (RuntimeError, TypeError):  # an older torch or an unsupported device: the foreach implementation
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


def lr_at(step: int, max_steps: int, t: TrainSection) -> float:
    """Learning rate for optimizer step `step` (0-based) of `max_steps`.

    Linear warmup from 0 to lr over warmup_steps, then either cosine decay to lr * min_lr_ratio at max_steps, or
    warmup-stable-decay: constant lr, then a linear decay to the floor over the last decay_frac of the steps.
    """
    peak, floor = t.lr, t.lr * t.min_lr_ratio
    warmup = min(t.warmup_steps, max(max_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    if t.schedule == "cosine":
        progress = (step - warmup) / max(max_steps - warmup, 1)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_steps = max(int(round(t.decay_frac * max_steps)), 1)
    decay_start = max(max_steps - decay_steps, warmup)
    if step < decay_start:
        return peak
    progress = (step - decay_start + 1) / max(max_steps - decay_start, 1)
    return peak + (floor - peak) * min(progress, 1.0)
