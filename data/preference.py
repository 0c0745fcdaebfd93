"""Preference data for DPO: ``{prompt, chosen, rejected}`` records -> paired examples -> batches.

Sources are those of ``data.sft.load_records`` (``"synthetic"`` means ``data.synthetic.make_preferences``; local
``.jsonl``/``.json``/``.parquet`` files, folders, hub names; the same deterministic held-out part when there is no
validation split). A record has three fields, as in TRL:

- ``prompt``: a string (one user message) or a conversation (list of messages);
- ``chosen`` / ``rejected``: a string (one assistant message) or a list of messages (usually one assistant message).

Each side is rendered as the full conversation ``prompt + chosen`` (resp. ``rejected``) with ``data.chat``'s format;
labels cover only the completion's assistant content and end-of-turn tokens (never assistant turns inside the
prompt), shifted as everywhere (label at the last prompt position = first completion token). Both sides are
truncated on the right to ``block_size``; a pair where either side keeps no supervised label is dropped and counted.

Batches (``PreferenceBatcher.next_batch``), per rank, B = batch_size, all padded to one length T (the longest
sequence, chosen or rejected, of the step's global batch) so the trainer can run ``cat([chosen, rejected])`` in a
single forward::

    chosen_input_ids    long[B, T]   PAD_ID padding
    chosen_labels       long[B, T]   -100 except the chosen completion
    rejected_input_ids  long[B, T]
    rejected_labels     long[B, T]
    index               long[B]      position of each pair in the examples list (key of cached reference log-probs)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from data.chat import IGNORE_INDEX, render, render_prompt, to_example
from data.sft import (
    ExampleStream,
    as_messages,
    check_rank,
    load_records,
    present_fields,
    record_error,
    record_to_messages,
)
from data.sources import normalize_split
from data.tokenizer import PAD_ID

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


class PreferenceExample(NamedTuple):
    chosen_input_ids: list[int]  # [Lc] Lc <= block_size
    chosen_labels: list[int]  # [Lc] -100 except the chosen completion (shifted)
    rejected_input_ids: list[int]  # [Lr]
    rejected_labels: list[int]  # [Lr]


def render_pair_side(prompt: list[dict], completion: list[dict], tok: Any) -> tuple[list[int], list[bool]]:
    """Ids of ``prompt + completion`` and a mask supervising only the completion's assistant tokens."""
    ids, mask = render(prompt + completion, tok)
    # The format is a plain concatenation of turns, so the prompt's turns are exactly the generation prompt
    # without its trailing <|assistant|> marker; everything before that point is context.
    n_prompt = len(render_prompt(prompt, tok)) - 1
    assert len(ids) >= n_prompt
    return ids, [False] * n_prompt + mask[n_prompt:]


