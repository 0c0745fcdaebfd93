"""The run's tokenizer: from a checkpoint, a given file, a prepared data folder, or trained on the source once and
cached on disk."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from filelock import FileLock

from data.shards import is_prepared_dir, open_prepared
from data.sources import STDLIB, describe_source, tokenizer_texts
from data.tokenizer import Tokenizer, train_tokenizer
from model.gpt import PRESETS
from training.config import Config
from training.monitor import print0


def cache_root(cfg: Config) -> Path:
    root = cfg.data.cache_dir or os.environ.get("GPTRAIN_CACHE") or Path.home() / ".cache" / "gptrain"
    return Path(root).expanduser()


def resolve_tokenizer(cfg: Config, ckpt: dict | None, may_train: bool, verbose: bool = True) -> Tokenizer:
    """The run's tokenizer: the checkpoint's (resume / --init-from), a given tokenizer.json, a prepared data folder's,
    or one trained on the training stream of the source and cached (trained once even when several processes start
    together). Only a stage that may train one (`may_train`: pre-training) does; the others take it from the run
    they start from. Whether a prepared folder's ids belong to the tokenizer chosen here is checked by the stage."""
    if ckpt is not None:
        import tokenizers

        return Tokenizer(tokenizers.Tokenizer.from_str(ckpt["tokenizer"]), source=ckpt.get("path", "checkpoint"))
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    if not may_train:
        raise ValueError(f"--stage {cfg.stage} needs --init-from (the tokenizer comes from the starting run)")
    if is_prepared_dir(cfg.data.source):
        return open_prepared(cfg.data.source).tokenizer()
    return train_or_reuse_tokenizer(cfg, verbose)


def train_or_reuse_tokenizer(cfg: Config, verbose: bool = True) -> Tokenizer:
    """A BPE tokenizer of the configured vocabulary trained on the first data.tokenizer_max_mb of the source's
    training stream (``data.sources.tokenizer_texts``: stdlib keeps its seeded sample), cached by source and
    settings under the gptrain cache."""
    say = print0 if verbose else (lambda *a, **k: None)
    vocab = cfg.model.vocab_size or PRESETS[cfg.model.preset]["vocab_size"]
    src = describe_source(cfg.data.source, "train")  # FileNotFoundError for a missing path, nothing written
    # v1: a seeded sample of the whole source (still stdlib's rule); v2: the first MB of the training stream
    rule = "v1" if cfg.data.source == STDLIB else f"v2|{cfg.data.val_fraction}"
    if cfg.data.pretokenizer != "gpt2":  # GPT-2's regex keeps the keys of the caches written before the choice
        rule += f"|{cfg.data.pretokenizer}"
    key = hashlib.sha256(f"{src.fingerprint}|{cfg.data.text_column}|{vocab}|{cfg.data.tokenizer_max_mb}|{rule}"
                         .encode()).hexdigest()[:16]
    path = cache_root(cfg) / "tokenizers" / f"{vocab}-{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            say(f"tokenizer: reusing {path}")
            return Tokenizer.load(path)
        t0 = time.perf_counter()
        texts = tokenizer_texts(cfg.data.source, cfg.data.text_column, int(cfg.data.tokenizer_max_mb * 1e6),
                                cfg.data.val_fraction, cache_dir=hf_cache_dir(cfg))
        tok = train_tokenizer(texts, vocab_size=vocab, pretokenizer=cfg.data.pretokenizer)
        tok.save(path)
        used = sum(len(t.encode("utf-8")) for t in texts)
        say(f"tokenizer: trained byte-level BPE ({cfg.data.pretokenizer} pre-tokens), vocab {tok.vocab_size}, on "
            f"{used / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s -> {path}")
        return tok


def hf_cache_dir(cfg: Config) -> str:
    """Where `datasets` keeps what streaming needs (Hub file lists, its module cache): under the gptrain cache, so
    data.cache_dir / $GPTRAIN_CACHE moves everything. Streaming writes no Arrow copy of the data."""
    return str(cache_root(cfg) / "datasets")
