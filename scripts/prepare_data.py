"""Prepare a text source into token shards once, on a CPU machine, before training on them.

    python scripts/prepare_data.py SOURCE --out DIR [--config FILE] [--data.KEY=VALUE ...]
                                   [--model.preset=P] [--model.vocab_size=V]
    python scripts/prepare_data.py hf:HuggingFaceFW/fineweb-edu:sample-100BT --out prepared/fineweb \\
        --config configs/gpt2.toml       # the GPT-2 recipe's data: 1.01e10 training tokens, ~20 GB
    python train.py --data DIR ...    (or  torchrun --nproc_per_node=N train.py --data DIR ...)

SOURCE and the --data.* options are train.py's (python train.py --help lists them): stdlib, a local file or folder
(txt jsonl json parquet csv), or hf:NAME[:CONFIG], streamed. Only --out, --config and the data.* keys,
model.preset and model.vocab_size may be given on the command line; a --config file may be a training config, its
other keys are not used here.

The prepared folder DIR:
    DIR/manifest.json     source, settings, tokenizer hash and the chunks of each split with their token counts
    DIR/tokenizer.json    the tokenizer the token ids belong to (train.py --data DIR uses it)
    DIR/train-00000.bin   flat token ids, an end-of-text id after every document: uint16 (2 bytes a token) for a
    DIR/train-00001.bin   vocabulary up to 65,536, else uint32
    DIR/val-00000.bin ...

Tokenizer: --data.tokenizer=FILE, else byte-level BPE of model.vocab_size tokens (default: the preset's, tiny's
2048) trained on the first data.tokenizer_max_mb MB of the training stream (stdlib: its fixed seeded sample) and
cached under the gptrain cache: the tokenizer train.py would train on the same source and settings.
Validation: the source's own validation split (a Hub split, files or folders named val*/valid*/dev*/test*), else
the documents whose stable hash (blake2b of the text, 64 bits) falls below data.val_fraction x 2^64.
Caps: data.max_tokens / data.max_docs (0 = none) stop reading once the training split holds that many tokens or
documents; the validation split keeps the held-out documents read until then.
Chunks: data.chunk_tokens ids per file (default 2^27: 256 MB), the last one of a split shorter; documents may
straddle two chunks (a split's chunks, concatenated, are its documents).
Workers: data.num_proc processes tokenize (0 = every core); the bytes do not depend on their number.
Resume: the manifest is rewritten after every completed chunk; after an interruption run the same command again,
it goes on from the last complete chunk (a complete folder is reused). A DIR holding data prepared with other
settings is refused: give another --out, or delete it.
Disk: 2 bytes per token with a vocabulary up to 65,536 (4 above): 1e10 tokens need 20 GB. Streaming keeps no
copy of the text; what `datasets` caches goes under data.cache_dir (or $GPTRAIN_CACHE, ~/.cache/gptrain).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prepare import MANIFEST, TOKENIZER, data_hash, prepare
from data.tokenizer import Tokenizer
from training.cli import run_script
from training.config import Config, parse_args
from training.tokenizer_cache import hf_cache_dir, train_or_reuse_tokenizer

# What may be set here: the data options and what fixes the vocabulary; every other key is a training setting.
ALLOWED_FLAGS = ("--out", "--config", "--data", "--model.preset", "--model.vocab_size")


def check_options(options: list[str]) -> None:
    """Refuse a training option on the command line: it would do nothing here, and ignoring it could mislead."""
    names = [a.partition("=")[0] for a in options if a.startswith("--")]  # "--key value" values do not start so
    for name in names:
        if name not in ALLOWED_FLAGS and not name.startswith("--data."):
            raise ValueError(f"{name}: prepare_data.py takes only --out, --config, the --data.* options, "
                             "--model.preset and --model.vocab_size (training options go to train.py)")
    if "--out" not in names:
        raise ValueError("--out DIR is required: the folder to prepare into")


def parse(argv: list[str]) -> Config:
    """SOURCE, then options: the config train.py would resolve for the same data options (a --config file's
    training keys are read and checked, then unused; its stage is not used either)."""
    if not argv or argv[0].startswith("-"):
        raise ValueError("usage: prepare_data.py SOURCE --out DIR [options]  (--help explains)")
    source, options = argv[0], argv[1:]
    check_options(options)
    return parse_args(["--data", source, *options, "--stage", "pretrain"])


def tokenizer_for(cfg: Config) -> Tokenizer:
    """The given tokenizer.json, or the one train.py trains (and caches) for this source and these settings."""
    if not cfg.data.tokenizer:
        return train_or_reuse_tokenizer(cfg)
    tok = Tokenizer.load(cfg.data.tokenizer)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tok.vocab_size:
        raise ValueError(f"--model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                         f"{cfg.data.tokenizer} ({tok.vocab_size})")
    return tok


def disk_bytes(out: Path, manifest: dict) -> int:
    files = [out / MANIFEST, out / TOKENIZER] + [out / c["file"] for v in manifest["splits"].values()
                                                 for c in v["chunks"]]
    return sum(p.stat().st_size for p in files)


def summary(cfg: Config, manifest: dict) -> str:
    out = Path(cfg.out)
    lines = [f"{'split':5s} {'chunks':>6s} {'tokens':>15s} {'text bytes':>15s} {'documents':>12s}"]
    for split, v in manifest["splits"].items():
        lines.append(f"{split:5s} {len(v['chunks']):6d} {v['tokens']:15,d} {v['bytes']:15,d} {v['documents']:12,d}")
    preset = [] if cfg.model.preset == Config().model.preset else [f"--model.preset={cfg.model.preset}"]
    train = " ".join(["train.py", "--data", str(out), *preset])
    lines += [f"on disk: {disk_bytes(out, manifest) / 1e6:,.1f} MB in {out} ({manifest['dtype']} ids)",
              f"data hash: {data_hash(manifest)}  tokenizer hash: {manifest['key']['tokenizer_hash']}",
              f"train on it:  python {train}",
              f"          or  torchrun --nproc_per_node=N {train}"]
    return "\n".join(lines)


def main(argv: list[str]) -> dict | None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return None
    cfg = parse(argv)
    if cfg.data.source == cfg.out:
        raise ValueError(f"--out {cfg.out} is the source itself")
    tok = tokenizer_for(cfg)
    d = cfg.data
    manifest = prepare(d.source, tok, cfg.out, text_column=d.text_column, val_fraction=d.val_fraction,
                       max_tokens=d.max_tokens, max_docs=d.max_docs, chunk_tokens=d.chunk_tokens, workers=d.num_proc,
                       overwrite=False, verbose=True, hf_cache_dir=hf_cache_dir(cfg))
    print(summary(cfg, manifest))
    return manifest


if __name__ == "__main__":  # the guard multiprocessing's spawned workers need (macOS, Windows)
    run_script(main, sys.argv[1:])
