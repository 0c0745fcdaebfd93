"""Network health, cheap enough to leave on: per-block gradient norms, update/weight ratios, histograms.

Vanishing or exploding gradients show as `grad_norm/<block>` curves drifting apart; a learning rate that is too
high or too low as `update_ratio/<group>` far from its usual level (a default pre-training at its peak lr: ~6e-4
to ~4e-2 per step). `grad_norm/<block>` is measured before clipping (after fp16 unscaling), as `train/grad_norm`:
the squares of the block norms sum to the square of the global norm.

HealthWatch says in words what those curves show (the `[health]` options of training/config.py set the thresholds):

    exploding     the pre-clip gradient norm above health.explode_factor x train.grad_clip for health.explode_steps
                  steps in a row (checked every step; off when clipping is off)
    vanishing     a group's gradient norm below health.vanish_ratio x the largest group's norm (the largest, not
                  the median: it stays a live reference when most groups collapse together, as the lower blocks and
                  the embedding do when the gradient vanishes on its way down)
    update_ratio  a group's update/weight ratio outside [health.ratio_low, health.ratio_high] x lr / peak lr, the
                  band following the schedule, so warmup and decay stay inside it (a group at lr 0 is not checked)
    overfitting   the periodic validation loss rose health.overfit_evals times in a row while the mean training
                  loss since the evaluation before that rise fell. The evaluation at step 0 (before training) counts
                  as the first periodic one, so a rise can start from it; as no training precedes it, its training
                  reference is the mean training loss up to the next evaluation. The final validation does not
                  count: it scores the whole split, the periodic ones its first eval.max_tokens, so the two do not
                  compare

vanishing and update_ratio are checked when the figures are measured (every log.health_interval steps). Each warning
fires once per episode: it re-arms when its figure is healthy again (the norm back under the threshold, the group
back above it or inside the band, the validation loss falling). The watch only reads figures that are the same on
every rank (synchronised gradients, reduced losses), so it holds the same state everywhere and adds no collective.
The watches are not saved with checkpoints: a resumed run watches afresh (and counts its own warnings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def _group_of(name: str) -> str:
    """Parameter name -> its block: `blocks.3.attn.q_proj.weight` -> `block_3`, `wte.weight` -> `embedding`."""
    if name.startswith("blocks."):
        return f"block_{name.split('.')[1]}"
    if name.startswith(("wte", "wpe", "value_embeds", "bigram_embed")):
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    return "final_norm"


@torch.no_grad()
def block_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradients of each block (and embedding, head, final norm), after the gradient all-reduce, so
    the figures are the synchronised gradients; the loop calls it after unscaling and before clipping. Every rank
    calls it: under FSDP2 `full_tensor()` gathers the shards (a collective); rank 0 alone logs the result."""
    sq: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        key = _group_of(name)
        sq[key] = sq.get(key, 0) + g.float().pow(2).sum()
    return {k: v.sqrt().item() for k, v in sq.items()}


@torch.no_grad()
def update_ratios(optimizer: torch.optim.Optimizer, before: list[torch.Tensor]) -> dict[str, float]:
    """||W_after - W_before|| / ||W_before|| per optimizer parameter group (matrices, vectors)."""
    ratios, i = {}, 0
    for group in optimizer.param_groups:
        num = den = 0.0
        for p in group["params"]:
            old = before[i]
            i += 1
            num += (p.detach() - old).float().pow(2).sum().item()
            den += old.float().pow(2).sum().item()
        ratios[group_name(group, len(ratios))] = (num ** 0.5) / max(den ** 0.5, 1e-12)
    return ratios


def group_name(group: dict, index: int) -> str:
    """An optimizer group's name in update_ratio/<group>: its `name`, else its index."""
    return group.get("name", str(index))


