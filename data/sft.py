"""Supervised fine-tuning data: conversation records -> (input_ids, labels) examples -> padded or packed batches.

Sources (``load_sft``), parsed by ``data.sources.parse_source`` (the grammar, the split names and the held-out
rules are in that module's docstring) and read through ``datasets.load_dataset``:

- ``"synthetic"``: the built-in verifiable tasks of ``data.synthetic`` (generated in memory from ``seed``);
- a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file. It has no splits, so a fixed, deterministic
  held-out part (5%, at most 500 records, chosen by a seeded permutation that does not depend on the run's seed)
  is the ``val`` split and the rest is ``train``;
- a local folder of one file format (split names from its file names: ``train.jsonl``, ``validation.jsonl``, ...;
  a folder mixing formats is refused, as for pre-training: ``datasets`` would read only its commonest) or a hub dataset
  (``NAME``, ``hf:NAME`` or ``hf:NAME:CONFIG``): its own splits are used (``val`` is the split named ``validation``,
  ``valid``, ``val``, ``dev`` or ``test``); without any of those the held-out part is carved from ``train`` as for a
  file.

Records, in the formats TRL uses:

- ``{"messages": [{"role", "content"}, ...]}``;
- ``{"prompt": ..., "completion": ...}`` where each side is a string or a list of messages; a string prompt becomes
  one user message, a string completion one assistant message.

Each record is rendered with ``data.chat.render`` (assistant content + end-of-turn supervised) and shifted by
``data.chat.to_example``. Conversations longer than ``block_size`` are truncated on the right; one whose
supervised tokens all fall beyond the cut is dropped and counted in the returned stats.

Batches (``SFTBatcher.next_batch``), per rank, B = batch_size::

    input_ids  long[B, T]   token ids; padding is PAD_ID
    labels     long[B, T]   next-token targets, -100 where unsupervised (prompt turns, markers, padding)
    positions  long[B, T]   only when packing: position of each token within its own example (restarts at 0)
    doc_ids    long[B, T]   only when packing: example number within the row; the row's padding has its own id

Without packing T is the longest example of the step's global batch (or ``block_size`` with ``pad_to_block``);
with packing T = ``block_size`` and several whole examples share a row (attention must then be block-diagonal by
``doc_ids``: the model's job). Labels never cross an example boundary because each example carries its own shifted
labels: the last position of an example is labelled with that example's own last token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from data.chat import IGNORE_INDEX, render, to_example
from data.sources import (
    RECORD_FORMATS,
    Source,
    dataset_split_names,
    datasets_module,
    find_bad_json,
    local_files,
    normalize_split,
    parse_source,
)
from data.tokenizer import PAD_ID

HELD_OUT_FRACTION = 0.05  # share of a split-less dataset held out for validation
HELD_OUT_MAX = 500  # ... capped, so a big dataset does not lose much training data
_HELD_OUT_SEED = 1234  # fixed: the held-out part must not move when the training seed changes


class SFTExample(NamedTuple):
    input_ids: list[int]  # [L] L <= block_size
    labels: list[int]  # [L] shifted targets, -100 where unsupervised; at least one supervised


# --- reading records ----------------------------------------------------------------------------------------------


def _held_out(n: int) -> set[int]:
    """Indices of the deterministic validation part of an ``n``-record dataset that has no validation split."""
    if n < 2:
        return set()  # nothing can be spared
    k = min(HELD_OUT_MAX, max(1, round(n * HELD_OUT_FRACTION)))
    return set(np.random.default_rng(_HELD_OUT_SEED).permutation(n)[:k].tolist())


def load_records(source: str | os.PathLike, split: str, kind: str = "sft", seed: int = 0,
                 n_synthetic: int | None = None, cache_dir: str | None = None) -> tuple[list[tuple[int, dict]], str]:
    """Raw records of one split as ``[(record_index, record), ...]`` plus a label naming where they came from.

    ``source`` is parsed by ``data.sources.parse_source``; ``split`` is "train" or "val" (alias "validation").
    ``record_index`` is the record's row in its file (or split), so error messages point at the right line.
    ``kind`` ("sft", "dpo" or "ratings") only selects which built-in dataset ``"synthetic"`` means. The held-out rule is in
    the ``data.sources`` module docstring.
    """
    split = normalize_split(split)
    src = parse_source(source)
    if src.kind == "synthetic":
        return _synthetic_records(split, kind, seed, n_synthetic)
    if src.kind == "stdlib":
        raise ValueError(f"data source {src.text!r} is the built-in text corpus for pre-training, not "
                         f"{kind.upper()} records; give 'synthetic', a file or folder of records, or a Hub dataset")
    if src.kind == "folder" and (src.path / "manifest.json").is_file():
        raise ValueError(f"data source {src.text!r} is a prepared pre-training corpus (token shards and a "
                         f"manifest.json, made by scripts/prepare_data.py), not {kind.upper()} records: --stage "
                         f"{kind} reads {'chat records (messages, or prompt + completion)' if kind == 'sft' else 'preference pairs (prompt, chosen, rejected)'}"
                         " from a JSONL/JSON/Parquet/CSV file or folder, a Hub dataset or 'synthetic'")
    splits = _read_record_splits(src, cache_dir)
    return _records_of_split(splits, split, src)


def _synthetic_records(split: str, kind: str, seed: int, n: int | None) -> tuple[list[tuple[int, dict]], str]:
    from data import synthetic

    name = dataset_split_names(split)[0]  # data.synthetic's own split names: "train", "validation"
    n = synthetic.DEFAULT_SIZES[name] if n is None else n
    make = {"sft": synthetic.make_sft, "dpo": synthetic.make_preferences, "ratings": synthetic.make_ratings}[kind]
    return list(enumerate(make(n, seed, name))), f"built-in synthetic {kind} data ({name}, seed {seed})"


def _record_builder(path: Path, suffix: str, what: str = "") -> str:
    """The ``datasets`` builder of a record file type; ValueError naming ``path`` for another type (e.g. .txt)."""
    if suffix.lower() not in RECORD_FORMATS:
        raise ValueError(f"{path}: unsupported file type {suffix!r}{what}; use one of {sorted(RECORD_FORMATS)}")
    return RECORD_FORMATS[suffix.lower()]


def _read_record_splits(src: Source, cache_dir: str | None):
    """All splits of a hub, file or folder source as a ``datasets.DatasetDict``; clear errors for bad files."""
    files: list[Path] = []  # the local files read, to name a malformed line if datasets fails
    datasets = datasets_module()
    try:
        if src.kind == "hub":
            return datasets.load_dataset(src.name, src.config, cache_dir=cache_dir)
        if src.kind == "file":
            files = [src.path]
            builder = _record_builder(src.path, src.path.suffix)
            return datasets.load_dataset(builder, data_files=str(src.path), cache_dir=cache_dir)
        # a folder: datasets finds its files and takes split names from them (train*, validation*, ...)
        files = local_files(src.path)  # one format, as for pre-training: datasets would read only the commonest
        _record_builder(src.path, files[0].suffix, " for records")
        return datasets.load_dataset(str(src.path), cache_dir=cache_dir)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # datasets raises many types (DatasetGenerationError, ConnectionError, ...)
        bad_line = find_bad_json(files)  # a line that is not a JSON object: name the file and the line
        raise ValueError(bad_line or f"cannot load data source {src.text!r}: {type(e).__name__}: {e}") from e


def _records_of_split(splits, split: str, src: Source) -> tuple[list[tuple[int, dict]], str]:
    """The ``split`` records of a source's splits: its own validation split, else the held-out part of train."""
    label, names = src.label, list(splits)
    val_name = next((a for a in dataset_split_names("val") if a in splits), None)
    if val_name is not None:  # the source has its own validation split: use the splits as they are
        own = val_name if split == "val" else "train"
        if own not in splits:
            raise ValueError(f"{label}: no {split!r} split; splits are {names}")
        return list(enumerate(splits[own].to_list())), _split_label(src.path, own, label)
    # No validation split: carve a fixed held-out part out of "train" (or of the only split there is).
    base = "train" if "train" in splits else names[0] if len(names) == 1 else None
    if base is None:
        raise ValueError(f"{label}: no {split!r} split and no 'train' split to carve one from; splits are {names}")
    ds = splits[base]
    held = _held_out(len(ds))
    keep = sorted(held) if split == "val" else [i for i in range(len(ds)) if i not in held]
    rows = ds.to_list()  # one Arrow-to-Python conversion; indexing row by row is much slower
    return [(i, rows[i]) for i in keep], label if len(names) == 1 else _split_label(src.path, base, label)


