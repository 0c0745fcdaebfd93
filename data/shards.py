"""Token shards: preparation with a manifest and cache, the rank-aware training loader, validation batches.

Preparation (once per source, split and tokenizer)::

    manifest = prepare("stdlib", tokenizer, "cache/stdlib", "train", block_size=256)
    # -> cache/stdlib/train.bin (flat token ids, EOT after every document) + cache/stdlib/train.json (manifest)

The shard is a flat array of token ids, ``uint16`` when the vocabulary fits (ids < 65536) else ``uint32``, read
back through ``np.memmap``. The manifest is written last, so a shard without one is never trusted. A prepared split
is reused when the manifest matches the source fingerprint (file paths, sizes, mtimes; the Python version for
``stdlib``), the tokenizer hash, the text column and the validation fraction; anything else re-prepares it.
Several processes starting together (``torchrun``) serialise on a file lock: the first prepares, the others then
find the cache. Nothing here needs ``torch.distributed``.

Training batches::

    loader = TokenLoader("cache/stdlib/train.bin", batch_size=8, block_size=256, seed=0, rank=r, world_size=w)
    x, y = loader.next_batch()   # LongTensor[8, 256] each; y is x shifted left by one token
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from data.sources import VAL_FRACTION, describe_source, load_source, normalize_split
from data.tokenizer import EOT_ID, Tokenizer

MANIFEST_FORMAT = 1
_ENCODE_BATCH_DOCS = 1024  # documents per encode_batch call: enough to keep the tokenizer's threads busy


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..vocab_size-1."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_paths(out_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(``<out_dir>/<split>.bin``, ``<out_dir>/<split>.json``)."""
    split = normalize_split(split)
    return Path(out_dir) / f"{split}.bin", Path(out_dir) / f"{split}.json"


def default_shard_dir(root: str | os.PathLike, source: str, tokenizer: Tokenizer) -> Path:
    """A folder per (source, tokenizer) under ``root``, so switching tokenizers does not re-prepare back and forth."""
    slug = re.sub(r"[^\w.-]+", "_", source).strip("_.")[-48:] or "source"
    return Path(root) / f"{slug}-{tokenizer.hash[:12]}"


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a shard, given the ``.bin`` or the ``.json`` path."""
    path = Path(path).with_suffix(".json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"shard manifest not found: {path} (run the data preparation first)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read shard manifest {path}: {e}") from e


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_manifest(bin_path: Path, manifest_path: Path, key: dict) -> dict | None:
    """The existing manifest when it matches ``key`` and its shard is complete, else None."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in key.items()):
        return None
    expected_size = manifest.get("tokens", -1) * np.dtype(manifest.get("dtype", "uint8")).itemsize
    if not bin_path.is_file() or bin_path.stat().st_size != expected_size:
        return None
    return manifest


def _encode_for_map(batch: dict, tokenizer: Tokenizer) -> dict:
    """Dataset.map worker: token ids and UTF-8 byte count of each document."""
    texts = batch["text"]
    return {"ids": tokenizer.encode_batch(texts), "n_bytes": [len(t.encode("utf-8")) for t in texts]}


def _encoded_batches(ds: datasets.Dataset, tokenizer: Tokenizer, num_proc: int | None) -> Iterator[tuple[list, list]]:
    """Yield (ids per document, bytes per document) in document order."""
    if num_proc is not None and num_proc > 1:
        # One tokenizer per worker process; results go through the `datasets` cache on disk.
        features = datasets.Features(
            {"ids": datasets.Sequence(datasets.Value("int32")), "n_bytes": datasets.Value("int64")}
        )
        ds = ds.map(
            _encode_for_map,
            fn_kwargs={"tokenizer": tokenizer},
            batched=True,
            batch_size=_ENCODE_BATCH_DOCS,
            num_proc=num_proc,
            remove_columns=ds.column_names,
            features=features,
            desc="tokenizing",
        )
        for batch in ds.iter(batch_size=_ENCODE_BATCH_DOCS):
            yield batch["ids"], batch["n_bytes"]
    else:
        # encode_batch runs on the tokenizers library's own thread pool, over all cores.
        for batch in ds.iter(batch_size=_ENCODE_BATCH_DOCS):
            texts = batch["text"]
            yield tokenizer.encode_batch(texts), [len(t.encode("utf-8")) for t in texts]


def _write_tokens(f, encoded, dtype, bar) -> tuple[int, int, int]:
    """Append each document's ids and an EOT_ID to the open file f; returns (tokens, UTF-8 bytes, documents)."""
    n_tokens = n_bytes = n_docs = 0
    for ids_list, bytes_list in encoded:
        flat: list[int] = []
        for ids in ids_list:
            flat.extend(ids)
            flat.append(EOT_ID)  # document boundary
        np.asarray(flat, dtype=dtype).tofile(f)
        n_tokens += len(flat)
        n_bytes += sum(bytes_list)
        n_docs += len(ids_list)
        bar.update(len(ids_list))
    return n_tokens, n_bytes, n_docs


