"""Parameter groups, the optimizers (AdamW; Muon for hidden matrices) and the learning-rate schedule.

The schedule (lr_factor) gives a factor in [0, 1] of each group's own peak learning rate (`peak_lr`), and set_lr
applies it, so AdamW and Muon groups follow one schedule with their own peaks; the lr goes one way, from train.lr
(and train.muon_lr) to the groups' peaks to factor x peak. The wall-clock budget's planner is training/budget.py.
"""

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
    if t.optimizer == "muon":
        return build_muon(model, t)
    groups = param_groups(model, t.weight_decay)
    for g in groups:
        g["peak_lr"] = t.lr
    # The fused kernel updates all parameters in one pass; it exists for CUDA and (recent torch) CPU tensors.
    fused = device_type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=fused)
    except (RuntimeError, TypeError):  # an older torch or an unsupported device: the foreach implementation
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


def lr_factor(step: int, max_steps: int, t: TrainSection) -> float:
    """The schedule's factor in [0, 1] of each group's peak learning rate for the update after `step` applied ones
    (0-based; the schedule's step) of `max_steps` updates. set_lr applies it; the logged lr is train.lr x factor.

    Linear warmup from 0 to 1 over warmup_steps, then either cosine decay reaching min_lr_ratio at the last update
    (step max_steps - 1), or warmup-stable-decay: constant 1, then a linear decay to the floor over the last
    decay_frac of the steps.
    """
    peak, floor = 1.0, t.min_lr_ratio
    warmup = min(t.warmup_steps, max(max_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    if t.schedule == "cosine":
        # +1 as in the decay below: the last update (step max_steps - 1) runs at the floor, not just above it
        progress = (step - warmup + 1) / max(max_steps - warmup, 1)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = wsd_decay_start(max_steps, t)
    if step < decay_start:
        return peak
    progress = (step - decay_start + 1) / max(max_steps - decay_start, 1)
    return peak + (floor - peak) * min(progress, 1.0)


def wsd_decay_start(max_steps: int, t: TrainSection) -> int:
    """The first step of warmup-stable-decay's linear decay (the last decay_frac of max_steps, after the warmup)."""
    warmup = min(t.warmup_steps, max(max_steps - 1, 0))
    return max(max_steps - max(int(round(t.decay_frac * max_steps)), 1), warmup)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Apply the schedule: every group runs at factor x its own peak learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


# ----------------------------------------------------------------------------------------------- Muon
def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately replace each matrix of g (..., rows, cols) by the nearest semi-orthogonal matrix U V^T (its
    singular values pushed towards 1) with a quintic Newton-Schulz iteration; coefficients (3.4445, -4.7750, 2.0315)
    as in Muon (Jordan et al. 2024), chosen to converge fast from singular values in (0, 1] rather than exactly.
    A stack of same-shape matrices runs as batched matmuls (one call per product instead of one per matrix)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    shape = g.shape
    x = g.float().reshape(-1, *shape[-2:])  # (N, rows, cols)
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b gram + c gram^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a x + poly x
    return (x.mT if tall else x).reshape(shape)


class Muon(torch.optim.Optimizer):
    """Muon (momentum + orthogonalised updates) for the 2-D weights inside the blocks, AdamW for the rest.

    Groups with `muon=True` take Nesterov momentum, orthogonalise it, and step by lr x sqrt(max(1, rows/cols));
    the other groups (embeddings, output head, norms, biases) are plain AdamW. Weight decay (decoupled, lr x
    weight_decay per step) only where a group sets it: build_muon gives it to the embeddings and an untied head, not to
    the Muon matrices (train.weight_decay in training/config.py says so). One optimizer object, so checkpoints,
    the GradScaler and the schedule treat it like AdamW. Single-device maths: under FSDP the gradients are shards,
    which Muon cannot orthogonalise, so the trainer refuses that combination.
    """

    def __init__(self, groups: list[dict], momentum: float = 0.95, betas=(0.9, 0.95), eps: float = 1e-8) -> None:
        super().__init__(groups, dict(lr=0.02, weight_decay=0.0, momentum=momentum, betas=betas, eps=eps,
                                      muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            same_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)
                if group["muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                    same_shape.setdefault(p.shape, []).append((p, update))
                else:
                    b1, b2 = group["betas"]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = state["step"].item()
                    state["exp_avg"].lerp_(p.grad, 1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))
            # Orthogonalise all same-shape updates together (the tiny preset's 28 matrices become 3 batches).
            for shape, pairs in same_shape.items():
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                ortho = orthogonalize(torch.stack([u for _, u in pairs]))
                for (p, _), o in zip(pairs, ortho, strict=True):
                    p.add_(o.to(p.dtype), alpha=-lr * scale)
        return None


def build_muon(model: torch.nn.Module, t: TrainSection) -> Muon:
    """Groups: the blocks' 2-D weights (Muon at muon_lr, no weight decay); the other matrices, i.e. the embeddings
    and an untied head (AdamW at lr, weight decay); vectors, i.e. norms and biases (AdamW at lr, no weight decay)."""
    hidden, other_matrices, vectors = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() == 2 and ".blocks." in f".{name}" and "wte" not in name and "wpe" not in name:
            hidden.append(p)
        elif p.dim() >= 2:
            other_matrices.append(p)
        else:
            vectors.append(p)
    groups = [
        {"params": hidden, "muon": True, "lr": t.muon_lr, "peak_lr": t.muon_lr, "weight_decay": 0.0,
         "name": "muon"},
        {"params": other_matrices, "lr": t.lr, "peak_lr": t.lr, "weight_decay": t.weight_decay, "name": "matrices"},
        {"params": vectors, "lr": t.lr, "peak_lr": t.lr, "weight_decay": 0.0, "name": "vectors"},
    ]
    return Muon([g for g in groups if g["params"]], momentum=t.muon_momentum, betas=(t.beta1, t.beta2))
