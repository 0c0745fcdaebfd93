"""scripts/prepare_data.py, run as users run it: a subprocess on a small JSONL folder, then train.py on its output."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data.encode import doc_hash
from data.shards import open_prepared
from data.sources import tokenizer_texts, val_threshold
from data.tokenizer import EOT_ID, train_tokenizer
from tests.conftest import TINY_ARGS, TRAIN_MODULES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "prepare_data.py"
CHUNK = 16384  # tokens per chunk: the ~0.4 MB corpus fills about 20
VAL_FRACTION = 0.05


def jsonl_corpus(folder: Path) -> list[str]:
    """Two JSONL files of real Python source, one document per top-level block (about 200); returns the texts."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [block for name in TRAIN_MODULES for block in (stdlib / name).read_text("utf-8").split("\n\n\n")
             if block.strip()]
    folder.mkdir()
    half = len(texts) // 2
    for k, part in enumerate((texts[:half], texts[half:])):
        (folder / f"part{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part), "utf-8")
    return texts


def run(script: str | Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture()
def env(tmp_path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GPTRAIN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}


def test_prepare_cli_layout_train_on_it_refuse_other_settings_reuse(tmp_path, env, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "prepared"
    texts = jsonl_corpus(src)
    command = [str(src), "--out", str(out), "--model.vocab_size=384", f"--data.chunk_tokens={CHUNK}",
               f"--data.val_fraction={VAL_FRACTION}", "--data.num_proc=2"]
    first = run(SCRIPT, *command, env=env)
    assert first.returncode == 0, first.stderr
    data = open_prepared(out)  # complete, every chunk of its recorded length
    # The documented layout: manifest, tokenizer, train-00000.bin ... val-00000.bin, uint16 ids
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    n_train, n_val = len(data.chunks("train")), len(data.chunks("val"))
    assert n_train > 10 and n_val == 1
    assert names == ["manifest.json", "tokenizer.json", *[f"train-{i:05d}.bin" for i in range(n_train)],
                     "val-00000.bin"]
    # Validation by the hash rule; every document once, each ended by EOT; full chunks but the last
    val_docs = [t for t in texts if doc_hash(t) < val_threshold(VAL_FRACTION)]
    for split, docs in (("train", [t for t in texts if t not in val_docs]), ("val", val_docs)):
        ids = np.concatenate([c.open() for c in data.chunks(split)])
        assert data.split(split)["documents"] == len(docs) == int((ids == EOT_ID).sum())
        assert data.split(split)["bytes"] == sum(len(t.encode("utf-8")) for t in docs)
        assert [c.tokens for c in data.chunks(split)][:-1] == [CHUNK] * (len(data.chunks(split)) - 1)
        assert sum((out / c.path.name).stat().st_size for c in data.chunks(split)) == 2 * len(ids)
    # The tokenizer train.py would train on this source: the first tokenizer_max_mb (8) MB of the training stream
    expected = train_tokenizer(tokenizer_texts(str(src), "text", 8_000_000, VAL_FRACTION), vocab_size=384)
    assert data.tokenizer_hash == expected.hash
    assert f"data hash: {data.hash}" in first.stdout and f"python train.py --data {out}" in first.stdout

    trained = run("train.py", "--data", str(out), "--out", str(tmp_path / "run"), "--train.max_steps=3",
                  "--log.tensorboard=false", *TINY_ARGS, env=env)
    assert trained.returncode == 0, trained.stderr
    assert f"prepared data {data.hash[:16]} in {out}" in trained.stdout
    assert not list((tmp_path / "cache").rglob("manifest.json"))  # train.py prepared nothing itself

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = run(SCRIPT, *command[:-1], f"--data.chunk_tokens={2 * CHUNK}", env=env)
    assert other.returncode == 1 and "error:" in other.stderr and "chunk_tokens" in other.stderr, other.stderr
    monkeypatch.setenv("GPTRAIN_CACHE", env["GPTRAIN_CACHE"])
    load_script().main(command)  # the same command again, in this process (a subprocess costs 2 s of imports)
    assert f"reusing {out}" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # neither run wrote a byte
    assert open_prepared(out).hash == data.hash


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("option", ["--train.max_steps=3", "--model.n_layer=2", "--stage=sft", "--resume"])
def test_prepare_cli_refuses_training_options(tmp_path, option):
    with pytest.raises(ValueError, match=option.partition("=")[0]):
        load_script().main(["stdlib", "--out", str(tmp_path / "p"), option])
    assert not (tmp_path / "p").exists()


def test_prepare_cli_help_explains_layout_and_needs_out(capsys, tmp_path):
    script = load_script()
    script.main(["--help"])
    shown = capsys.readouterr().out
    for fact in ("DIR/manifest.json", "DIR/tokenizer.json", "DIR/train-00000.bin", "val_fraction x 2^64",
                 "data.max_tokens", "chunk_tokens", "run the same command again", "2 bytes per token"):
        assert fact in shown
    with pytest.raises(ValueError, match="--out DIR is required"):
        script.main(["stdlib"])
