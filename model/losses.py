"""Losses as pure functions with explicit reductions.

They return sums and counts, never means: the trainer normalises once, by the number of target tokens of the whole
step (all micro-batches, all ranks), so gradient accumulation and data parallelism give the same update as one big
batch. Targets are already shifted (the label at position t is token t+1); IGNORE marks unsupervised positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The label of unsupervised positions is defined once, by the data that writes it (data/ imports nothing of model/).
from data.chat import IGNORE_INDEX as IGNORE

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


def token_ce_sum(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy, computed in fp32.

    logits (B, T, V), targets (B, T) -> (loss_sum: fp32 scalar, n_tokens: int64 scalar). A batch whose targets are
    all ignored gives (0, 0) with a zero (not NaN) gradient.
    """
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return loss_sum, (targets != ignore_index).sum()


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Log-probability of each label, fp32, 0 where ignored: logits (B, T, V), labels (B, T) -> (B, T)."""
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    # log_softmax gathered at the label = -cross_entropy; cross_entropy avoids materialising (B, T, V) log-probs.
    logp = -F.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none")  # (B, T)
    return logp * mask


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probability of the supervised labels: -> (logp_sum (B,), n_tokens (B,))."""
    return token_logps(logits, labels, ignore_index).sum(dim=-1), (labels != ignore_index).sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation losses per pair -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).

    With h = (pi_c - pi_r) - (ref_c - ref_r), the difference of policy and reference log-ratios, and eps the
    label smoothing (the assumed probability that a preference label is flipped):
      sigmoid  -(1-eps) log s(beta h) - eps log s(-beta h)        DPO (Rafailov et al. 2023); eps > 0 is cDPO
      robust   (-(1-eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)   Chowdhury et al. 2024, unbiased
                                                                  under label noise of rate eps
      ipo      (h - 1/(2 beta))^2                                 IPO (Azar et al. 2023); pass mean log-probs
      hinge    max(0, 1 - beta h)                                 SLiC-style hinge
    Rewards are beta * (policy - reference) log-ratios, detached. Inputs are whatever log-probs the caller chose
    (sums, or per-token means for IPO).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type={loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing={label_smoothing} must be in [0, 0.5)")
    if beta <= 0:
        raise ValueError(f"dpo beta={beta} must be positive")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Reward-model loss per pair (Bradley-Terry): -log sigmoid(r_chosen - r_rejected - margin), fp32 (B,).

    margin (B,) or a number: how much higher the chosen score must be (0 = plain Bradley-Terry); callers sum."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float() - margin)


def score_mse(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error of predicted scores against rated scores, per completion, fp32 (B,); callers sum."""
    return (scores.float() - targets.float()) ** 2