def _split_label(path: Path | None, split_name: str, label: str) -> str:
    """Name the file a split came from when a folder holds exactly one file for it (e.g. ``validation.jsonl``),
    so a record index in an error message is a line of a file the user can open."""
    if path is not None and path.is_dir():
        files = [f for f in sorted(path.rglob("*"))
                 if f.is_file() and f.suffix.lower() in RECORD_FORMATS and split_name in f.name.lower()]
        if len(files) == 1:
            return str(files[0])
    return f"split {split_name!r} of {label}"


def record_error(e: ValueError, where: str) -> ValueError:
    """e as an error that starts with `where` ("record I of FILE"), once: a message that names it already is kept."""
    return ValueError(e.args[0] if str(e).startswith(where) else f"{where}: {e}")


def present_fields(record: dict) -> list[str]:
    """The keys of a record that carry a value (``datasets`` fills absent keys of mixed files with None)."""
    return sorted(k for k, v in record.items() if v is not None)


def as_messages(value: Any, role: str, where: str, field: str) -> list[dict]:
    """A prompt/completion side as a message list: a string is one ``role`` message, a list is kept as is."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, Sequence) and all(isinstance(m, dict) for m in value):
        # keep only role/content: datasets adds None for keys other records use (e.g. "name", "tool_calls")
        return [{"role": m.get("role"), "content": m.get("content")} for m in value]
    raise ValueError(f"{where}: field {field!r} must be a string or a list of messages, got {type(value).__name__}")


def record_to_messages(record: dict, where: str) -> list[dict]:
    """The conversation of an SFT record in either TRL format; ValueError naming ``where`` and the fields found."""
    if record.get("messages") is not None:
        return as_messages(record["messages"], "user", where, "messages")
    if record.get("prompt") is not None and record.get("completion") is not None:
        return as_messages(record["prompt"], "user", where, "prompt") + as_messages(
            record["completion"], "assistant", where, "completion"
        )
    raise ValueError(
        f"{where}: an SFT record needs 'messages', or 'prompt' and 'completion'; found fields {present_fields(record)}"
    )


def load_sft(source: str | os.PathLike, split: str, tok: Any, block_size: int, seed: int = 0,
             n_synthetic: int | None = None, cache_dir: str | None = None) -> tuple[list[SFTExample], dict]:
    """Load, render and tokenize one split of an SFT dataset.

    Returns ``(examples, stats)``; stats = ``{"source", "split", "n_records", "n_examples", "n_dropped", "n_tokens",
    "n_supervised", "kept"}`` where ``n_dropped`` counts conversations truncation left without a supervised token (the
    caller logs it) and ``kept`` is the record index of each example, in order (so validation prompts can skip the
    dropped records). Raises ValueError on a malformed record (naming its index and file) or when nothing remains.
    """
    records, label = load_records(source, split, "sft", seed, n_synthetic, cache_dir)
    split = normalize_split(split)
    examples: list[SFTExample] = []
    kept: list[int] = []  # record index of each example
    for i, record in records:
        where = f"record {i} of {label}"
        try:
            ids, mask = render(record_to_messages(record, where), tok)
        except ValueError as e:
            raise record_error(e, where) from None
        ex = to_example(ids, mask, block_size)
        if ex is not None:
            examples.append(SFTExample(*ex))
            kept.append(i)
    n_dropped = len(records) - len(examples)
    if not examples:
        why = "it has no records" if not records else (
            f"all {n_dropped} conversations lose every supervised token when truncated to block_size={block_size}")
        raise ValueError(f"no SFT examples left in the {split!r} split of {label}: {why}")
    stats = {
        "source": label,
        "split": split,
        "n_records": len(records),
        "n_examples": len(examples),
        "n_dropped": n_dropped,
        "n_tokens": sum(len(e.input_ids) for e in examples),
        "n_supervised": sum(sum(y != IGNORE_INDEX for y in e.labels) for e in examples),
        "kept": kept,
    }
    return examples, stats


# --- batching -----------------------------------------------------------------------------------------------------


class ExampleStream:
    """An endless, resumable sequence of example indices: epoch ``e`` visits all ``n`` examples once, in a
    permutation seeded by ``(seed, e)`` (or in order when ``shuffle`` is False). Shared by the SFT and DPO batchers.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        assert n > 0
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = -1, np.arange(n)

    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._order_epoch = self.epoch
        return self._order

    def peek(self) -> int:
        return int(self._current_order()[self.offset])

    def advance(self) -> None:
        self.offset += 1
        if self.offset == self.n:
            self.epoch, self.offset = self.epoch + 1, 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            out.append(self.peek())
            self.advance()
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "n_examples": self.n,
                "shuffle": self.shuffle}

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in (("n_examples", self.n), ("seed", self.seed), ("shuffle", self.shuffle)):
            if sd.get(key, mine) != mine:
                raise ValueError(f"data state was saved with {key}={sd[key]!r}, this run has {key}={mine!r}; "
                                 "resuming would not continue the same data order")
        if not (0 <= sd["offset"] < self.n and sd["epoch"] >= 0):
            raise ValueError(f"invalid data state: epoch={sd['epoch']!r} offset={sd['offset']!r} for {self.n} examples")
        self.epoch, self.offset = int(sd["epoch"]), int(sd["offset"])