def prepare(
    source: str,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    split: str,
    text_column: str = "text",
    num_proc: int | None = None,
    block_size: int | None = None,
    val_fraction: float = VAL_FRACTION,
    force: bool = False,
    verbose: bool = True,
    hf_cache_dir: str | None = None,
) -> dict:
    """Tokenize one split of ``source`` into ``<out_dir>/<split>.bin`` + ``<split>.json``; return the manifest.

    Every document is followed by ``EOT_ID``. ``num_proc`` > 1 tokenizes in that many processes through
    ``Dataset.map``; otherwise one process encodes batches on the tokenizer's thread pool (all cores).
    ``block_size``: fail unless the split holds at least ``block_size + 1`` tokens (one training block), before
    any shard is written. A matching prepared split is reused unless ``force``. Safe to call from several
    processes at once: they serialise on ``<out_dir>/.<split>.lock``. (Over 60 lines on purpose: the locked
    section -- reuse check, temporary shard, manifest, renames -- stays in one piece so its atomicity can be read.)
    """
    split = normalize_split(split)
    info = describe_source(source, split)  # FileNotFoundError for a missing path, before anything is created
    text_column = "text" if info.kind == "stdlib" else text_column
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_path, manifest_path = shard_paths(out_dir, split)
    dtype = token_dtype(tokenizer.vocab_size)
    key = {
        "format": MANIFEST_FORMAT,
        "split": split,
        "source_fingerprint": info.fingerprint,
        "tokenizer_hash": tokenizer.hash,
        "text_column": text_column,
        "val_fraction": val_fraction,
    }
    say = print if verbose else (lambda *a, **k: None)

    with FileLock(str(out_dir / f".{split}.lock")):
        cached = None if force else _cached_manifest(bin_path, manifest_path, key)
        if cached is not None:
            if block_size is not None:
                _check_min_tokens(cached["tokens"], block_size, f"the {split} split of {source}")
            say(f"data: reusing {bin_path} ({cached['tokens']:,} tokens)")
            return cached
        if manifest_path.exists():
            say(f"data: {manifest_path} does not match this source/tokenizer; preparing again")

        t0 = time.perf_counter()
        ds = load_source(source, split, text_column, val_fraction=val_fraction, cache_dir=hf_cache_dir)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{split}.bin.", suffix=".tmp")
        try:
            with (
                os.fdopen(fd, "wb") as f,
                tqdm(total=len(ds), unit="doc", desc=f"tokenizing {split}", disable=not verbose) as bar,
            ):
                n_tokens, n_bytes, n_docs = _write_tokens(f, _encoded_batches(ds, tokenizer, num_proc), dtype, bar)
                f.flush()
                os.fsync(f.fileno())
            if block_size is not None:
                _check_min_tokens(n_tokens, block_size, f"the {split} split of {source}")
            manifest = {
                **key,
                "source": source,
                "kind": info.kind,
                "python_version": info.python_version,
                "documents": n_docs,
                "tokens": n_tokens,
                "bytes": n_bytes,  # UTF-8 bytes of the documents, EOT excluded: the denominator of bits-per-byte
                "dtype": dtype.name,
                "vocab_size": tokenizer.vocab_size,
                "eot_id": EOT_ID,
                "root": info.root,
                "files": _relative_files(info.files, info.root),
            }
            # Remove the old manifest before the old shard is replaced: a crash in between leaves no stale pair.
            manifest_path.unlink(missing_ok=True)
            os.replace(tmp, bin_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
        seconds = time.perf_counter() - t0
        say(
            f"data: wrote {bin_path}: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB -> {n_tokens:,} tokens "
            f"({n_bytes / max(n_tokens, 1):.2f} bytes/token) in {seconds:.1f}s ({n_bytes / 1e6 / seconds:.1f} MB/s)"
        )
        return manifest


def _relative_files(files: tuple[str, ...], root: str | None) -> list[str]:
    if root is None or not Path(root).is_dir():
        return [Path(f).name for f in files]
    return [Path(f).relative_to(root).as_posix() for f in files]


def _check_min_tokens(n_tokens: int, block_size: int, what: str) -> None:
    if n_tokens < block_size + 1:
        raise ValueError(
            f"{what} is too small: {n_tokens} tokens cannot fill one block of block_size={block_size} "
            f"(needs {block_size + 1} tokens: inputs plus the shifted targets)"
        )


def open_tokens(path_or_array: str | os.PathLike | np.ndarray) -> np.ndarray:
    """A 1-D token array: an ndarray as is, or a ``.bin`` shard memory-mapped with its manifest's dtype."""
    if isinstance(path_or_array, np.ndarray):
        assert path_or_array.ndim == 1, path_or_array.shape
        return path_or_array
    path = Path(path_or_array).with_suffix(".bin")
    manifest = read_manifest(path)
    if not path.is_file():
        raise FileNotFoundError(f"token shard not found: {path}")
    data = np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r")
    if len(data) != manifest["tokens"]:
        raise ValueError(f"{path} holds {len(data)} tokens but its manifest says {manifest['tokens']}; prepare again")
    return data


def _to_device(x: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    if device is None:
        return x
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)  # pinned memory: the copy overlaps compute
    return x.to(device)


def _gather_blocks(data: np.ndarray, block_ids: np.ndarray, block_size: int) -> torch.Tensor:
    """LongTensor[len(block_ids), block_size + 1]: block i covers tokens [i*T, i*T + T + 1)."""
    index = block_ids[:, None] * block_size + np.arange(block_size + 1)  # [B, T+1]
    return torch.from_numpy(data[index].astype(np.int64))


class TokenLoader:
    """Batches of ``block_size`` tokens from a shard, deterministic from ``seed``, sliced per data-parallel rank.

    The shard is cut into a fixed grid of ``n_blocks = (tokens - 1) // block_size`` windows of ``block_size + 1``
    tokens (neighbours share one token: the last target of a block is the first input of the next). Each epoch
    visits the blocks in a fresh order drawn from ``(seed, epoch)``. A step takes the next
    ``batch_size * world_size`` blocks of that order (the global batch); rank r gets rows ``[r*B, (r+1)*B)``, so the
    ranks' batches are disjoint and together equal the single-process batch of ``B * world_size``. An epoch ends
    when less than one global batch is left (the remainder is skipped, so every rank runs the same steps).

    ``state_dict()`` is the same on every rank (epoch and step within it), so rank 0's copy restores them all,
    also under a different world size with the same global batch.
    """

    def __init__(
        self,
        path_or_array: str | os.PathLike | np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
    ):
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size={batch_size} and block_size={block_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        self.name = str(path_or_array) if not isinstance(path_or_array, np.ndarray) else "<array>"
        self.data = open_tokens(path_or_array)
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.global_batch = batch_size * world_size
        self.n_blocks = (len(self.data) - 1) // block_size
        if self.n_blocks == 0:
            _check_min_tokens(len(self.data), block_size, f"token shard {self.name}")
        self.steps_per_epoch = self.n_blocks // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"token shard {self.name} is too small: {self.n_blocks} blocks of block_size={block_size} cannot "
                f"fill one global batch of batch_size={batch_size} x world_size={world_size} blocks"
            )
        self.epoch = 0  # epoch of the next batch (advanced lazily when an epoch is used up)
        self.position = 0  # steps already taken in `epoch`
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n_blocks), self.epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), LongTensor[batch_size, block_size] each, targets[:, t] == inputs[:, t + 1]."""
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch + self.rank * self.batch_size
        blocks = self._permutation()[start : start + self.batch_size]
        self.position += 1
        chunk = _gather_blocks(self.data, blocks, self.block_size)  # [B, T+1]
        x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        return _to_device(x, self.device), _to_device(y, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "block_size": self.block_size,
            "global_batch": self.global_batch,
            "tokens": len(self.data),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (same shard, block size and global batch required)."""
        for key, mine in (("block_size", self.block_size), ("global_batch", self.global_batch)):
            if state.get(key) != mine:
                raise ValueError(f"loader state has {key}={state.get(key)}, but this loader uses {key}={mine}")
        if state.get("tokens") != len(self.data):
            raise ValueError(
                f"loader state was taken on a shard of {state.get('tokens')} tokens, but {self.name} holds "
                f"{len(self.data)}: the data changed"
            )
        if not 0 <= state["position"] <= self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"loader state epoch={state['epoch']} position={state['position']} is out of range")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


def eval_batches(
    path_or_array: str | os.PathLike | np.ndarray,
    batch_size: int,
    block_size: int,
    max_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: the shard's full blocks in order (same grid as TokenLoader), the last batch possibly short.

    ``max_tokens`` keeps only the first ``max(1, max_tokens // block_size)`` blocks, so every run measures the same
    text. With ``world_size`` > 1, rank r takes blocks r, r + world_size, ...: ranks may get one batch more or less,
    so sum losses locally and reduce once at the end.
    """
    data = open_tokens(path_or_array)
    name = "<array>" if isinstance(path_or_array, np.ndarray) else str(path_or_array)
    n_blocks = (len(data) - 1) // block_size
    if n_blocks == 0:
        _check_min_tokens(len(data), block_size, f"token shard {name}")
    if max_tokens is not None:
        n_blocks = min(n_blocks, max(1, max_tokens // block_size))
    mine = np.arange(rank, n_blocks, world_size)
    for i in range(0, len(mine), batch_size):
        chunk = _gather_blocks(data, mine[i : i + batch_size], block_size)
        yield _to_device(chunk[:, :-1].contiguous(), device), _to_device(chunk[:, 1:].contiguous(), device)

