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


# ----------------------------------------------------------------------------------------------- online RL
ADVANTAGE_EPS = 1e-4  # added to the standard deviation: a group whose rewards are all equal gets advantage 0
SCALE_REWARDS = ("group", "batch", "none")


def kl_estimate(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(r - p) - (r - p) - 1, fp32, same shape as the inputs (Schulman's "k3").

    p, r: the policy's and the reference's log-probs of tokens sampled from the policy. The estimate is >= 0 for
    every token, 0 where p == r, and its mean over the policy's samples is KL(policy || reference) (unbiased: the
    expectation of exp(r - p) under the policy is 1). As a loss term, though, its gradient is not that of
    KL(policy || reference): with samples held fixed, d/dtheta of E_policy[exp(r - p) - (r - p) - 1] taken through p
    only is E_policy[(1 - exp(r - p)) grad p], which is the gradient of KL(reference || policy). Both vanish at
    policy == reference and keep the policy near it; the value logged as train/kl is the first KL."""
    d = ref_logps.float() - policy_logps.float()
    return torch.exp(d) - d - 1


def categorical_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) = sum_v p(v) (log p(v) - log r(v)) of the distributions softmax(logits) over
    the last dimension, fp32, one value per position: (..., V) -> (...). What kl_estimate estimates from one sampled
    token per position; evaluate.py --kl-reference measures it over the whole vocabulary instead."""
    logp = F.log_softmax(policy_logits.float(), dim=-1)
    logr = F.log_softmax(reference_logits.float(), dim=-1)
    return (logp.exp() * (logp - logr)).sum(dim=-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     batch_std: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of rewards (N,) whose rows come in consecutive groups of group_size completions of
    one prompt -> (advantages (N,), each group's sample std (N / group_size,)), fp32.

    advantage = (r - group mean) / (s + 1e-4), s the group's sample standard deviation (scale="group"), the
    batch's (scale="batch": batch_std, the sample std of every reward of the global batch, which the caller
    reduces over ranks), or 1 - 1e-4 (scale="none": centred only). A group of equal rewards gets advantage 0."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"rl.scale_rewards={scale!r}: expected one of {SCALE_REWARDS}")
    n = rewards.shape[0]
    assert n % group_size == 0 and group_size >= 2, (n, group_size)
    groups = rewards.float().view(n // group_size, group_size)  # (B, G)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(n)  # (N,)
    group_std = groups.std(dim=1)  # (B,) sample std (correction 1)
    if scale == "group":
        return centred / (group_std.repeat_interleave(group_size) + ADVANTAGE_EPS), group_std
    if scale == "batch":
        assert batch_std is not None, "scale='batch' needs the global batch's std"
        return centred / (torch.as_tensor(batch_std, dtype=torch.float32) + ADVANTAGE_EPS), group_std
    return centred, group_std


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017), to be minimised, fp32.

    logps, old_logps (N, M): log-probs of the sampled tokens under the policy being trained and under the policy
    that generated them; advantages (N,) one per completion. With ratio = exp(logps - old_logps):
        loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
    Returns (loss (N, M), clipped_low (N, M), clipped_high (N, M)): the tokens whose ratio the clip holds, below
    1 - eps with A < 0 or above 1 + eps with A > 0 (their gradient is zero)."""
    ratio = torch.exp(logps.float() - old_logps.float())  # (N, M); exactly 1 when old_logps = logps.detach()
    a = advantages.float()[:, None]  # (N, 1)
    loss = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    return loss, (ratio < 1 - clip_eps) & (a < 0), (ratio > 1 + clip_eps) & (a > 0)