def lr_scales(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each group's current learning rate / its peak (the schedule's factor), named as update_ratios names them."""
    return {group_name(g, i): g["lr"] / g["peak_lr"] if g.get("peak_lr") else 1.0
            for i, g in enumerate(optimizer.param_groups)}


def activation_hooks(model: torch.nn.Module, monitor, step: int) -> list:
    """Forward hooks that log each block's output activations as a histogram once (the hooks are removed after
    the step by the caller)."""
    hooks = []
    for i, block in enumerate(getattr(model, "blocks", [])):
        def hook(module, inputs, output, i=i):
            monitor.histogram(f"activations/block_{i}", output, step)

        hooks.append(block.register_forward_hook(hook))
    return hooks


# ----------------------------------------------------------------------------------------------- warnings in words
KINDS = ("exploding", "vanishing", "update_ratio", "overfitting")


@dataclass(frozen=True)
class HealthWarning:
    kind: str  # one of KINDS
    step: int
    message: str  # one line naming the block, group or figure and the values

    def line(self) -> str:
        return f"health warning ({self.kind}) at step {self.step}: {self.message}"


class ExplodingWatch:
    """The pre-clip gradient norm above `threshold` for `steps` steps in a row; re-arms at a step at or below it."""

    def __init__(self, threshold: float, steps: int) -> None:
        self.threshold, self.steps = threshold, steps
        self.run_length = 0  # steps in a row above the threshold
        self.fired = False

    def observe(self, step: int, grad_norm: float) -> HealthWarning | None:
        if self.steps <= 0 or self.threshold <= 0 or not math.isfinite(grad_norm):
            return None  # off; or an fp16 overflow, whose update the GradScaler skips (the loop counts those)
        if grad_norm <= self.threshold:
            self.run_length, self.fired = 0, False
            return None
        self.run_length += 1
        if self.run_length < self.steps or self.fired:
            return None
        self.fired = True
        return HealthWarning("exploding", step, f"the pre-clip gradient norm has stayed above {self.threshold:g} "
                             f"for {self.run_length} steps in a row (now {grad_norm:.4g}): lower train.lr or check "
                             "model.init_std")


class VanishingWatch:
    """A group's gradient norm below `ratio` x the largest group's norm; re-arms when it is back above.

    The largest norm, not the median: when most groups collapse together (the lower blocks and the embedding, the
    classic vanishing gradient) the median collapses with them and would hide it; the largest is a group still
    learning. In default runs every group stays within 1/45 of the largest (the final norm, a few hundred weights)."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.low: set[str] = set()  # groups that have fired and not recovered

    def observe(self, step: int, norms: dict[str, float]) -> list[HealthWarning]:
        if self.ratio <= 0 or len(norms) < 2:
            return []
        largest = max(norms, key=norms.get)
        warnings = []
        for group, norm in norms.items():
            if norm >= self.ratio * norms[largest]:
                self.low.discard(group)
            elif group not in self.low:
                self.low.add(group)
                warnings.append(HealthWarning("vanishing", step, f"grad_norm/{group} is {norm:.3g}, below "
                                              f"{self.ratio:g} x the largest group's, grad_norm/{largest} "
                                              f"({norms[largest]:.3g})"))
        return warnings


