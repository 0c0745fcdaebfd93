"""Held-out measurements shared by the trainer's validation and scripts/evaluate.py.

Sums are reduced over ranks once at the end (every rank takes part), then normalised:
    loss = summed nats / target tokens (every scored target; perplexity = exp(loss))
    bits_per_byte = summed nats of the text targets / (ln 2 x their UTF-8 bytes)
A text target is a scored target whose token has at least one byte: special tokens such as <|endoftext|> (0 bytes)
are left out of both sums (as nanochat does), since they encode no text whose bytes could pay for their nats.
This is the one definition, used by the trainer's validation and by scripts/evaluate.py. (DPO's preference
figures live with its stage: training/stages/dpo.py:preference_figures.) Chat replies: greedy exact match
(chat_accuracy), and K sampled replies per prompt counted as groups (sampled_replies, group_counts, group_figures).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from data import chat
from data.synthetic import answer_matches
from data.tokenizer import END_ID, PAD_ID
from model.generation import generate_rollouts, hashed_key
from model.gpt import GPT
from model.losses import IGNORE, token_logps
from training.distributed import all_reduce


def bpb_sums(nats: torch.Tensor, targets: torch.Tensor, byte_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's bits-per-byte sums: (nats of the text targets, their UTF-8 bytes). nats and targets (B, T),
    byte_lengths (V,) from Tokenizer.token_byte_lengths(); ignored targets and 0-byte (special) tokens count in
    neither sum."""
    nbytes = byte_lengths[targets.clamp(min=0)] * (targets != IGNORE)  # (B, T), 0 where ignored
    return (nats * (nbytes > 0)).sum(), nbytes.sum()


@torch.no_grad()
def lm_figures(model, batches: Iterable, byte_lengths: torch.Tensor | None, autocast) -> dict[str, float]:
    """Loss (and bits per byte when byte_lengths is given) over (inputs, targets) batches (module docstring)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, targets, text nats, text bytes
    for x, y in batches:
        with autocast:
            logits = model(x)
        nats = -token_logps(logits, y).double()  # (B, T), 0 where ignored
        sums[0] += nats.sum()
        sums[1] += (y != IGNORE).sum()
        if byte_lengths is not None:
            text_nats, text_bytes = bpb_sums(nats, y, byte_lengths)
            sums[2] += text_nats
            sums[3] += text_bytes
    model.train(was_training)
    nats, tokens, text_nats, nbytes = all_reduce(sums).tolist()
    if tokens == 0:
        raise ValueError("validation scored no tokens")
    figures = {"loss": nats / tokens, "perplexity": math.exp(min(nats / tokens, 700)), "tokens": int(tokens)}
    if byte_lengths is not None:
        figures["bpb"] = text_nats / (math.log(2) * nbytes)
        figures["bytes"] = int(nbytes)
    return figures


@torch.no_grad()
def chat_accuracy(model, tok, items: list[tuple[list[dict], str]], autocast, device, max_new_tokens: int = 32) -> float:
    """Exact-match accuracy of greedy replies (stopping at <|end|>) against reference answers.

    Every rank answers every item (deterministic, and safe when the forward is a collective, as under FSDP)."""
    was_training = model.training
    model.eval()
    correct = 0
    for messages, reference in items:
        idx = torch.tensor([chat.render_prompt(messages, tok)], device=device)
        with autocast:
            out = GPT.generate(model, idx, max_new_tokens, temperature=0.0, stop_tokens=(END_ID,))
        reply = chat.decode_reply(out[0, idx.shape[1]:].tolist(), tok)
        correct += answer_matches(reply, reference)
    model.train(was_training)
    return correct / max(len(items), 1)


@torch.no_grad()
def sampled_replies(model, tok, prompt_ids: list[int], k: int, temperature: float, max_new_tokens: int, seed: int,
                    prompt_index: int, device, with_ids: bool = False) -> list[str] | tuple[list[str], list[list[int]]]:
    """k replies to one rendered chat prompt, sampled at `temperature` (0: greedy) in one batch of k rows with the
    KV cache (model/generation.py: the RL stage's sampler), each up to its first <|end|> or max_new_tokens. Row j's
    noise is keyed by (seed, prompt_index, j): a reply depends on neither the rank that draws it nor other prompts.
    with_ids: also each reply's generated ids (its <|end|> included), what a reward model scores in RL."""
    keys = torch.tensor([hashed_key("gptrain-eval", seed, prompt_index, j) for j in range(k)], dtype=torch.long,
                        device=device)
    ro = generate_rollouts(model, [prompt_ids] * k, max_new_tokens, temperature, keys, END_ID, PAD_ID)
    completions = ro.input_ids[:, ro.prompt_len:]  # (k, M): pad_id after each row's stop
    ids = [row[mask].tolist() for row, mask in zip(completions, ro.completion_mask, strict=True)]
    texts = [chat.decode_reply(i, tok) for i in ids]
    return (texts, ids) if with_ids else texts


def judge_counts(right: list[bool], scores: torch.Tensor) -> torch.Tensor:
    """K replies to one prompt, right or wrong, and a reward model's scores (K,) -> float64 sums (3,): whether its
    highest-scored reply is right (best-of-K by the reward model; a tie goes to the first), the (right, wrong)
    pairs it scores right above wrong, and those pairs. Sums, so that prompts, tasks and ranks add up."""
    best = float(right[int(scores.argmax())])
    pairs = [(a, b) for a in range(len(right)) for b in range(len(right)) if right[a] and not right[b]]
    ordered = sum(float(scores[a] > scores[b]) for a, b in pairs)
    return torch.tensor([best, ordered, len(pairs)], dtype=torch.float64)


def judge_figures(counts: torch.Tensor, prompts: float) -> dict[str, float]:
    """judge_counts' sums over `prompts` prompts -> best_of_k_accuracy and judge_pair_accuracy (left out when no
    prompt mixes right and wrong replies: there is nothing to rank)."""
    best, ordered, pairs = counts.tolist()
    return {"best_of_k_accuracy": best / prompts} | ({"judge_pair_accuracy": ordered / pairs} if pairs else {})


def group_counts(right: torch.Tensor) -> torch.Tensor:
    """right (P, K) bool, K sampled replies to each of P prompts scored right or wrong -> float64 sums (5,): right
    replies, replies, prompts, prompts with a right reply, prompts whose K replies are all right or all wrong (a
    group that gives a group-relative advantage nothing). Sums, so that ranks and tasks add up before
    group_figures."""
    per_prompt = right.bool().sum(dim=1)  # (P,) right replies per prompt
    p, k = right.shape
    return torch.tensor([per_prompt.sum().item(), p * k, p, (per_prompt > 0).sum().item(),
                         ((per_prompt == 0) | (per_prompt == k)).sum().item()], dtype=torch.float64)


def group_figures(counts: torch.Tensor) -> dict[str, float]:
    """group_counts' sums -> sampled_accuracy (the share of right replies: mean@K), pass_at_k (the share of prompts
    with at least one right reply among their K) and all_equal_share (the share of all-right or all-wrong prompts)."""
    right, replies, prompts, passed, equal = counts.tolist()
    return {"sampled_accuracy": right / replies, "pass_at_k": passed / prompts, "all_equal_share": equal / prompts}