def record_to_pair(record: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) message lists of a record; ValueError naming ``where`` and the fields found."""
    missing = [k for k in REQUIRED_FIELDS if record.get(k) is None]
    if missing:
        raise ValueError(f"{where}: a preference record needs fields {list(REQUIRED_FIELDS)}; missing {missing}, "
                         f"found fields {present_fields(record)}")
    return (
        as_messages(record["prompt"], "user", where, "prompt"),
        as_messages(record["chosen"], "assistant", where, "chosen"),
        as_messages(record["rejected"], "assistant", where, "rejected"),
    )


def prompt_and_reference(record: dict, where: str) -> tuple[list[dict], str]:
    """A chat or preference record's prompt messages and reference answer: the last assistant turn (of the chosen
    side, for a pair), with everything before it as the prompt. ValueError naming ``where`` if there is none."""
    if record.get("chosen") is not None:
        prompt, chosen, _ = record_to_pair(record, where)
        messages = prompt + chosen
    else:
        messages = record_to_messages(record, where)
    last = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if not last:
        raise ValueError(f"{where}: no assistant turn to use as the reference answer")
    return messages[: last[-1]], messages[last[-1]]["content"]


def load_preferences(source: str | os.PathLike, split: str, tok: Any, block_size: int, seed: int = 0,
                     n_synthetic: int | None = None, cache_dir: str | None = None
                     ) -> tuple[list[PreferenceExample], dict]:
    """Load, render and tokenize one split of a preference dataset.

    Returns ``(examples, stats)``; stats = ``{"source", "split", "n_records", "n_examples", "n_dropped",
    "n_tokens", "kept"}`` (``kept``: the record index of each pair, in order). Raises ValueError on a malformed
    record (naming its index and file) or when no pair remains.
    """
    records, label = load_records(source, split, "dpo", seed, n_synthetic, cache_dir)
    split = normalize_split(split)
    examples: list[PreferenceExample] = []
    kept: list[int] = []  # record index of each pair
    for i, record in records:
        where = f"record {i} of {label}"
        try:
            prompt, chosen, rejected = record_to_pair(record, where)
            sides = []
            for name, completion in (("chosen", chosen), ("rejected", rejected)):
                if not any(m["role"] == "assistant" for m in completion):
                    raise ValueError(f"{name!r} has no assistant message (roles {[m['role'] for m in completion]})")
                sides.append(to_example(*render_pair_side(prompt, completion, tok), block_size))
        except ValueError as e:
            raise record_error(e, where) from None
        if sides[0] is not None and sides[1] is not None:
            examples.append(PreferenceExample(*sides[0], *sides[1]))
            kept.append(i)
    n_dropped = len(records) - len(examples)
    if not examples:
        why = "it has no records" if not records else (
            f"all {n_dropped} pairs lose every supervised token of a side when truncated to block_size={block_size}")
        raise ValueError(f"no preference pairs left in the {split!r} split of {label}: {why}")
    stats = {
        "source": label,
        "split": split,
        "n_records": len(records),
        "n_examples": len(examples),
        "n_dropped": n_dropped,
        "n_tokens": sum(len(e.chosen_input_ids) + len(e.rejected_input_ids) for e in examples),
        "kept": kept,
    }
    return examples, stats


class PreferenceBatcher:
    """Batches of preference pairs for one rank, resumable exactly; same stream and rank slicing as
    ``data.sft.SFTBatcher`` (ranks' batches concatenated == the single-process batch of ``B * world_size``)."""

    def __init__(self, examples: Sequence[PreferenceExample], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, block_size: int | None = None, pad_to_block: bool = False):
        check_rank(batch_size, rank, world_size)
        if not examples:
            raise ValueError("PreferenceBatcher needs at least one example")
        if pad_to_block and not block_size:
            raise ValueError("block_size is required when pad_to_block=True")
        longest = max(max(len(e.chosen_input_ids), len(e.rejected_input_ids)) for e in examples)
        if block_size and longest > block_size:
            raise ValueError(f"a pair has a {longest}-token side, more than block_size={block_size}; "
                             "load the examples with the same block_size")
        self.examples = examples
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.block_size, self.pad_to_block = block_size, pad_to_block
        self.stream = ExampleStream(len(examples), seed, shuffle)

    @property
    def epoch(self) -> float:
        """Fractional number of passes over the pairs so far (for logging)."""
        return self.stream.epoch + self.stream.offset / self.stream.n

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = self.stream.take(self.batch_size * self.world_size)
        # one length for chosen and rejected, and for all ranks, so [chosen; rejected] concatenate along dim 0
        T = self.block_size if self.pad_to_block else max(
            max(len(self.examples[i].chosen_input_ids), len(self.examples[i].rejected_input_ids)) for i in idx)
        mine = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        batch = {}
        for side in ("chosen", "rejected"):
            input_ids = torch.full((self.batch_size, T), PAD_ID, dtype=torch.long)
            labels = torch.full((self.batch_size, T), IGNORE_INDEX, dtype=torch.long)
            for row, i in enumerate(mine):
                ex = self.examples[i]
                ids, lab = getattr(ex, f"{side}_input_ids"), getattr(ex, f"{side}_labels")
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(lab)] = torch.tensor(lab)
            batch[f"{side}_input_ids"], batch[f"{side}_labels"] = input_ids, labels
        batch["index"] = torch.tensor(mine, dtype=torch.long)
        return batch

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.stream.load_state_dict(sd["stream"])
