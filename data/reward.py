"""Reward-model data: preference pairs or rated completions -> whole sequences scored at their closing <|end|>.

Two record formats (sources as ``data.sft.load_records`` reads them; ``"synthetic"`` is the built-in tasks):

- pairs, as DPO reads them (``data.preference.record_to_pair``): ``prompt`` + ``chosen`` + ``rejected`` (strings or
  message lists), plus an optional numeric ``margin`` (default 0): the Bradley-Terry loss asks the chosen score to
  beat the rejected one by it. Built-in: ``data.synthetic.make_preferences``.
- ratings: ``prompt`` + ``completion`` (a string, or a list of messages) + ``score`` (a number). A missing or
  non-numeric score is a ValueError naming the record and file. Built-in: ``data.synthetic.make_ratings`` (each
  answer's ``partial_credit``). ``standardize_scores`` shifts and scales scores by the training split's mean and std.

A side is rendered as the conversation ``prompt + completion`` (``data.chat``); its last token is the completion's
closing ``<|end|>``, where the reward is read. A side longer than ``block_size`` would lose that token: its pair or
record is dropped and counted (never truncated into a sequence without an end).

Batches (``RewardBatcher.next_batch``), per rank, B = batch_size, padded on the right with PAD_ID to one length T
(the longest sequence of the step's global batch)::

    pairs:   chosen_input_ids long[B, T], chosen_end long[B], rejected_input_ids long[B, T], rejected_end long[B],
             margin float[B]
    ratings: input_ids long[B, T], end long[B], score float[B]
    both:    index long[B] (each example's position in the examples list)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from data.preference import record_to_pair, render_pair_side
from data.sft import ExampleStream, as_messages, check_rank, load_records, present_fields, record_error
from data.sources import normalize_split
from data.tokenizer import END_ID, PAD_ID

KINDS = ("pairs", "ratings")


class RewardPair(NamedTuple):
    chosen_ids: list[int]  # [Lc] ends with the closing <|end|>, Lc <= block_size
    rejected_ids: list[int]  # [Lr]
    margin: float


class RatedCompletion(NamedTuple):
    ids: list[int]  # [L] ends with the closing <|end|>
    score: float


def _number(record: dict, key: str, where: str, default: float | None = None) -> float:
    """A finite number from record[key]; ValueError naming ``where`` when it is missing (without a default) or not
    a number (bools are not numbers here)."""
    value = record.get(key)
    if value is None:
        if default is not None:
            return default
        raise ValueError(f"{where}: a rated record needs a numeric {key!r}; it is missing (found fields "
                         f"{present_fields(record)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {key!r} must be a finite number, got {value!r}")
    return float(value)


def _sequence(prompt: list[dict], completion: list[dict], tok: Any, name: str) -> list[int]:
    if not any(m["role"] == "assistant" for m in completion):
        raise ValueError(f"{name!r} has no assistant message (roles {[m['role'] for m in completion]})")
    ids, _ = render_pair_side(prompt, completion, tok)
    assert ids[-1] == END_ID  # every rendered turn ends with <|end|>
    return ids


def _parse_pair(record: dict, where: str, tok: Any) -> RewardPair:
    prompt, chosen, rejected = record_to_pair(record, where)
    return RewardPair(_sequence(prompt, chosen, tok, "chosen"), _sequence(prompt, rejected, tok, "rejected"),
                      _number(record, "margin", where, default=0.0))


def _parse_rating(record: dict, where: str, tok: Any) -> RatedCompletion:
    missing = [k for k in ("prompt", "completion") if record.get(k) is None]
    if missing:
        raise ValueError(f"{where}: a rated record needs fields ['prompt', 'completion', 'score']; missing {missing}, "
                         f"found fields {present_fields(record)}")
    score = _number(record, "score", where)
    prompt = as_messages(record["prompt"], "user", where, "prompt")
    completion = as_messages(record["completion"], "assistant", where, "completion")
    return RatedCompletion(_sequence(prompt, completion, tok, "completion"), score)


def _length(ex) -> int:
    return max(len(ex.chosen_ids), len(ex.rejected_ids)) if isinstance(ex, RewardPair) else len(ex.ids)


def load_reward_data(kind: str, source: str | os.PathLike, split: str, tok: Any, block_size: int, seed: int = 0,
                     n_synthetic: int | None = None, cache_dir: str | None = None) -> tuple[list, dict]:
    """Load and tokenize one split of pairs or ratings (``kind``). Returns ``(examples, stats)``; stats =
    ``{"source", "split", "n_records", "n_examples", "n_dropped", "kept", "tasks"}`` (``kept``: each example's
    record index; ``tasks``: each example's ``task`` field, or None). ValueError on a malformed record (naming its
    index and file) or when nothing fits in block_size."""
    if kind not in KINDS:
        raise ValueError(f"rm.data={kind!r}: expected one of {KINDS}")
    records, label = load_records(source, split, "dpo" if kind == "pairs" else "ratings", seed, n_synthetic,
                                  cache_dir)
    parse = _parse_pair if kind == "pairs" else _parse_rating
    examples, kept, tasks = [], [], []
    for i, record in records:
        where = f"record {i} of {label}"
        try:
            ex = parse(record, where, tok)
        except ValueError as e:
            raise record_error(e, where) from None
        if _length(ex) <= block_size:
            examples.append(ex)
            kept.append(i)
            tasks.append(record.get("task"))
    n_dropped = len(records) - len(examples)
    if not examples:
        why = "it has no records" if not records else (
            f"all {n_dropped} are longer than block_size={block_size} tokens (their closing <|end|> would be cut)")
        raise ValueError(f"no reward-model {kind} left in the {normalize_split(split)!r} split of {label}: {why}")
    return examples, {"source": label, "split": normalize_split(split), "n_records": len(records),
                      "n_examples": len(examples), "n_dropped": n_dropped, "kept": kept, "tasks": tasks}


def score_stats(examples: Sequence[RatedCompletion]) -> tuple[float, float]:
    """Mean and (population) standard deviation of the ratings; ValueError when they are all equal."""
    scores = torch.tensor([e.score for e in examples], dtype=torch.float64)
    mean, std = scores.mean().item(), scores.std(correction=0).item()
    if not std > 0:
        raise ValueError(f"rm.standardize: every training score equals {mean}; there is no spread to scale by")
    return mean, std


def standardize_scores(examples: Sequence[RatedCompletion], mean: float, std: float) -> list[RatedCompletion]:
    return [e._replace(score=(e.score - mean) / std) for e in examples]


class RewardBatcher:
    """Batches of pairs or ratings for one rank, resumable exactly; the stream and rank slicing of
    ``data.sft.SFTBatcher`` (ranks' batches concatenated == the single-process batch of ``B * world_size``)."""

    def __init__(self, examples: Sequence[RewardPair | RatedCompletion], batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        check_rank(batch_size, rank, world_size)
        if not examples:
            raise ValueError("RewardBatcher needs at least one example")
        self.examples, self.batch_size, self.rank, self.world_size = examples, batch_size, rank, world_size
        self.pairs = isinstance(examples[0], RewardPair)
        self.stream = ExampleStream(len(examples), seed, shuffle)

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = self.stream.take(self.batch_size * self.world_size)
        T = max(_length(self.examples[i]) for i in idx)  # one length on every rank (and for chosen and rejected)
        mine = [self.examples[i] for i in idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]]
        batch = {"index": torch.tensor(idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])}
        if self.pairs:
            for side in ("chosen", "rejected"):
                batch[f"{side}_input_ids"], batch[f"{side}_end"] = _pad([getattr(e, f"{side}_ids") for e in mine], T)
            batch["margin"] = torch.tensor([e.margin for e in mine], dtype=torch.float32)
        else:
            batch["input_ids"], batch["end"] = _pad([e.ids for e in mine], T)
            batch["score"] = torch.tensor([e.score for e in mine], dtype=torch.float32)
        return batch

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.stream.load_state_dict(sd["stream"])


def _pad(seqs: list[list[int]], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and each row's end position, the index of its last real token (B,)."""
    ids = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
