"""Reward functions with TRL's signature, imported by the RL tests as tests.rl_rewards:NAME (--rl.reward)."""

from __future__ import annotations

import json
import math
import os


def digit_share(prompts, completions, completion_ids, **columns):
    """The share of a completion's characters that are digits: a reward a tiny pre-trained model's samples vary in."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def record_call(prompts, completions, completion_ids, **columns):
    """Writes what it was called with to $RL_REWARD_LOG (one JSON line per call); rewards the completion length."""
    with open(os.environ["RL_REWARD_LOG"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                            "columns": columns}) + "\n")
    return [float(len(ids)) for ids in completion_ids]


def raises_on_count(prompts, completions, completion_ids, task, **columns):
    if "count" in task:
        raise RuntimeError("cannot score count prompts")
    return [0.0] * len(completions)


def too_few(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)


def not_finite(prompts, completions, **columns):
    return [math.nan] + [0.0] * (len(completions) - 1)


def constant(prompts, completions, **columns):
    """The same reward for every completion: every group's rewards are equal."""
    return [0.3] * len(completions)


def fails_on_rank1(prompts, completions, **columns):
    """Fails only in the process of rank 1 (a torchrun launch sets RANK)."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 cannot score")
    return [0.0] * len(completions)


def odd_first_token(prompts, completions, completion_ids, **columns):
    """1 when the first generated token id is odd: a reward that varies within groups sampled from any model."""
    return [float(ids[0] % 2) for ids in completion_ids]


def digit_share_on_sort(prompts, completions, completion_ids, task, **columns):
    """digit_share on `sort` prompts, 0 on the others: groups of the other tasks always have equal rewards."""
    shares = digit_share(prompts, completions, completion_ids)
    return [s if t == "sort" else 0.0 for s, t in zip(shares, task, strict=True)]