def check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")


class SFTBatcher:
    """Batches of SFT examples for one rank, resumable exactly.

    Every step draws a global batch of ``batch_size * world_size`` examples (rows, when packing) from an
    ``ExampleStream`` that every rank replays identically; rank ``r`` returns rows ``[r*B, (r+1)*B)``. So the ranks'
    batches concatenated equal the single-process batch of ``B * world_size``, and padding length agrees across
    ranks. Epochs wrap seamlessly: a step may end one epoch and start the next, reshuffled.
    """

    def __init__(self, examples: Sequence[SFTExample], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pack: bool = False, block_size: int | None = None, shuffle: bool = True,
                 pad_to_block: bool = False):
        check_rank(batch_size, rank, world_size)
        if not examples:
            raise ValueError("SFTBatcher needs at least one example")
        if (pack or pad_to_block) and not block_size:
            raise ValueError("block_size is required when pack=True or pad_to_block=True")
        longest = max(len(e.input_ids) for e in examples)
        if block_size and longest > block_size:
            raise ValueError(f"an example has {longest} tokens, more than block_size={block_size}; "
                             "load the examples with the same block_size")
        self.examples = examples
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.pack, self.block_size, self.pad_to_block = pack, block_size, pad_to_block
        self.stream = ExampleStream(len(examples), seed, shuffle)

    @property
    def epoch(self) -> float:
        """Fractional number of passes over the examples so far (for logging)."""
        return self.stream.epoch + self.stream.offset / self.stream.n

    def next_batch(self) -> dict[str, torch.Tensor]:
        global_b = self.batch_size * self.world_size
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        if self.pack:
            rows = [self._pack_row() for _ in range(global_b)]  # lists of example indices
            return self._packed(rows[lo:hi])
        idx = self.stream.take(global_b)
        T = self.block_size if self.pad_to_block else max(len(self.examples[i].input_ids) for i in idx)
        input_ids = torch.full((self.batch_size, T), PAD_ID, dtype=torch.long)
        labels = torch.full((self.batch_size, T), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(idx[lo:hi]):
            ex = self.examples[i]
            input_ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
            labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
        return {"input_ids": input_ids, "labels": labels}

    def _pack_row(self) -> list[int]:
        """Greedily take whole examples from the stream while they fit in ``block_size`` (next-fit packing)."""
        row, used = [], 0
        while True:
            i = self.stream.peek()
            n = len(self.examples[i].input_ids)
            if used + n > self.block_size:
                assert row, "every example fits an empty row (checked in __init__)"
                return row  # example i stays in the stream: it starts the next row
            row.append(i)
            used += n
            self.stream.advance()

    def _packed(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        B, T = len(rows), self.block_size
        input_ids = torch.full((B, T), PAD_ID, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        doc_ids = torch.zeros((B, T), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for doc, i in enumerate(row):
                ex = self.examples[i]
                end = start + len(ex.input_ids)
                input_ids[r, start:end] = torch.tensor(ex.input_ids)
                labels[r, start:end] = torch.tensor(ex.labels)
                positions[r, start:end] = torch.arange(end - start)
                doc_ids[r, start:end] = doc
                start = end
            # the padding tail is one more "document": it attends only to itself, and its positions stay < T
            positions[r, start:] = torch.arange(T - start)
            doc_ids[r, start:] = len(row)
        return {"input_ids": input_ids, "labels": labels, "positions": positions, "doc_ids": doc_ids}

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "pack": self.pack, "block_size": self.block_size}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("pack", self.pack) != self.pack or (self.pack and sd.get("block_size") != self.block_size):
            raise ValueError(f"data state was saved with pack={sd.get('pack')} block_size={sd.get('block_size')}, "
                             f"this run has pack={self.pack} block_size={self.block_size}")
        self.stream.load_state_dict(sd["stream"])
