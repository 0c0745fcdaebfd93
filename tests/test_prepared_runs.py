"""train.py and evaluate.py on a prepared folder (--data DIR): its tokenizer, the refusals that keep a run on the data
and tokenizer it started with, and the multi-node rule (only prepared data)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.prepare import prepare
from data.shards import open_prepared
from data.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import TINY_ARGS
from train import main

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["--train.max_steps=6", "--eval.interval=0", "--eval.max_tokens=512", "--log.tensorboard=false"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_dir, tiny_run) -> Path:
    """corpus_dir prepared with the tiny run's tokenizer into a folder of its own."""
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    prepare(str(corpus_dir), Tokenizer.load(tiny_run / "tokenizer.json"), out, workers=1, verbose=False)
    return out


@pytest.fixture(scope="module")
def other_tokenizer(corpus_dir, tmp_path_factory) -> Path:
    texts = [p.read_text(encoding="utf-8")[:20_000] for p in sorted((corpus_dir / "train").iterdir())]
    path = tmp_path_factory.mktemp("tok") / "other.json"
    train_tokenizer(texts[:3], vocab_size=300).save(path)
    return path


def test_train_on_a_prepared_folder_uses_its_tokenizer_and_records_its_hash(prepared, tmp_path):
    out = tmp_path / "run"
    main(["--data", str(prepared), "--out", str(out), *TINY_ARGS, *STEPS])
    data = open_prepared(prepared)
    assert Tokenizer.load(out / "tokenizer.json").hash == data.tokenizer_hash
    from training import checkpoint

    assert checkpoint.load(out)["loader"]["data_hash"] == data.hash


@pytest.fixture(scope="module")
def other_run(other_tokenizer, corpus_dir, tmp_path_factory) -> Path:
    """A run whose tokenizer is not the prepared folder's."""
    out = tmp_path_factory.mktemp("runs") / "other"
    main(["--data", str(corpus_dir), "--out", str(out), *TINY_ARGS, *STEPS, f"--data.tokenizer={other_tokenizer}"])
    return out


