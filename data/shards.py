"""Token shards: prepared folders, the rank-aware training loader over their chunks, validation batches.

Preparation is ``data.prepare`` (``scripts/prepare_data.py``, or ``train.py`` into its cache); a prepared folder is
``manifest.json`` + ``tokenizer.json`` + ``train-00000.bin ...`` + ``val-00000.bin ...`` (the layout is described
there). Reading::

    data = open_prepared("prepared/fineweb")                 # a complete folder, or a ValueError saying why not
    loader = TokenLoader(data.chunks("train"), batch_size=8, block_size=256, seed=0, rank=r, world_size=w)
    x, y = loader.next_batch()   # LongTensor[8, 256] each; y is x shifted left by one token

Chunks are memory-mapped one at a time; the loader's memory is one chunk's block order, whatever the size of the
corpus (no array over all of its blocks).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.prepare import DEFAULT_CHUNK_TOKENS, FORMAT, MANIFEST, TOKENIZER, check_chunks, data_hash, read_manifest
from data.sources import SPLITS, VAL_FRACTION, normalize_split
from data.tokenizer import Tokenizer

# A chunk's block order is drawn from (seed, epoch, chunk); the order of the chunks from (seed, epoch, this).
_CHUNK_ORDER_STREAM = 2**31 - 1


def default_shard_dir(root: str | os.PathLike, source: str, tokenizer: Tokenizer, **settings) -> Path:
    """The trainer's cache folder of one preparation: per source and tokenizer (so switching tokenizers does not
    re-prepare back and forth), and per non-default setting (caps, splits, ...), which add a short hash."""
    slug = re.sub(r"[^\w.-]+", "_", source).strip("_.")[-48:] or "source"
    name = f"{slug}-{tokenizer.hash[:12]}"
    defaults = {"splits": SPLITS, "max_tokens": 0, "max_docs": 0, "val_fraction": VAL_FRACTION,
                "chunk_tokens": DEFAULT_CHUNK_TOKENS, "text_column": "text"}
    changed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(settings.items()) if defaults.get(k) != v}
    if changed:
        name += "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    return Path(root) / name


@dataclass(frozen=True)
class Chunk:
    """One shard file of a split: its path, its length in tokens, its dtype."""

    path: Path
    tokens: int
    dtype: str

    def open(self) -> np.ndarray:
        data = np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r")
        if len(data) != self.tokens:
            raise ValueError(f"{self.path} holds {len(data)} tokens but its manifest says {self.tokens}; prepare again")
        return data


class PreparedData:
    """A complete prepared folder: its manifest, chunks, tokenizer and identity (``hash``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            old = (self.root / "train.json").exists() or (self.root / "train.bin").exists()
            if old:
                raise ValueError(f"{self.root} holds token shards of the older single-file format (train.bin); "
                                 "prepare the source again: python scripts/prepare_data.py SOURCE --out DIR")
            raise FileNotFoundError(f"{self.root / MANIFEST} not found: not a prepared data folder "
                                    "(python scripts/prepare_data.py SOURCE --out DIR makes one)")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{self.root / MANIFEST} has format {manifest.get('format')!r}, this version reads "
                             f"{FORMAT}; prepare the source again with scripts/prepare_data.py")
        if not manifest.get("complete"):
            raise ValueError(f"{self.root} is not completely prepared (its preparation was interrupted or failed); "
                             f"run scripts/prepare_data.py {manifest.get('source', 'SOURCE')} --out {self.root} again "
                             "to finish it")
        check_chunks(self.root, manifest)
        self.manifest = manifest
        self.hash = data_hash(manifest)
        self.source = manifest["source"]
        self.tokenizer_hash = manifest["key"]["tokenizer_hash"]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def split(self, split: str) -> dict:
        split = normalize_split(split)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{self.root} holds no {split} split (it holds {list(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    def chunks(self, split: str) -> list[Chunk]:
        return [Chunk(self.root / c["file"], c["tokens"], self.manifest["dtype"]) for c in self.split(split)["chunks"]]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.root / TOKENIZER)

    def check_tokenizer(self, tok: Tokenizer, whose: str) -> None:
        """Refuse a tokenizer (of a run, a checkpoint) that is not the one the ids of this folder belong to."""
        if tok.hash != self.tokenizer_hash:
            raise ValueError(f"{self.root} was prepared with tokenizer {self.tokenizer_hash[:16]}, but {whose} uses "
                             f"tokenizer {tok.hash[:16]}: its token ids would mean other text; prepare the source with "
                             "that tokenizer (prepare_data.py --data.tokenizer=RUN/tokenizer.json)")


def open_prepared(root: str | os.PathLike) -> PreparedData:
    return PreparedData(root)


def is_prepared_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _as_chunks(chunks) -> list:
    """A list of chunks: Chunk objects (memory-mapped when read) or in-memory 1-D arrays (tests, benchmarks)."""
    if isinstance(chunks, np.ndarray):
        return [chunks]
    if isinstance(chunks, Chunk):
        return [chunks]
    return list(chunks)


def _length(chunk) -> int:
    return chunk.tokens if isinstance(chunk, Chunk) else len(chunk)


def _check_min_tokens(n_tokens: int, block_size: int, what: str) -> None:
    if n_tokens < block_size + 1:
        raise ValueError(
            f"{what} is too small: {n_tokens} tokens cannot fill one block of block_size={block_size} "
            f"(needs {block_size + 1} tokens: inputs plus the shifted targets)"
        )


def blocks_per_chunk(chunks, block_size: int) -> np.ndarray:
    """int64[n_chunks]: the blocks of each chunk. A chunk of n tokens holds (n - 1) // block_size windows of
    block_size + 1 tokens; blocks never straddle chunks (a chunk's last < block_size + 1 tokens are never a target)."""
    return np.array([max(0, (_length(c) - 1) // block_size) for c in _as_chunks(chunks)], dtype=np.int64)


def cut_rows(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """A batch of (B, T) windows as (B * T / length, length) rows: the same tokens in the same order, each window
    cut into T / length consecutive pieces (the sequence-length warmup; every row restarts its positions at 0)."""
    return {key: value.reshape(-1, length) for key, value in batch.items()}


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




class _ChunkReader:
    """The data of one chunk at a time: a memory map of the chunk last asked for (an array chunk as it is)."""

    def __init__(self, chunks: list):
        self.chunks, self.index, self.current = chunks, -1, None

    def data(self, index: int) -> np.ndarray:
        if index != self.index:
            c = self.chunks[index]
            self.current, self.index = (c.open() if isinstance(c, Chunk) else c), index
        return self.current

    def gather(self, segments: list[tuple[int, np.ndarray]], block_size: int) -> torch.Tensor:
        """LongTensor[sum of blocks, block_size + 1]: the blocks of each (chunk, block ids) segment, in order."""
        return torch.cat([_gather_blocks(self.data(c), ids, block_size) for c, ids in segments])


class TokenLoader:
    """Batches of ``block_size`` tokens from a split's chunks, deterministic from ``seed``, sliced per rank.

    Each chunk is cut into a fixed grid of ``(tokens - 1) // block_size`` windows of ``block_size + 1`` tokens
    (neighbours share one token: the last target of a block is the first input of the next; no block straddles
    two chunks). An epoch visits the chunks in an order drawn from ``(seed, epoch)`` and the blocks of each chunk
    in an order drawn from ``(seed, epoch, chunk)`` -- chunk 0 from ``(seed, epoch)``, as the single-file loader
    did, so a one-chunk corpus (the stdlib) is read in the same order as before the chunked format. Memory: the
    block order of one chunk, and two numbers per chunk.

    A step takes the next ``batch_size * world_size`` blocks of the epoch's sequence (the global batch, possibly
    from two chunks); rank r gets rows ``[r*B, (r+1)*B)``, so the ranks' batches are disjoint and together equal
    the single-process batch of ``B * world_size``. An epoch ends when less than one global batch is left (the
    remainder is skipped, so every rank runs the same steps).

    ``state_dict()`` is the same on every rank (epoch and step within it), so rank 0's copy restores them all,
    also under a different world size with the same global batch.
    """

    def __init__(
        self,
        chunks: Sequence[Chunk | np.ndarray] | Chunk | np.ndarray,
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
        self.chunks = _as_chunks(chunks)
        first = self.chunks[0] if self.chunks else None
        self.name = str(first.path.parent) if isinstance(first, Chunk) else "<array>"
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.global_batch = batch_size * world_size
        self.blocks = blocks_per_chunk(self.chunks, block_size)  # int64[n_chunks]
        self.n_blocks = int(self.blocks.sum())
        self.n_tokens = sum(_length(c) for c in self.chunks)
        if self.n_blocks == 0:
            _check_min_tokens(max((_length(c) for c in self.chunks), default=0), block_size,
                              f"token shards of {self.name}")
        self.steps_per_epoch = self.n_blocks // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"token shards of {self.name} are too small: {self.n_blocks} blocks of block_size={block_size} "
                f"cannot fill one global batch of batch_size={batch_size} x world_size={world_size} blocks"
            )
        self.epoch = 0  # epoch of the next batch (advanced lazily when an epoch is used up)
        self.position = 0  # steps already taken in `epoch`
        self._reader = _ChunkReader(self.chunks)
        self._plan_epoch, self._order, self._ends = -1, None, None
        self._perm_key, self._perm = (-1, -1), None

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(the chunks in this epoch's order, the cumulative block count along that order), int64[n_chunks] each."""
        if self._plan_epoch != self.epoch:
            n = len(self.chunks)
            rng = np.random.default_rng([self.seed, self.epoch, _CHUNK_ORDER_STREAM])
            self._order = rng.permutation(n) if n > 1 else np.zeros(1, dtype=np.int64)
            self._ends = np.cumsum(self.blocks[self._order])
            self._plan_epoch = self.epoch
        return self._order, self._ends

    def _block_order(self, chunk: int) -> np.ndarray:
        """This epoch's order of one chunk's blocks (the one permutation the loader holds)."""
        if self._perm_key != (self.epoch, chunk):
            seeds = [self.seed, self.epoch] if chunk == 0 else [self.seed, self.epoch, chunk]
            self._perm = np.random.default_rng(seeds).permutation(int(self.blocks[chunk]))
            self._perm_key = (self.epoch, chunk)
        return self._perm

    def _segments(self, start: int, count: int) -> list[tuple[int, np.ndarray]]:
        """Blocks [start, start + count) of this epoch's sequence as (chunk, block ids) segments."""
        order, ends = self._epoch_plan()
        segments = []
        while count:
            i = int(np.searchsorted(ends, start, side="right"))  # the chunk of the order that holds block `start`
            chunk = int(order[i])
            first = start - int(ends[i] - self.blocks[chunk])
            take = min(count, int(ends[i]) - start)
            segments.append((chunk, self._block_order(chunk)[first : first + take]))
            start, count = start + take, count - take
        return segments

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), LongTensor[batch_size, block_size] each, targets[:, t] == inputs[:, t + 1]."""
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch + self.rank * self.batch_size
        self.position += 1
        chunk = self._reader.gather(self._segments(start, self.batch_size), self.block_size)  # [B, T+1]
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
            "tokens": self.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (same shards, block size and global batch required)."""
        for key, mine in (("block_size", self.block_size), ("global_batch", self.global_batch)):
            if state.get(key) != mine:
                raise ValueError(f"loader state has {key}={state.get(key)}, but this loader uses {key}={mine}")
        if state.get("tokens") != self.n_tokens:
            raise ValueError(
                f"loader state was taken on shards of {state.get('tokens')} tokens, but {self.name} holds "
                f"{self.n_tokens}: the data changed"
            )
        if not 0 <= state["position"] <= self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"loader state epoch={state['epoch']} position={state['position']} is out of range")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


def count_eval_blocks(chunks, block_size: int, max_tokens: int | None = None) -> int:
    """The blocks ``eval_batches`` scores: every chunk's grid, or the first ``max(1, max_tokens // block_size)``."""
    n_blocks = int(blocks_per_chunk(chunks, block_size).sum())
    return min(n_blocks, max(1, max_tokens // block_size)) if max_tokens else n_blocks


def eval_batches(
    chunks: Sequence[Chunk | np.ndarray] | Chunk | np.ndarray,
    batch_size: int,
    block_size: int,
    max_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: the chunks' full blocks in order (same grid as TokenLoader), the last batch possibly short.

    ``max_tokens`` keeps only the first ``max(1, max_tokens // block_size)`` blocks, so every run measures the same
    text. With ``world_size`` > 1, rank r takes blocks r, r + world_size, ...: ranks may get one batch more or less,
    so sum losses locally and reduce once at the end.
    """
    chunks = _as_chunks(chunks)
    blocks = blocks_per_chunk(chunks, block_size)
    if blocks.sum() == 0:
        _check_min_tokens(max((_length(c) for c in chunks), default=0), block_size, "the validation shards")
    ends = np.cumsum(blocks)  # block g lies in the chunk i with ends[i-1] <= g < ends[i]
    reader = _ChunkReader(chunks)
    mine = np.arange(rank, count_eval_blocks(chunks, block_size, max_tokens), world_size)
    for i in range(0, len(mine), batch_size):
        g = mine[i : i + batch_size]
        chunk_of = np.searchsorted(ends, g, side="right")
        local = g - (ends[chunk_of] - blocks[chunk_of])
        segments = [(int(c), local[chunk_of == c]) for c in np.unique(chunk_of)]
        batch = reader.gather(segments, block_size)
        yield _to_device(batch[:, :-1].contiguous(), device), _to_device(batch[:, 1:].contiguous(), device)
