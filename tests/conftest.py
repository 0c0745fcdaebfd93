"""Shared test fixtures: a small real corpus on disk and one tiny pre-trained run, made once per session.

Tests that need a trained checkpoint (sampling, evaluation, export, fine-tuning) reuse `tiny_run` instead of
training their own. Everything runs offline, on CPU, with caches inside the session's temporary folder.
"""

from __future__ import annotations

import importlib
import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def optional_import(name: str):
    """Import an optional test dependency (the `hf` extra's transformers): without it the test is skipped, except
    under CI (CI set, as .ci/run does), which installs every test dependency: there a missing one fails the run
    instead of turning the tests that need it into silent skips."""
    if os.environ.get("CI", "").lower() in ("", "0", "false"):
        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"CI is set but the optional test dependency {name!r} cannot be imported: {e}", pytrace=False)


# Standard-library modules copied (as .txt documents) into the test corpus: ~400 KB of real Python source.
TRAIN_MODULES = ["argparse.py", "textwrap.py", "string.py", "shlex.py", "difflib.py", "fnmatch.py", "glob.py",
                 "heapq.py", "bisect.py", "functools.py", "contextlib.py", "dataclasses.py", "enum.py", "abc.py",
                 "copy.py", "pprint.py", "reprlib.py", "operator.py", "keyword.py", "colorsys.py"]
VAL_MODULES = ["calendar.py", "fractions.py"]

# The tiny model every reuse-test shares: 2 layers x 64 wide, vocab 384, context 64.
TINY_ARGS = ["--train.optimizer=adamw", "--model.vocab_size=384", "--model.n_layer=2", "--model.n_embd=64",
             "--model.n_head=4",
             "--model.block_size=64", "--train.batch_size=16", "--train.lr=3e-3", "--train.warmup_steps=10",
             "--eval.max_tokens=4096", "--log.interval=10", "--log.hist_interval=100", "--eval.sample_tokens=16", "--data.num_proc=1"]


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Tokenizers and shards go to a per-session cache, never to ~/.cache."""
    cache = tmp_path_factory.mktemp("gptrain-cache")
    old = os.environ.get("GPTRAIN_CACHE")
    os.environ["GPTRAIN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("GPTRAIN_CACHE", None)
    else:
        os.environ["GPTRAIN_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module's tests run: tiny matmuls gain nothing from a second thread, and on a shared
    2-core machine spin-waiting threads can make them many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder source with train/ and val/ subfolders of real Python source as .txt documents."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for split, names in (("train", TRAIN_MODULES), ("val", VAL_MODULES)):
        (root / split).mkdir()
        for name in names:
            src = stdlib / name
            if src.exists():
                (root / split / (name[:-3] + ".txt")).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_dir) -> Path:
    """One tiny model pre-trained for 150 steps on corpus_dir (about 10 s on 2 cores); read-only for tests."""
    from train import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    main(["--data", str(corpus_dir), "--out", str(out), "--train.max_steps=150", "--eval.interval=50",
          "--ckpt.interval=150", *TINY_ARGS])
    return out


def assert_resumes_exactly(run, tmp_path: Path, args: list[str], stop_after: int) -> Path:
    """run(out, *args) uninterrupted into tmp_path/whole, and stopped after `stop_after` steps into tmp_path/split
    then resumed: the same last step, bitwise the same weights, the same logged training losses. Returns whole."""
    import json

    import torch

    from train import main
    from training import checkpoint

    whole, split = tmp_path / "whole", tmp_path / "split"
    run(whole, *args)
    run(split, *args, f"--train.stop_after_steps={stop_after}")
    main(["--out", str(split), "--resume"])
    a, b = checkpoint.load(whole), checkpoint.load(split)
    assert a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    assert losses(whole) == losses(split)
    return whole
