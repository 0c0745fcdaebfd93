"""What a preparation worker process runs: hash, tokenize and flatten one batch of documents.

Kept apart from data/prepare.py and data/sources.py so a worker imports only numpy and tokenizers (data.tokenizer),
not `datasets` or torch: worker processes start in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from itertools import chain

import numpy as np

from data.tokenizer import EOT_ID

SPLIT_CODE = {"train": 0, "val": 1}


def doc_hash(text: str) -> int:
    """The stable 64-bit hash of a document that decides its split: blake2b of its UTF-8 bytes, little-endian."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class Encoded:
    """One batch of documents, tokenized. Arrays over the batch's non-empty documents, in reading order."""

    rows: int  # rows read (empty and null texts included): the read position advances by this much
    doc_row: np.ndarray  # int64[D]: each document's row within the batch
    doc_split: np.ndarray  # uint8[D]: 0 train, 1 val
    doc_tokens: np.ndarray  # int64[D]: ids per document, its EOT included
    doc_bytes: np.ndarray  # int64[D]: UTF-8 bytes per document (the denominator of bits per byte)
    tokens: np.ndarray  # [sum(doc_tokens)] ids of the documents of the wanted splits, each followed by EOT_ID


_worker_tokenizer = None  # a worker process's tokenizers.Tokenizer


def init_worker(tokenizer_json: str) -> None:
    import tokenizers

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    global _worker_tokenizer
    _worker_tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)


def encode_in_worker(texts, split, threshold, wanted, dtype) -> Encoded:
    return encode_documents(_worker_tokenizer, texts, split, threshold, wanted, dtype)


def encode_documents(backend, texts: list, split: str | None, threshold: int, wanted: tuple[str, ...],
                     dtype: str) -> Encoded:
    """Split (by ``split``, or by hash when None), tokenize and flatten one batch of raw texts."""
    keep = [(row, t) for row, t in enumerate(texts) if t]  # empty and null texts would only add a lone EOT
    if split is None:
        codes = [1 if doc_hash(t) < threshold else 0 for _, t in keep]
    else:
        codes = [SPLIT_CODE[split]] * len(keep)
    wanted_codes = {SPLIT_CODE[s] for s in wanted}
    docs = [(row, t, c) for (row, t), c in zip(keep, codes, strict=True) if c in wanted_codes]
    encodings = backend.encode_batch_fast([t for _, t, _ in docs], add_special_tokens=False) if docs else []
    ids = [e.ids for e in encodings]
    doc_tokens = np.fromiter((len(i) + 1 for i in ids), np.int64, count=len(ids))
    tokens = np.empty(int(doc_tokens.sum()), dtype=dtype)
    eot_at = np.cumsum(doc_tokens) - 1  # the last position of each document
    is_id = np.ones(len(tokens), dtype=bool)
    is_id[eot_at] = False
    tokens[is_id] = np.fromiter(chain.from_iterable(ids), dtype, count=len(tokens) - len(ids))
    tokens[eot_at] = EOT_ID
    return Encoded(
        rows=len(texts),
        doc_row=np.fromiter((r for r, _, _ in docs), np.int64, count=len(docs)),
        doc_split=np.fromiter((c for _, _, c in docs), np.uint8, count=len(docs)),
        doc_tokens=doc_tokens,
        doc_bytes=np.fromiter((len(t.encode("utf-8")) for _, t, _ in docs), np.int64, count=len(docs)),
        tokens=tokens,
    )
