"""Multiple-choice records: reading and checking a JSONL file, and the token ids each choice is scored on.

A record is one JSON object per line::

    {"question": "What is 2+3?", "choices": ["4", "5", "6", "7"], "answer": 1}

``question`` (or ``context``) is a non-empty string, ``choices`` a non-empty list of non-empty strings and ``answer``
the index of the right choice. Any other key is ignored. A bad record -- a line that is not JSON, a missing key, no
choices, an empty choice, an answer index out of range -- is a ValueError naming the file, the record index (0-based,
blank lines skipped) and its line; the whole file is checked before any model work.

The ids follow the conventions of lm-evaluation-harness (``lm_eval``), so both give the same log-likelihoods:

* plain (the harness's default): the continuation is ``" " + choice`` (its default ``target_delimiter``); trailing
  whitespace of the context is moved into the continuation; the pair is encoded whole and split at the length of the
  encoded context: context ids = encode(context), continuation ids = encode(context + continuation)[len(context ids):].
* chat (``--apply_chat_template``): the context is one user turn followed by ``<|assistant|>`` (data.chat's
  render_prompt; the export's chat template renders the same ids), and the choice itself is the continuation: no
  delimiter, no closing ``<|end|>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data.chat import render_prompt

CONTEXT_KEYS = ("question", "context")
PLAIN_DELIMITER = " "  # the harness's default target_delimiter


@dataclass(frozen=True)
class ChoiceRecord:
    context: str
    choices: tuple[str, ...]
    answer: int


def load_choices(path: str | Path) -> list[ChoiceRecord]:
    """Every record of a JSONL file, checked; ValueError naming the file, record and line of the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--choices {path}: no such file")
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"--choices {path}: expected a .jsonl file (one JSON record per line), got {path.suffix!r}")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: record {len(records)} (line {line_no})"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            records.append(parse_record(raw, where))
    if not records:
        raise ValueError(f"--choices {path}: the file holds no records")
    return records


def parse_record(raw, where: str) -> ChoiceRecord:
    """One record, checked (see the module docstring); `where` starts every error message."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    key = next((k for k in CONTEXT_KEYS if k in raw), None)
    missing = [k for k in ("choices", "answer") if k not in raw] + ([] if key else ["question (or context)"])
    if missing:
        raise ValueError(f"{where}: missing {missing}; found keys {sorted(raw)}")
    context, choices, answer = raw[key], raw["choices"], raw["answer"]
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {context!r}")
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{where}: 'choices' must be a non-empty list of strings, got {choices!r}")
    for j, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise ValueError(f"{where}: choice {j} must be a non-empty string, got {choice!r}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be the index of a choice (0 to {len(choices) - 1}), got {answer!r}")
    return ChoiceRecord(context, tuple(choices), answer)


def plain_pair(tok, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of `choice` after `context` in plain text (the harness's _encode_pair)."""
    continuation = PLAIN_DELIMITER + choice
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation  # trailing whitespace belongs to the continuation
    context_ids = tok.encode(stripped)
    whole = tok.encode(stripped + continuation)
    return context_ids, whole[len(context_ids):]


def chat_pair(tok, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of `choice` as the assistant's reply to `context` as a user turn."""
    return render_prompt([{"role": "user", "content": context}], tok), tok.encode(choice)


def encode_pairs(records: list[ChoiceRecord], tok, chat: bool, block_size: int,
                 where: str) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of every (record, choice), record by record. A continuation longer than
    block_size tokens cannot be scored whole (contexts are cut from the left, never a choice): ValueError."""
    pair = chat_pair if chat else plain_pair
    out = []
    for i, rec in enumerate(records):
        for j, choice in enumerate(rec.choices):
            ctx, cont = pair(tok, rec.context, choice)
            assert ctx and cont, (i, j)  # a non-empty context and choice always give ids
            if len(cont) > block_size:
                raise ValueError(f"{where}: record {i}: choice {j} is {len(cont)} tokens, more than the model's "
                                 f"context of {block_size}; it cannot be scored whole")
            out.append((ctx, cont))
    return out


def first_best(scores: list[float]) -> int:
    """Index of the highest score; a tie goes to the first (as numpy.argmax, which the harness uses)."""
    best = 0
    for j, s in enumerate(scores):
        if s > scores[best]:
            best = j
    return best


def mc_accuracies(records: list[ChoiceRecord], logprobs: list[list[float]]) -> dict[str, float]:
    """mc_accuracy (highest summed log-prob), mc_accuracy_norm (divided by the choice's length in characters, the
    harness's acc_norm) and mc_accuracy_bytes (divided by its UTF-8 bytes, acc_bytes)."""
    assert len(records) == len(logprobs)
    hits = {"mc_accuracy": 0, "mc_accuracy_norm": 0, "mc_accuracy_bytes": 0}
    for rec, lps in zip(records, logprobs, strict=True):
        chars = [lp / len(c) for lp, c in zip(lps, rec.choices, strict=True)]
        nbytes = [lp / len(c.encode("utf-8")) for lp, c in zip(lps, rec.choices, strict=True)]
        hits["mc_accuracy"] += first_best(lps) == rec.answer
        hits["mc_accuracy_norm"] += first_best(chars) == rec.answer
        hits["mc_accuracy_bytes"] += first_best(nbytes) == rec.answer
    return {k: v / len(records) for k, v in hits.items()}
