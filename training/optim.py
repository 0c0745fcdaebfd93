"""Parameter groups, the optimizers (AdamW; Muon for hidden matrices) and the learning-rate schedule.

The schedule (lr_factor) gives a factor in [0, 1] of each group's own peak learning rate (`peak_lr`), and set_lr
applies it, so AdamW and Muon groups follow one schedule with their own peaks; the lr goes one way, from train.lr
(and train.muon_lr) to the groups' peaks to factor x peak. Weight decay goes the same way: each group's
`peak_weight_decay`, times weight_decay_factor (1, or falling linearly to 0: train.wd_schedule). The
wall-clock budget's planner is training/budget.py.
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
        g["peak_lr"], g["peak_weight_decay"] = t.lr, g["weight_decay"]
    if t.cautious_decay:  # torch's AdamW has no per-coordinate decay mask: Muon's AdamW path (no Muon group)
        return Muon(groups, betas=(t.beta1, t.beta2), cautious=True)
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


def weight_decay_factor(step: int, max_steps: int, t: TrainSection) -> float:
    """The factor of each group's peak weight decay for the update after `step` applied ones (0-based) of
    `max_steps`: 1 (constant), or linear: 1 - (step + 1) / max_steps, reaching 0 at the last update as the lr's
    decay reaches its floor there. The decay applied is still lr x weight decay, so it falls with the lr too."""
    if t.wd_schedule == "constant":
        return 1.0
    return max(1.0 - (step + 1) / max(max_steps, 1), 0.0)


def accum_steps(step: int, t: TrainSection) -> int:
    """Micro-steps of the update after `step` applied ones (0-based): train.grad_accum, or during the batch-size
    ramp (train.accum_ramp_steps = N) 1 + (grad_accum - 1) x step // N, from 1 up to grad_accum at step N."""
    if step >= t.accum_ramp_steps:
        return t.grad_accum
    return 1 + (t.grad_accum - 1) * step // t.accum_ramp_steps


def row_length(step: int, t: TrainSection, block_size: int) -> int:
    """Tokens per row of the update after `step` applied ones (0-based): train.seq_warmup_len during the
    sequence-length warmup (the first train.seq_warmup_steps updates), block_size after it."""
    return t.seq_warmup_len if step < t.seq_warmup_steps else block_size


