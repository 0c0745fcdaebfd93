"""Preparation: a source streamed into chunked token shards by worker processes, resumable, with a manifest.

A prepared folder (written by ``scripts/prepare_data.py SOURCE --out DIR``, or by ``train.py`` under the cache)::

    DIR/manifest.json    what was prepared from what: source, tokenizer hash, caps, the chunks of each split and
                         their token counts; rewritten atomically after every completed chunk, "complete" at the end
    DIR/tokenizer.json   the tokenizer the ids belong to
    DIR/train-00000.bin  flat token ids, EOT_ID after every document: uint16 for a vocabulary up to 65,536 (2 bytes
    DIR/train-00001.bin  per token on disk), else uint32. Every chunk of a split holds exactly chunk_tokens ids but
    DIR/val-00000.bin    the last. Documents may straddle chunks: a split's chunks, concatenated, are its documents.

How the work is shared: the main process reads the source (``data.sources.iter_texts``, one stream: the only serial
stage) in batches of documents; worker processes hash each document (its split, for a source without a validation
split), tokenize it with ``encode_batch_fast``, flatten the ids with an EOT after each document and return one
array per batch. The main process takes the results in reading order -- so the shards do not depend on the number
of workers -- and appends each to its split's open chunk (a copy, at memory speed).

Caps (``max_tokens``, ``max_docs``; 0 = none) count the documents of the first split asked for (``train``, or the
one split evaluate.py asks for) and stop the reading at the document that reaches them; the other split keeps what
the documents read until then gave it (for a source split by hash: the held-out documents among them).

Resuming: the manifest records, with every completed chunk, the read position (pass, rows) and the length of each
split's open chunk (``.SPLIT-NNNNN.bin.partial``, flushed to disk first). A preparation that was interrupted starts
again from there: the open chunks are cut back to the recorded length and the stream skips the rows already read.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data.encode import SPLIT_CODE, Encoded, encode_documents, encode_in_worker, init_worker
from data.sources import (
    SPLITS,
    VAL_FRACTION,
    ReadPass,
    describe_source,
    iter_texts,
    normalize_split,
    read_passes,
    val_threshold,
)
from data.tokenizer import EOT_ID, Tokenizer

# 3: every chunk records its sha256, which the data hash is made of (2026-12-01); folders of format 2 lack it and are
# prepared again (the trainer's cache) or refused with that advice (a folder given as --data).
FORMAT = 3
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
DEFAULT_CHUNK_TOKENS = 2**27  # 256 MB per chunk at 2 bytes a token
READ_BATCH_DOCS = 1024  # documents per read from the stream
TASK_CHARS = 1 << 18  # characters of text per worker task (or fewer documents): small tasks balance the workers


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..vocab_size-1."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def chunk_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def _mp_context():
    # Linux: fork -- a worker starts in milliseconds with the parent's modules. A spawned (or forkserver) worker
    # re-imports the main module (torch and `datasets` for train.py: half a second or more per process). A worker
    # runs only the tokenizer (single-threaded, TOKENIZERS_PARALLELISM=false) and numpy, nothing of the parent's
    # threads. Elsewhere (macOS, Windows) spawn, the platforms' safe default.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def tasks(batches: Iterator[list], max_chars: int = TASK_CHARS) -> Iterator[list]:
    """The stream's rows regrouped into tasks of about ``max_chars`` characters (documents differ in length by
    orders of magnitude: a fixed number of them per task would leave a worker idle)."""
    task, chars = [], 0
    for batch in batches:
        for text in batch:
            task.append(text)
            chars += len(text) if text else 0
            if chars >= max_chars:
                yield task
                task, chars = [], 0
    if task:
        yield task


def encoded_batches(batches: Iterator[list], tokenizer: Tokenizer, split: str | None, threshold: int,
                    wanted: tuple[str, ...], dtype: str, workers: int, in_process: bool) -> Iterator[Encoded]:
    """Encoded batches in reading order, tokenized by ``workers`` processes (or here, when ``in_process``).

    At most 2 x workers batches are in flight, so reading stays just ahead of tokenizing and stops soon after the
    consumer does (a cap reached)."""
    if in_process:
        for texts in batches:
            yield encode_documents(tokenizer.backend, texts, split, threshold, wanted, dtype)
        return
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # seen by the tokenizer's fork handler in each new worker
    try:
        pool = _mp_context().Pool(workers, initializer=init_worker, initargs=(tokenizer.backend.to_str(),))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.apply_async(encode_in_worker, (texts, split, threshold, wanted, dtype)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------------------------- writing
class ChunkWriter:
    """The chunks of one split: ids are appended to the open chunk, which is renamed into place when it is full."""

    def __init__(self, out_dir: Path, split: str, chunk_tokens: int, dtype: np.dtype, state: dict | None = None):
        self.out_dir, self.split, self.chunk_tokens, self.dtype = out_dir, split, chunk_tokens, np.dtype(dtype)
        state = state or {"chunks": [], "open_tokens": 0, "tokens": 0, "bytes": 0, "documents": 0}
        self.chunks: list[dict] = list(state["chunks"])
        self.open_tokens = state["open_tokens"]
        self.tokens, self.bytes, self.documents = state["tokens"], state["bytes"], state["documents"]
        self.file = open(self.partial_path, "r+b" if self.open_tokens else "wb")
        self.file.truncate(self.open_tokens * self.dtype.itemsize)
        # sha256 of the open chunk's bytes, kept as they are written (a resumed open chunk is read back once)
        self.digest = hashlib.sha256(self.file.read() if self.open_tokens else b"")
        self.file.seek(0, os.SEEK_END)

    @property
    def partial_path(self) -> Path:
        return self.out_dir / f".{chunk_name(self.split, len(self.chunks))}.partial"

    def append(self, tokens: np.ndarray, n_bytes: int, n_docs: int) -> int:
        """Append ids (whole documents, or a document's start); returns the number of chunks completed."""
        self.bytes += n_bytes
        self.documents += n_docs
        completed = 0
        while len(tokens):
            room = self.chunk_tokens - self.open_tokens
            part, tokens = tokens[:room], tokens[room:]
            part.tofile(self.file)
            self.digest.update(np.ascontiguousarray(part))
            self.open_tokens += len(part)
            self.tokens += len(part)
            if self.open_tokens == self.chunk_tokens:
                self._complete_open_chunk()
                completed += 1
        return completed

    def _complete_open_chunk(self) -> None:
        self.sync()
        self.file.close()
        name = chunk_name(self.split, len(self.chunks))
        os.replace(self.partial_path, self.out_dir / name)
        self.chunks.append({"file": name, "tokens": self.open_tokens, "sha256": self.digest.hexdigest()})
        self.open_tokens = 0
        self.digest = hashlib.sha256()
        self.file = open(self.partial_path, "wb")

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def finish(self) -> None:
        """Rename the last, shorter chunk into place (an empty one is dropped)."""
        if self.open_tokens:
            self._complete_open_chunk()
        self.close()
        self.partial_path.unlink(missing_ok=True)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def state(self) -> dict:
        return {"chunks": self.chunks, "open_tokens": self.open_tokens, "tokens": self.tokens, "bytes": self.bytes,
                "documents": self.documents}


class BrokenPreparation(ValueError):
    """An interrupted preparation whose files do not match what its manifest recorded: it cannot be resumed."""


def _atomic_write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def data_hash(manifest: dict) -> str:
    """What identifies prepared data: the bytes a run reads -- every chunk's length and sha256, each split's text
    bytes and documents -- and the tokenizer they belong to (sha256, hex). Not the settings or the source's file
    dates: the same bytes prepared again (a corpus touched or copied, the cache rebuilt) are the same data."""
    content = {"tokenizer_hash": manifest["key"]["tokenizer_hash"],
               "splits": {s: {"chunks": [[c["tokens"], c["sha256"]] for c in v["chunks"]], "bytes": v["bytes"],
                              "documents": v["documents"]} for s, v in manifest["splits"].items()}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a prepared folder, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------- preparing
def preparation_key(source: str, tokenizer: Tokenizer, splits: tuple[str, ...], text_column: str,
                    val_fraction: float, max_tokens: int, max_docs: int, chunk_tokens: int) -> dict:
    """Everything the prepared bytes depend on; a folder holding another key is another preparation."""
    fingerprints = [describe_source(source, s).fingerprint for s in splits]
    return {"format": FORMAT, "source_fingerprint": hashlib.sha256("|".join(fingerprints).encode()).hexdigest(),
            "tokenizer_hash": tokenizer.hash, "splits": list(splits), "text_column": text_column,
            "val_fraction": val_fraction, "max_tokens": int(max_tokens), "max_docs": int(max_docs),
            "chunk_tokens": int(chunk_tokens)}


def _start_job(source, tokenizer, out_dir: Path, passes, key: str, resume, workers: int, in_process, hf_cache_dir,
               verbose: bool, overwrite: bool) -> _Job:
    """The preparation job, resuming `resume` when given; with `overwrite`, a folder whose files do not match its
    manifest (BrokenPreparation) is removed and prepared afresh."""
    try:
        return _Job(source, tokenizer, out_dir, passes, key, resume, workers or available_cores(), in_process,
                    hf_cache_dir, verbose)
    except BrokenPreparation as e:
        if not overwrite:
            raise
        if verbose:
            print(f"data: {e}; preparing again")
        _remove_preparation(out_dir)
        return _Job(source, tokenizer, out_dir, passes, key, None, workers or available_cores(), in_process,
                    hf_cache_dir, verbose)


def prepare(source: str, tokenizer: Tokenizer, out_dir: str | os.PathLike, *, splits: tuple[str, ...] = SPLITS,
            text_column: str = "text", val_fraction: float = VAL_FRACTION, max_tokens: int = 0, max_docs: int = 0,
            chunk_tokens: int = DEFAULT_CHUNK_TOKENS, workers: int = 0, block_size: int | None = None,
            overwrite: bool = False, verbose: bool = True, hf_cache_dir: str | None = None,
            in_process: bool | None = None) -> dict:
    """Tokenize ``splits`` of ``source`` into the prepared folder ``out_dir``; return its complete manifest.

    ``workers``: tokenizing processes (0 = every core; 1 tokenizes in this process unless ``in_process=False``).
    A complete preparation of the same key is reused and an interrupted one resumed. A folder holding another
    preparation, or a complete one with a missing or truncated chunk, is refused unless ``overwrite`` (the trainer's
    cache), which prepares it again. ``block_size``: every split must hold one block (``block_size + 1`` tokens).
    Several processes may call this at once: they serialise on a file lock. Raises ValueError for an empty split,
    naming it, and for bad input; the files written are removed then, unless an interrupted preparation recorded
    in the manifest can resume from them.
    """
    from filelock import FileLock

    splits = tuple(normalize_split(s) for s in splits)
    key = preparation_key(source, tokenizer, splits, text_column, val_fraction, max_tokens, max_docs, chunk_tokens)
    out_dir = Path(out_dir)
    # The streams are opened before anything is written (a bad Hub configuration leaves no folder), but not when
    # the folder already holds this preparation (a cached Hub preparation needs no network).
    found = read_manifest(out_dir)
    passes = None if found and found.get("key") == key and found.get("complete") else \
        read_passes(source, text_column, splits, hf_cache_dir, val_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    with FileLock(str(out_dir / ".prepare.lock")):
        manifest = read_manifest(out_dir)
        if manifest is not None and manifest.get("key") == key and manifest.get("complete"):
            if _chunks_intact(out_dir, manifest, overwrite, say):
                _check_splits(manifest, source, block_size)
                say(f"data: reusing {out_dir} ({_summary(manifest)})")
                return manifest
            manifest = None
        passes = passes or read_passes(source, text_column, splits, hf_cache_dir, val_fraction)
        resume = _resumable(out_dir, manifest, key, overwrite, say)
        tokenizer.save(out_dir / TOKENIZER)
        try:
            manifest = _start_job(source, tokenizer, out_dir, passes, key, resume, workers, in_process, hf_cache_dir,
                                  verbose, overwrite).run()
        except ValueError:  # bad input: with nothing recorded to resume from, leave nothing half-written
            if not _has_progress(read_manifest(out_dir)):
                _remove_preparation(out_dir)
            raise
        try:
            _check_splits(manifest, source, block_size)
        except ValueError:  # the whole source was read: a retry would fail the same way
            _remove_preparation(out_dir)
            raise
        manifest["complete"] = True
        _atomic_write_json(out_dir / MANIFEST, manifest)
        say(f"data: prepared {out_dir} ({_summary(manifest)}) in {manifest['seconds']:.1f}s")
        return manifest


def _summary(m: dict) -> str:
    parts = [f"{s} {v['documents']:,} docs {v['tokens']:,} tokens in {len(v['chunks'])} chunk(s)"
             for s, v in m["splits"].items()]
    return "; ".join(parts)


def _resumable(out_dir: Path, manifest: dict | None, key: dict, overwrite: bool, say) -> dict | None:
    """The interrupted manifest to resume from, or None to start afresh (clearing another preparation's files)."""
    old_format = [p for p in ("train.bin", "train.json", "val.bin", "val.json") if (out_dir / p).exists()]
    if manifest is not None and manifest.get("key") == key:
        say(f"data: resuming the interrupted preparation in {out_dir}")
        return manifest
    if manifest is None and not old_format and not any(out_dir.glob("*.bin")):
        return None
    chunks = sorted(p.name for p in out_dir.glob("*.bin"))
    differs = (sorted(k for k in key if manifest.get("key", {}).get(k) != key[k]) if manifest is not None
               else "shards of the older single-file format (train.bin, val.bin)" if old_format
               # a kill between the first chunk's rename and the first manifest: nothing recorded to resume from
               else f"chunk files ({', '.join(chunks[:3])}{' ...' if len(chunks) > 3 else ''}) but no {MANIFEST}")
    if not overwrite:
        raise ValueError(f"{out_dir} already holds prepared data that differs ({differs}); give another --out or "
                         "delete the folder")
    say(f"data: {out_dir} holds another preparation ({differs}); preparing again")
    _remove_preparation(out_dir, [out_dir / q for q in old_format])
    return None


def _has_progress(manifest: dict | None) -> bool:
    """Whether a manifest records work a resume would keep: a read position past the start."""
    return manifest is not None and manifest.get("position", {}) != {"pass": 0, "rows": 0}


def _chunks_intact(out_dir: Path, manifest: dict, overwrite: bool, say) -> bool:
    """Whether a complete preparation's chunks are all there; a damaged one is refused, or cleared if ``overwrite``
    (the trainer's cache prepares it again)."""
    try:
        check_chunks(out_dir, manifest)
    except ValueError as e:
        if not overwrite:
            raise
        say(f"data: {e}")
        _remove_preparation(out_dir)
        return False
    return True


def _remove_preparation(out_dir: Path, extra: list[Path] = ()) -> None:
    """Delete a preparation's files: chunks, open chunks, manifest and tokenizer (the folder and its lock stay)."""
    for p in [*out_dir.glob("*.bin"), *out_dir.glob(".*.partial"), out_dir / MANIFEST, out_dir / f".{MANIFEST}.tmp",
              out_dir / TOKENIZER, *extra]:
        p.unlink(missing_ok=True)


def _check_splits(manifest: dict, source: str, block_size: int | None) -> None:
    for split, v in manifest["splits"].items():
        if v["documents"] == 0:
            why = (f" (no document's hash fell below val_fraction={manifest['key']['val_fraction']} x 2^64 among those "
                   "read: raise data.val_fraction or the caps)" if split == "val" else "")
            raise ValueError(f"empty data source: the {split} split of {source} holds no non-empty text{why}")
        if block_size is not None and v["tokens"] < block_size + 1:
            raise ValueError(f"the {split} split of {source} is too small: {v['tokens']} tokens cannot fill one block "
                             f"of block_size={block_size} (needs {block_size + 1} tokens: inputs plus the shifted "
                             "targets)")


def check_chunks(out_dir: Path, manifest: dict) -> None:
    """Every chunk the manifest lists exists with its recorded length (a cheap stat, not a read)."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for v in manifest["splits"].values():
        for c in v["chunks"]:
            path = Path(out_dir) / c["file"]
            size = path.stat().st_size if path.is_file() else -1
            if size != c["tokens"] * itemsize:
                raise ValueError(f"{path}: expected {c['tokens']} tokens ({c['tokens'] * itemsize} bytes) as "
                                 f"{Path(out_dir) / MANIFEST} records, found {'no file' if size < 0 else f'{size} bytes'};"
                                 " prepare the data again")


class _Job:
    """One preparation run: the passes over the source, the writers, the checkpoints of the manifest."""

    def __init__(self, source, tokenizer, out_dir, passes: list[ReadPass], key, resume, workers, in_process,
                 hf_cache_dir, verbose):
        self.source, self.tokenizer, self.out_dir, self.passes, self.key = source, tokenizer, out_dir, passes, key
        self.workers, self.hf_cache_dir = workers, hf_cache_dir
        self.in_process = workers == 1 if in_process is None else in_process
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.splits = tuple(key["splits"])
        states = _recover(out_dir, resume, self.dtype) if resume else {}
        self.writers = {s: ChunkWriter(out_dir, s, key["chunk_tokens"], self.dtype, states.get(s))
                        for s in self.splits}
        self.position = dict(resume["position"]) if states else {"pass": 0, "rows": 0}
        self.seconds = resume.get("seconds", 0.0) if states else 0.0
        self.progress = _Progress(self, verbose)

    def manifest(self) -> dict:
        info = describe_source(self.source, self.splits[0])
        return {"format": FORMAT, "complete": False, "key": self.key, "source": self.source, "kind": info.kind,
                "python_version": info.python_version, "dtype": self.dtype.name,
                "vocab_size": self.tokenizer.vocab_size, "eot_id": EOT_ID, "passes": [p.label for p in self.passes],
                "splits": {s: w.state() for s, w in self.writers.items()}, "position": dict(self.position),
                "seconds": round(self.seconds, 3)}

    def checkpoint(self) -> None:
        """Flush the open chunks, then record them with the read position: the point a resume starts from."""
        for w in self.writers.values():
            w.sync()
        _atomic_write_json(self.out_dir / MANIFEST, self.manifest())

    def run(self) -> dict:
        t0 = time.perf_counter() - self.seconds
        self.checkpoint()  # a manifest before the first chunk: every chunk file on disk belongs to a recorded run
        try:
            for index in range(self.position["pass"], len(self.passes)):
                self._read_pass(index)
                self.position = {"pass": index + 1, "rows": 0}
                self.seconds = time.perf_counter() - t0
                self.checkpoint()
            if all(w.documents for w in self.writers.values()):
                for w in self.writers.values():
                    w.finish()
        finally:
            for w in self.writers.values():
                w.close()
            self.progress.close()
        self.seconds = time.perf_counter() - t0
        return self.manifest()

    def _read_pass(self, index: int) -> None:
        rp = self.passes[index]
        capped = self.writers[self.splits[0]]
        code = SPLIT_CODE[self.splits[0]]
        max_tokens, max_docs = self.key["max_tokens"], self.key["max_docs"]
        if (max_tokens and capped.tokens >= max_tokens) or (max_docs and capped.documents >= max_docs):
            if rp.split in (None, self.splits[0]):
                return  # the capped split is full already (a resume after the cap)
        texts = tasks(iter_texts(rp, READ_BATCH_DOCS, self.position["rows"], self.hf_cache_dir))
        threshold = val_threshold(self.key["val_fraction"])
        for enc in encoded_batches(texts, self.tokenizer, rp.split, threshold, self.splits, self.dtype.name,
                                   self.workers, self.in_process):
            enc, full = _cut_at_cap(enc, capped, code, max_tokens, max_docs)
            completed = self._write(enc)
            self.position["rows"] += enc.rows
            self.progress.update(enc)
            if completed:
                self.checkpoint()
            if full:
                return

    def _write(self, enc: Encoded) -> int:
        completed = 0
        for split, w in self.writers.items():
            mine = enc.doc_split == SPLIT_CODE[split]
            if mine.all():
                completed += w.append(enc.tokens, int(enc.doc_bytes.sum()), len(mine))
            elif mine.any():
                tokens = enc.tokens[np.repeat(mine, enc.doc_tokens)]
                completed += w.append(tokens, int(enc.doc_bytes[mine].sum()), int(mine.sum()))
        return completed


def _cut_at_cap(enc: Encoded, w: ChunkWriter, code: int, max_tokens: int, max_docs: int) -> tuple[Encoded, bool]:
    """``enc`` up to the document that brings the capped split to a cap (that one included), and whether it did."""
    mine = enc.doc_split == code
    if not (max_tokens or max_docs) or not mine.any():
        return enc, False
    reached = np.zeros(len(mine), dtype=bool)
    if max_tokens:
        reached |= w.tokens + np.cumsum(np.where(mine, enc.doc_tokens, 0)) >= max_tokens
    if max_docs:
        reached |= w.documents + np.cumsum(mine) >= max_docs
    reached &= mine
    if not reached.any():
        return enc, False
    last = int(np.argmax(reached))  # the first document at the cap: the last one kept
    n = last + 1
    return Encoded(rows=int(enc.doc_row[last]) + 1, doc_row=enc.doc_row[:n], doc_split=enc.doc_split[:n],
                   doc_tokens=enc.doc_tokens[:n], doc_bytes=enc.doc_bytes[:n],
                   tokens=enc.tokens[: int(enc.doc_tokens[:n].sum())]), True


def _recover(out_dir: Path, manifest: dict, dtype: np.dtype) -> dict:
    """The writers' states of an interrupted preparation, its files put back as the manifest recorded them.

    A chunk completed after the last manifest was written is the recorded open chunk grown: it is renamed back and
    cut to the recorded length. Chunk files past the recorded ones are removed (they are written again)."""
    states = {}
    for split, state in manifest["splits"].items():
        k = len(state["chunks"])
        partial, final = out_dir / f".{chunk_name(split, k)}.partial", out_dir / chunk_name(split, k)
        if final.exists():
            os.replace(final, partial)
        need = state["open_tokens"] * dtype.itemsize
        if need and (not partial.exists() or partial.stat().st_size < need):
            raise BrokenPreparation(f"{partial}: the open chunk of the interrupted preparation is shorter than "
                             f"{out_dir / MANIFEST} records; delete {out_dir} and prepare again")
        later = [p for p in out_dir.glob(f"{split}-*.bin") if int(p.stem.rpartition("-")[2]) > k]
        later += [p for p in out_dir.glob(f".{split}-*.bin.partial") if p != partial]
        for p in later:
            p.unlink()
        states[split] = state
    try:
        check_chunks(out_dir, manifest)
    except ValueError as e:
        raise BrokenPreparation(str(e)) from None
    return states


class _Progress:
    """A progress bar in documents, with tokens, MB read, MB/s and, where the size is known, an ETA."""

    def __init__(self, job: _Job, verbose: bool):
        from tqdm.auto import tqdm

        self.job, self.t0 = job, time.perf_counter()
        self.bytes = 0  # text bytes read by this run (resumed work excluded)
        known = [p.size_bytes for p in job.passes if p.size_bytes is not None and p.builder != "parquet"]
        self.total_bytes = sum(known) if len(known) == len(job.passes) else None
        self.bar = tqdm(unit="doc", desc="preparing", disable=not verbose, mininterval=1.0)

    def fraction(self) -> float | None:
        """The share of the work done, from whichever bound is known: a cap, or the size of text files."""
        key, w = self.job.key, self.job.writers[self.job.splits[0]]
        shares = []
        if key["max_tokens"]:
            shares.append(w.tokens / key["max_tokens"])
        if key["max_docs"]:
            shares.append(w.documents / key["max_docs"])
        if self.total_bytes:
            shares.append(sum(v.bytes for v in self.job.writers.values()) / self.total_bytes)
        return min(max(shares), 1.0) if shares else None

    def update(self, enc: Encoded) -> None:
        self.bytes += int(enc.doc_bytes.sum())
        self.bar.update(len(enc.doc_tokens))
        seconds = time.perf_counter() - self.t0
        tokens = sum(w.tokens for w in self.job.writers.values())
        text = f"{tokens:,} tokens, {self.bytes / 1e6:,.0f} MB, {self.bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s"
        done = self.fraction()
        if done:
            text += f", ETA {_clock(seconds * (1 - done) / done)}"
        self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