def test_a_tokenizer_that_is_not_the_folders_is_refused_naming_both(prepared, other_tokenizer, other_run, tmp_path):
    theirs, mine = open_prepared(prepared).tokenizer_hash[:16], Tokenizer.load(other_tokenizer).hash[:16]
    assert theirs != mine
    with pytest.raises(ValueError) as e:  # a tokenizer given with the folder
        main(["--data", str(prepared), "--out", str(tmp_path / "a"), *TINY_ARGS, *STEPS,
              f"--data.tokenizer={other_tokenizer}"])
    assert theirs in str(e.value) and mine in str(e.value) and "--data.tokenizer" in str(e.value)
    with pytest.raises(ValueError) as e:  # the tokenizer of the run --init-from starts from
        main(["--data", str(prepared), "--out", str(tmp_path / "b"), "--init-from", str(other_run), *TINY_ARGS,
              *STEPS])
    assert theirs in str(e.value) and mine in str(e.value) and "--init-from" in str(e.value)
    assert not (tmp_path / "b").exists()
    proc = subprocess.run([sys.executable, "scripts/evaluate.py", str(other_run), "--data", str(prepared)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and theirs in proc.stderr and mine in proc.stderr, proc.stderr[-2000:]


def test_evaluate_scores_a_prepared_folder_as_the_trainer_does(prepared, tiny_run, tmp_path):
    """evaluate.py --data DIR reads the folder's validation chunks: the same figure as the run's own source, which
    is the same corpus prepared into the cache."""
    figures = []
    for data in (str(prepared), None):
        out = tmp_path / f"{len(figures)}.json"
        cmd = [sys.executable, "scripts/evaluate.py", str(tiny_run), "--json", str(out)]
        subprocess.run(cmd + (["--data", data] if data else []), cwd=ROOT, check=True, capture_output=True,
                       timeout=120)
        result = json.loads(out.read_text())
        assert result["data"]["text"].startswith(data or "stdlib") or data is None, result["data"]
        figures.append(result["bits_per_byte"])
    assert figures[0] == figures[1]


def test_resume_on_data_prepared_differently_is_refused_naming_both_hashes(corpus_dir, tiny_run, tmp_path):
    tok = Tokenizer.load(tiny_run / "tokenizer.json")
    folder, out = tmp_path / "prepared", tmp_path / "run"
    prepare(str(corpus_dir), tok, folder, workers=1, verbose=False)
    first = open_prepared(folder).hash
    main(["--data", str(folder), "--out", str(out), *TINY_ARGS, *STEPS, "--train.stop_after_steps=3"])
    # The same folder path, prepared again with a document cap: other data under the same name
    for p in folder.iterdir():
        p.unlink()
    prepare(str(corpus_dir), tok, folder, max_docs=12, workers=1, verbose=False)
    second = open_prepared(folder).hash
    with pytest.raises(ValueError) as e:
        main(["--out", str(out), "--resume"])
    assert first[:16] in str(e.value) and second[:16] in str(e.value) and "--resume" in str(e.value)


def test_multi_node_torchrun_refuses_a_source_that_is_not_prepared(corpus_dir, prepared, tmp_path):
    """Under torchrun with 2 nodes (WORLD_SIZE 2, one process per node), train.py stops before any rendezvous and
    names prepare_data.py; nothing is trained, prepared or written."""
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
           "GPTRAIN_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "train.py", "--data", str(corpus_dir), "--out", str(tmp_path / "run"), *TINY_ARGS, *STEPS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "2 nodes" in proc.stderr and "prepare_data.py" in proc.stderr, proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_resume_after_the_corpus_is_touched_finds_the_same_data(corpus_dir, tmp_path, monkeypatch):
    """The data hash is over the bytes read (each chunk's sha256), not the source's file dates: a corpus touched
    (or copied) after the run started is prepared again into the cache, to the same bytes, and --resume goes on."""
    corpus, out, cache = tmp_path / "corpus", tmp_path / "run", tmp_path / "cache"
    shutil.copytree(corpus_dir, corpus)
    monkeypatch.setenv("GPTRAIN_CACHE", str(cache))
    main(["--data", str(corpus), "--out", str(out), *TINY_ARGS, *STEPS, "--train.stop_after_steps=3"])
    (shard_dir,) = (cache / "shards").iterdir()
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for c in manifest["splits"]["train"]["chunks"]:
        assert c["sha256"] == hashlib.sha256((shard_dir / c["file"]).read_bytes()).hexdigest()
    first = open_prepared(shard_dir).hash
    for p in (corpus / "train").iterdir():
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    main(["--out", str(out), "--resume"])
    new = json.loads((shard_dir / "manifest.json").read_text())
    assert new["key"]["source_fingerprint"] != manifest["key"]["source_fingerprint"]  # it was prepared again
    assert open_prepared(shard_dir).hash == first


def test_old_format_shards_and_stage_mismatches_are_refused_through_train_py(prepared, tiny_run, tmp_path):
    """--data given a folder of the older single-file shard format, and --stage sft / dpo given a prepared
    pre-training folder, stop with what was expected, before anything is written."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "train.bin").write_bytes(b"\0\0" * 100)
    (old / "train.json").write_text('{"format": 1, "tokens": 100, "dtype": "uint16"}')
    with pytest.raises(ValueError, match="older single-file format.*prepare_data.py"):
        main(["--data", str(old), "--out", str(tmp_path / "a"), *TINY_ARGS, *STEPS])
    for stage, expected in (("sft", "chat records"), ("dpo", "preference pairs")):
        with pytest.raises(ValueError, match=f"prepared pre-training corpus.*{expected}"):
            main(["--stage", stage, "--data", str(prepared), "--init-from", str(tiny_run),
                  "--out", str(tmp_path / stage), "--train.max_steps=2"])
        assert not (tmp_path / stage).exists()
    assert not (tmp_path / "a").exists()