def set_lr(optimizer: torch.optim.Optimizer, factor: float, wd_factor: float = 1.0) -> None:
    """Apply the schedule: every group runs at factor x its own peak learning rate and wd_factor x its own peak
    weight decay (a group without a recorded peak, from a checkpoint older than the weight-decay schedule, keeps
    its constant decay)."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
        group["weight_decay"] = group.setdefault("peak_weight_decay", group["weight_decay"]) * wd_factor


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


def decay_weights(p: torch.Tensor, lr: float, wd: float, direction: torch.Tensor, cautious: bool) -> None:
    """Decoupled weight decay, before the update: w -= lr x wd x w. Cautious (Chen et al. 2025, "Cautious Weight
    Decay"): only where direction x w >= 0, `direction` (p's shape) having the sign of the update u the optimizer
    subtracts (w moves by -lr u): there the decay pulls w the way the update does; elsewhere it would fight it."""
    if not wd:
        return
    if cautious:
        p.sub_(p * (direction * p >= 0), alpha=lr * wd)
    else:
        p.mul_(1 - lr * wd)


def normalize_rows(o: torch.Tensor, state: dict, beta2: float, eps: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025) on one orthogonalised update o (rows, cols), fp32. v (rows, 1), kept in `state`, is
    the running mean over steps of each row's mean square: v <- beta2 v + (1 - beta2) mean_cols(o^2), no bias
    correction (as in the paper; the rescaling below cancels a factor common to every row). Each row of o is
    divided by sqrt(v) + eps, then the whole is rescaled to o's own Frobenius norm, so train.muon_lr and the
    sqrt(rows / cols) scale keep their meaning (the paper rescales to 0.2 sqrt(rows x cols) x lr instead). Rows are
    output neurons: nn.Linear weights are (out, in)."""
    if "row_mean_square" not in state:
        state["row_mean_square"] = torch.zeros(o.shape[0], 1, dtype=o.dtype, device=o.device)
    v = state["row_mean_square"]
    v.mul_(beta2).add_(o.square().mean(dim=-1, keepdim=True), alpha=1 - beta2)
    normed = o / (v.sqrt() + eps)
    return normed * (o.norm() / normed.norm().clamp_min(eps))


class Muon(torch.optim.Optimizer):
    """Muon (momentum + orthogonalised updates) for the 2-D weights inside the blocks, AdamW for the rest.

    Groups with `muon=True` take Nesterov momentum, orthogonalise it, and step by lr x sqrt(max(1, rows/cols));
    the other groups (embeddings, output head, norms, biases) are plain AdamW. Weight decay (decoupled, lr x
    weight_decay per step) only where a group sets it: build_muon gives train.weight_decay to the embeddings and an
    untied head, train.muon_weight_decay (0 by default) to the Muon matrices. normuon_beta2 (None = off; build_muon
    passes train.beta2) turns the Muon groups into NorMuon (normalize_rows); cautious makes every group's decay
    cautious (decay_weights). One optimizer object, so checkpoints, the GradScaler and the schedule treat it like
    AdamW; build_optimizer also uses it without Muon groups, as an AdamW with cautious decay. Single-device maths:
    under FSDP the gradients are shards, which Muon cannot orthogonalise (nor NorMuon take row statistics of), so
    the trainer refuses that combination (training/loop.py:check_settings), and cautious decay too (not run on
    DTensors).
    """

    def __init__(self, groups: list[dict], momentum: float = 0.95, betas=(0.9, 0.95), eps: float = 1e-8,
                 normuon_beta2: float | None = None, cautious: bool = False) -> None:
        super().__init__(groups, dict(lr=0.02, weight_decay=0.0, momentum=momentum, betas=betas, eps=eps,
                                      muon=False))
        # Constructor settings, not group keys: the run's config rebuilds them, and a checkpoint's groups (saved
        # before these existed) replace the groups on load.
        self.normuon_beta2, self.cautious = normuon_beta2, cautious

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return None

    def _adamw_step(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
            decay_weights(p, lr, wd, state["exp_avg"], self.cautious)  # the update exp_avg / denom: exp_avg's sign
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))

    def _muon_step(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        same_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.mul_(group["momentum"]).add_(p.grad)
            update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
            same_shape.setdefault(p.shape, []).append((p, update))
        # Orthogonalise all same-shape updates together (the tiny preset's 28 matrices become 3 batches).
        for shape, pairs in same_shape.items():
            scale = max(1.0, shape[0] / shape[1]) ** 0.5
            ortho = orthogonalize(torch.stack([u for _, u in pairs]))
            for (p, _), o in zip(pairs, ortho, strict=True):
                if self.normuon_beta2 is not None:
                    o = normalize_rows(o, self.state[p], self.normuon_beta2, group["eps"])
                decay_weights(p, lr, wd, o, self.cautious)
                p.add_(o.to(p.dtype), alpha=-lr * scale)


def build_muon(model: torch.nn.Module, t: TrainSection) -> Muon:
    """Groups: the blocks' 2-D weights (Muon at muon_lr, weight decay muon_weight_decay); the other matrices, i.e.
    the embeddings and an untied head (AdamW at lr, weight decay); vectors, i.e. norms and biases (AdamW at lr, no
    weight decay)."""
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
        {"params": hidden, "muon": True, "lr": t.muon_lr, "peak_lr": t.muon_lr, "weight_decay": t.muon_weight_decay,
         "name": "muon"},
        {"params": other_matrices, "lr": t.lr, "peak_lr": t.lr, "weight_decay": t.weight_decay, "name": "matrices"},
        {"params": vectors, "lr": t.lr, "peak_lr": t.lr, "weight_decay": 0.0, "name": "vectors"},
    ]
    for g in groups:
        g["peak_weight_decay"] = g["weight_decay"]
    return Muon([g for g in groups if g["params"]], momentum=t.muon_momentum, betas=(t.beta1, t.beta2),
                normuon_beta2=t.beta2 if t.normuon else None, cautious=t.cautious_decay)
