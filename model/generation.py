"""Batched sampling for online RL: many prompts of different lengths decoded together with one KV cache.

The prompts are left-padded to a common length P, so every row's last prompt token sits in column P - 1 and the
new tokens of all rows go into the same column at each step. The padding is kept out of the attention by a
key-padding mask (GPT.forward's pad_mask) and each row counts its positions from its first real token, so a row
computes what it would compute alone, unpadded (up to float rounding).

Sampling uses the Gumbel-max trick with noise that is a pure function of (row key, decode step): a row's
completion depends on its prompt and its key only, not on its neighbours in the batch, the batch size or the number
of ranks, and no torch random state is read or changed. The caller derives the row keys from (seed, step, global
prompt index, completion index).

Two savings that change no sample: the prefill runs once per distinct prompt (an RL batch holds each prompt G
times) and its keys, values and last logits are copied to the copies' rows; and once half the rows the decode holds
have stopped, the cache drops them, so a finished row costs no more forwards (completions of the built-in tasks run
from 2 to ~17 tokens). Only running rows draw noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from model.gpt import KVCache


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, P + M) left-padded prompts then the generated tokens (pad_id after the stop)
    pad_mask: torch.Tensor  # (N, P + M) bool, True on real tokens (prompt tokens and kept completion tokens)
    positions: torch.Tensor  # (N, P + M) long, each row's positions 0.. over its real tokens (pads: 0)
    completion_mask: torch.Tensor  # (N, M) bool, True on completion tokens up to and including the first stop
    prompt_len: int  # P, the padded prompt length (completions start at column P)
    forward_tokens: int  # the tokens the decode's forwards ran on: U x P for the prefill, the held rows per step


def left_pad(prompts: list[list[int]], pad_id: int, device, pad_to: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids (N, P), pad_mask (N, P) bool and positions (N, P) long, P the longest
    prompt (or pad_to, when given: the RL stage pads every rank's rows to one length, so that a row's arithmetic
    does not depend on which rank holds it): each row's tokens at its right end, positions 0..len-1 over them, pads
    (pad_id, position 0) before."""
    if not prompts:
        raise ValueError("no prompts to pad")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
    p = max(len(prompt) for prompt in prompts)
    if pad_to is not None:
        if pad_to < p:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({p} tokens)")
        p = pad_to
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    pad_mask = torch.zeros(len(prompts), p, dtype=torch.bool)
    positions = torch.zeros(len(prompts), p, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        ids[i, p - n :] = torch.tensor(prompt, dtype=torch.long)
        pad_mask[i, p - n :] = True
        positions[i, p - n :] = torch.arange(n)
    return ids.to(device), pad_mask.to(device), positions.to(device)


# ---------------------------------------------------------------- keyed noise
_MASK64 = 2**64 - 1


def hashed_key(namespace: str, *parts: int) -> int:
    """A row's sampling key (int64): blake2b of "namespace/part/part/...", so that a sample depends only on what
    the parts name (a seed, a prompt's global index, a sample number), never on the rank or batch that draws it."""
    digest = hashlib.blake2b("/".join(map(str, (namespace, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def noise_seed(key: int, step: int) -> int:
    """The seed of one row's noise at one decode step: splitmix64's finaliser (Steele et al. 2014) over the row key
    and the step, a 63-bit value (what torch.Generator.manual_seed takes) that changes with every bit of either."""
    x = (key * 0x9E3779B97F4A7C15 + (step + 1) * 0xD1B54A32D192ED03) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def gumbel_noise(row_keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(N, V) standard Gumbel noise, a pure function of (row key, decode step): row i is -log(-log(u)) of V
    uniforms drawn by a private generator on row_keys' device, seeded with noise_seed(key_i, step) (no global torch
    random state read or changed), fp32 on that device. One small draw per row: a hash of every (row, token) in
    torch ops cost ~50 integer passes over (N, V), tens of times more on a CPU. On a GPU the rows are drawn there
    (CUDA's Philox generator: the same key gives the same noise on every GPU and rank, other numbers than the CPU's
    Mersenne Twister), so no (N, V) float64 block is made on the host and copied over at each decode step; not
    timed yet, no GPU check has run this stage."""
    if step < 0 or vocab <= 0:
        raise ValueError(f"gumbel_noise needs step >= 0 and vocab > 0, got step={step}, vocab={vocab}")
    device = row_keys.device
    gen = torch.Generator(device=device)
    rows = []
    for key in row_keys.tolist():
        gen.manual_seed(noise_seed(key, step))
        rows.append(torch.rand(vocab, generator=gen, dtype=torch.float64, device=device))
    if not rows:  # every row has stopped (a fixed-length decode runs on)
        return torch.empty(0, vocab, device=device)
    u = torch.stack(rows).clamp_(min=2.0**-60)  # (N, V) in (0, 1): rand can return exactly 0
    return (-torch.log(-torch.log(u))).float()


# ---------------------------------------------------------------- generation
def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """The distinct prompts in order of first appearance, and rows (N,) long: prompts[i] == distinct[rows[i]]. An RL
    batch repeats each prompt G times; its prefill then runs once per distinct prompt instead of once per row."""
    first: dict[tuple[int, ...], int] = {}
    rows = [first.setdefault(tuple(prompt), len(first)) for prompt in prompts]
    distinct = [list(prompt) for prompt in first]
    return distinct, torch.tensor(rows, dtype=torch.long)


def _check_request(cfg, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                   row_keys: torch.Tensor, pad_to: int | None) -> None:
    if not prompts:
        raise ValueError("generate_rollouts got no prompts")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 decodes greedily)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if row_keys.shape != (len(prompts),):
        raise ValueError(f"row_keys of shape {tuple(row_keys.shape)}: expected one key per prompt, ({len(prompts)},)")
    p = max([len(prompt) for prompt in prompts] + [pad_to or 0])
    if p + max_new_tokens > cfg.block_size:
        raise ValueError(f"the longest prompt ({p} tokens) + max_new_tokens={max_new_tokens} = {p + max_new_tokens} "
                         f"exceeds block_size={cfg.block_size}")


def _pick(logits: torch.Tensor, temperature: float, row_keys: torch.Tensor, step: int) -> torch.Tensor:
    """logits (N, V) -> tokens (N,): greedy at temperature 0, else the Gumbel-max trick, argmax(l / T + G), an exact
    sample of softmax(l / T)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    noise = gumbel_noise(row_keys, step, logits.shape[-1]).to(logits.device)
    return (logits.float() / temperature + noise).argmax(dim=-1)


@torch.no_grad()
def generate_rollouts(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                      row_keys: torch.Tensor, stop_token: int, pad_id: int, fixed_length: bool = False,
                      pad_to: int | None = None) -> Rollout:
    """Sample a completion for every prompt, all N rows in one batch, with a KV cache.

    model: a GPT, or a wrapper around one (DDP's .module; an FSDP2 module is the GPT itself); it is called as
    model(...), so a forward that is a collective runs on every rank. row_keys (N,) int64: row i's sampling key.
    A row stops at its first stop_token (kept); later columns hold pad_id. Decoding ends once every row has
    stopped, unless fixed_length: then exactly max_new_tokens steps run (under FSDP every rank must run the same
    number of forwards). pad_to: the padded prompt length P (default: the longest prompt). The model is in eval
    mode meanwhile; its mode is restored after."""
    net = getattr(model, "module", model)
    _check_request(net.cfg, prompts, max_new_tokens, temperature, row_keys, pad_to)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, net, prompts, max_new_tokens, temperature, row_keys, stop_token, pad_id, fixed_length,
                       pad_to)
    finally:
        model.train(was_training)


def _decode(model, net, prompts, max_new_tokens, temperature, row_keys, stop_token, pad_id,
            fixed_length, pad_to) -> Rollout:
    param = next(net.parameters())
    distinct, rows = distinct_prompts(prompts)  # U prompts, rows (N,): row i's prompt is distinct[rows[i]]
    ids, prompt_mask, prompt_pos = left_pad(distinct, pad_id, param.device, pad_to)  # (U, P) each
    u, p = ids.shape
    n = len(prompts)
    cache = KVCache(net.cfg, u, p + max_new_tokens, param.device, param.dtype)
    logits = model(ids, prompt_pos, None, cache, pad_mask=prompt_mask)[:, -1]  # (U, V): column P-1 is real in all
    forward_tokens = u * p
    if u < n:  # G completions of each prompt share one prefill: copy its keys, values and logits to the G rows
        rows = rows.to(param.device)
        cache.select_rows(rows)
        logits, ids, prompt_mask, prompt_pos = logits[rows], ids[rows], prompt_mask[rows], prompt_pos[rows]
    lengths = prompt_mask.sum(dim=1)  # (N,) real prompt lengths
    live = torch.arange(n, device=ids.device)  # (L,) the rows the cache and the logits hold, L <= N
    done = torch.zeros(n, dtype=torch.bool, device=ids.device)
    tokens, kept = [], []  # per step: (N,) tokens and whether each is part of its row's completion
    for step in range(max_new_tokens):
        # Only the rows still running pick a token (a stopped row's noise would be drawn for nothing: each row's
        # draw is a pure function of its key and the step, so leaving the others out changes no sample).
        running = ~done[live]  # (L,)
        nxt = torch.full_like(done, pad_id, dtype=torch.long)  # (N,)
        picked = live[running]
        nxt[picked] = _pick(logits[running], temperature, row_keys[picked.to(row_keys.device)], step)
        kept.append(~done)
        tokens.append(nxt)
        done = done | (nxt == stop_token)
        if step == max_new_tokens - 1 or (not fixed_length and bool(done.all())):
            break
        still = ~done[live]  # (L,)
        if 0 < int(still.sum()) <= len(live) // 2:  # half the held rows have stopped: stop computing them
            cache.select_rows(still.nonzero().squeeze(1))
            live = live[still]
        keys_real = torch.cat([prompt_mask[live], torch.stack(kept, dim=1)[live]], dim=1)  # (L, P + step + 1)
        logits = model(nxt[live][:, None], (lengths[live] + step)[:, None], None, cache, pad_mask=keys_real)[:, -1]
        forward_tokens += len(live)
    completion = torch.stack(tokens, dim=1)  # (N, M)
    completion_mask = torch.stack(kept, dim=1)  # (N, M)
    steps = torch.arange(completion.shape[1], device=ids.device)
    completion_pos = torch.where(completion_mask, lengths[:, None] + steps[None, :], 0)  # (N, M)
    return Rollout(input_ids=torch.cat([ids, completion], dim=1),
                   pad_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                   positions=torch.cat([prompt_pos, completion_pos], dim=1),
                   completion_mask=completion_mask, prompt_len=p, forward_tokens=forward_tokens)
