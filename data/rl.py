"""Prompts for online RL: records -> rendered prompts plus the columns a reward function reads.

Sources are those of ``data.sft.load_records`` (``"synthetic"``: the built-in tasks, their held-out split for
validation; local ``.jsonl``/``.json``/``.parquet``/``.csv`` files and folders; Hub names). A record is either

- ``prompt`` (a string: one user message, or a list of messages) plus any other columns, which reach the reward
  functions unchanged, as TRL passes them (e.g. ``answer``, ``task``, a test suite); or
- a conversation ``messages`` (or ``prompt`` + ``completion``, or a preference pair) whose last assistant turn is
  the reference answer: it becomes the ``answer`` column, and the turns before it the prompt. The built-in tasks are
  read this way (their SFT records).

The built-in reward (exact match) needs an ``answer`` column. A prompt whose rendering plus ``max_new_tokens``
does not fit in ``block_size`` is dropped and counted (generation never truncates a prompt).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from data.chat import render_prompt
from data.preference import prompt_and_reference
from data.sft import as_messages, load_records, present_fields, record_error
from data.sources import normalize_split


class RLPrompt(NamedTuple):
    ids: list[int]  # [P] the rendered prompt, ending with <|assistant|>
    prompt: Any  # the record's prompt as reward functions receive it: a string or a list of messages
    columns: dict  # the record's other columns (answer, task, ...), passed to reward functions by name
    where: str  # "record I of FILE": named in a reward's error


def record_to_prompt(record: dict, where: str) -> tuple[Any, list[dict], dict]:
    """(prompt as given, prompt messages, other columns) of one record; ValueError naming ``where``."""
    if record.get("prompt") is not None and record.get("completion") is None and record.get("chosen") is None:
        prompt = record["prompt"]
        columns = {k: v for k, v in record.items() if k != "prompt"}
        return prompt, as_messages(prompt, "user", where, "prompt"), columns
    if record.get("messages") is None and record.get("prompt") is None:
        raise ValueError(f"{where}: an RL record needs 'prompt' (plus the columns its reward reads) or a "
                         f"conversation whose last assistant turn is the answer; found fields {present_fields(record)}")
    messages, answer = prompt_and_reference(record, where)
    if not messages:
        raise ValueError(f"{where}: the conversation has no turn before its last assistant turn to use as the prompt")
    dropped = ("messages", "prompt", "completion", "chosen", "rejected")
    columns = {k: v for k, v in record.items() if k not in dropped} | {"answer": answer}
    return messages, messages, columns


def load_rl_prompts(source: str | os.PathLike, split: str, tok: Any, block_size: int, max_new_tokens: int,
                    seed: int = 0, n_synthetic: int | None = None, cache_dir: str | None = None
                    ) -> tuple[list[RLPrompt], dict]:
    """Load and render one split's prompts. Returns ``(prompts, stats)``; stats = ``{"source", "split",
    "n_records", "n_examples", "n_dropped"}``. ValueError on a malformed record (naming its index and file) or when
    no prompt leaves room for max_new_tokens."""
    records, label = load_records(source, split, "sft", seed, n_synthetic, cache_dir)
    prompts = []
    for i, record in records:
        where = f"record {i} of {label}"
        try:
            given, messages, columns = record_to_prompt(record, where)
            ids = render_prompt(messages, tok)
        except ValueError as e:
            raise record_error(e, where) from None
        if len(ids) + max_new_tokens <= block_size:
            prompts.append(RLPrompt(ids, given, columns, where))
    n_dropped = len(records) - len(prompts)
    if not prompts:
        why = "it has no records" if not records else (
            f"all {n_dropped} prompts leave no room for rl.max_new_tokens={max_new_tokens} in block_size={block_size}")
        raise ValueError(f"no RL prompts left in the {normalize_split(split)!r} split of {label}: {why}")
    return prompts, {"source": label, "split": normalize_split(split), "n_records": len(records),
                     "n_examples": len(prompts), "n_dropped": n_dropped}
