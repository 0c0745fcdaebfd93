"""Held-out measurements shared by the trainer's validation and scripts/evaluate.py.

Sums are reduced over ranks once at the end (every rank takes part), then normalised:
    loss = summed nats / target tokens (every scored target; perplexity = exp(loss))
    bits_per_byte = summed nats of the text targets / (ln 2 x their UTF-8 bytes)
A text target is a scored target whose token has at least one byte: special tokens such as <|endoftext|> (0 bytes)
are left out of both sums (as nanochat does), since they encode no text whose bytes could pay for their nats.
This is the one definition, used by the trainer's validation and by scripts/evaluate.py. (DPO's preference
figures live with its stage: training/stages/dpo.py:preference_figures.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from data import chat
from data.synthetic import answer_matches
from data.tokenizer import END_ID
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
