"""The run's tokenizer: from a checkpoint, a given file, or trained on the source once and cached on disk."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from filelock import FileLock

from data.sources import describe_source, load_source
from data.tokenizer import Tokenizer, train_tokenizer
from model.gpt import PRESETS
from training.config import Config
from training.monitor import print0


def cache_root(cfg: Config) -> Path:
    root = cfg.data.cache_dir or os.environ.get("GPTRAIN_CACHE") or Path.home() / ".cache" / "gptrain"
    return Path(root).expanduser()


def resolve_tokenizer(cfg: Config, ckpt: dict | None, may_train: bool) -> Tokenizer:
    """The run's tokenizer: the checkpoint's (resume / --init-from), a given tokenizer.json, or one trained on the
    training split of the source and cached (trained once even when several processes start together).
    Only a stage that may train one (`may_train`: pre-training) does; the others take it from the run they start from."""
    if ckpt is not None:
        import tokenizers

        return Tokenizer(tokenizers.Tokenizer.from_str(ckpt["tokenizer"]), source=ckpt.get("path", "checkpoint"))
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    if not may_train:
        raise ValueError(f"--stage {cfg.stage} needs --init-from (the tokenizer comes from the starting run)")
    vocab = cfg.model.vocab_size or PRESETS[cfg.model.preset]["vocab_size"]
    src = describe_source(cfg.data.source, "train")  # FileNotFoundError for a missing path, nothing written
    key = hashlib.sha256(f"{src.fingerprint}|{cfg.data.text_column}|{vocab}|{cfg.data.tokenizer_max_mb}|v1"
                         .encode()).hexdigest()[:16]
    path = cache_root(cfg) / "tokenizers" / f"{vocab}-{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            print0(f"tokenizer: reusing {path}")
            return Tokenizer.load(path)
        t0 = time.perf_counter()
        ds = load_source(cfg.data.source, "train", cfg.data.text_column)
        # A deterministic sample of whole documents, up to tokenizer_max_mb of text.
        budget = int(cfg.data.tokenizer_max_mb * 1e6)
        order = ds.shuffle(seed=0)
        texts, used = [], 0
        for text in order["text"]:
            texts.append(text)
            used += len(text.encode("utf-8"))
            if used >= budget:
                break
        tok = train_tokenizer(texts, vocab_size=vocab)
        tok.save(path)
        print0(f"tokenizer: trained byte-level BPE, vocab {tok.vocab_size}, on {used / 1e6:.1f} MB in "
               f"{time.perf_counter() - t0:.1f}s -> {path}")
        return tok