class UpdateRatioWatch:
    """A group's update/weight ratio outside [low, high] x lr / peak lr; re-arms when it is back inside the band.

    The band follows the schedule: a group's update is proportional to its learning rate (AdamW's and Muon's steps
    are lr x a direction of bounded size), so ratio / (lr / peak lr) stays put through warmup and decay."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.outside: dict[str, str] = {}  # group -> "below" | "above", for groups that have fired

    def observe(self, step: int, ratios: dict[str, float], lr_scales: dict[str, float]) -> list[HealthWarning]:
        warnings = []
        for group, ratio in ratios.items():
            scale = lr_scales[group]
            if scale <= 0:  # no update is expected at lr 0
                continue
            low, high = self.low * scale, self.high * scale
            side = "below" if ratio < low else "above" if 0 < high < ratio else None
            if side is None:
                self.outside.pop(group, None)
            elif self.outside.get(group) != side:
                self.outside[group] = side
                warnings.append(HealthWarning("update_ratio", step, f"update_ratio/{group} is {ratio:.3g}, {side} "
                                              f"the healthy band [{low:.3g}, {high:.3g}] (the band "
                                              f"[{self.low:g}, {self.high:g}] x lr / peak lr {scale:.3g}): "
                                              + ("train.lr is too low" if side == "below" else
                                                 "train.lr is too high")))
        return warnings


class OverfittingWatch:
    """Validation loss rising `evals` evaluations in a row while the training loss falls; re-arms when it falls.

    The training loss compared is the mean over the steps between two evaluations (one step's loss is noisy): the
    mean before the latest evaluation against the mean before the evaluation the rise started from. An evaluation
    with no training before it (step 0's) is a baseline the rise may start from; its training reference is the mean
    over the steps after it, up to the next evaluation (the first mean there is)."""

    def __init__(self, evals: int) -> None:
        self.evals = evals
        self.train_sum, self.train_steps = 0.0, 0  # training losses since the last evaluation
        self.last_val: float | None = None
        self.rises = 0  # evaluations in a row whose loss rose
        # (step, val loss, mean train loss) the rise started from; the mean is None until known (a step-0 start)
        self.start: tuple[int, float, float | None] | None = None
        self.fired = False

    def observe_train(self, loss: float) -> None:
        self.train_sum += loss
        self.train_steps += 1

    def observe_val(self, step: int, val_loss: float) -> HealthWarning | None:
        if self.train_steps == 0:  # no training before it (step 0's evaluation): a baseline, its train mean to come
            self.last_val, self.rises, self.fired, self.start = val_loss, 0, False, (step, val_loss, None)
            return None
        train = self.train_sum / self.train_steps
        self.train_sum, self.train_steps = 0.0, 0
        if self.start is not None and self.start[2] is None:  # the first mean after the baseline is its reference
            self.start = (self.start[0], self.start[1], train)
        if self.last_val is None or val_loss <= self.last_val:
            self.rises, self.fired, self.start = 0, False, (step, val_loss, train)
        else:
            self.rises += 1
        self.last_val = val_loss
        if self.evals <= 0 or self.fired or self.rises < self.evals or self.start is None or train >= self.start[2]:
            return None
        self.fired = True
        at, val0, train0 = self.start
        return HealthWarning("overfitting", step, f"val/loss has risen {self.rises} evaluations in a row, from "
                             f"{val0:.4f} at step {at} to {val_loss:.4f}, while the mean train/loss fell from "
                             f"{train0:.4f} to {train:.4f}: the model memorises its training data (more data, "
                             "fewer steps or dropout)")


@dataclass
class HealthWatch:
    """The four watches of a run and the warnings they raised, counted per kind (the run summary's)."""

    exploding: ExplodingWatch
    vanishing: VanishingWatch
    update_ratio: UpdateRatioWatch
    overfitting: OverfittingWatch
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @classmethod
    def from_config(cls, h, grad_clip: float) -> HealthWatch:
        """h: the [health] section; the exploding threshold is explode_factor x grad_clip (off without clipping)."""
        return cls(ExplodingWatch(h.explode_factor * grad_clip, h.explode_steps if grad_clip > 0 else 0),
                   VanishingWatch(h.vanish_ratio), UpdateRatioWatch(h.ratio_low, h.ratio_high),
                   OverfittingWatch(h.overfit_evals))

    def count(self, warnings: list[HealthWarning | None]) -> list[HealthWarning]:
        fired = [w for w in warnings if w is not None]
        for w in fired:
            self.counts[w.kind] += 1
        return fired

    def summary(self) -> str:
        """The run's last console line about its health: `health: no warnings`, or the counts per kind."""
        total = sum(self.counts.values())
        if total == 0:
            return "health: no warnings"
        return f"health: {total} warning(s): " + ", ".join(f"{k} {n}" for k, n in self.counts.items() if n)
