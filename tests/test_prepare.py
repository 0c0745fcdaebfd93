"""Preparation at scale (data.prepare): streamed local and dataset-repository sources, caps, chunk boundaries,
resume after a kill, worker counts, the loader's memory, bad input. Real files, a real BPE tokenizer, real
`datasets` streaming, a real killed subprocess; every expectation is a hand encoding (``tok.encode`` of each
document + EOT, in order) or the bytes of another preparation."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data.prepare
from data.prepare import READ_BATCH_DOCS, prepare, read_manifest
from data.shards import Chunk, TokenLoader, open_prepared
from data.tokenizer import EOT_ID, Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
# Words with 2-, 3- and 4-byte UTF-8 characters, so byte counts differ from character counts.
WORDS = "alpha beta gamma delta café naïve 😀 日本 def return x = 1 + 2 ( ) : \n".split(" ")
SMALL_TASK_CHARS = 2048  # tasks of ~10 documents instead of 256K characters: many tasks on a small corpus


def make_docs(n: int, seed: int, words: tuple[int, int] = (5, 60)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


def held_out(text: str, val_fraction: float) -> bool:
    """The documented rule, written out: blake2b-64 of the UTF-8 text, little-endian, below val_fraction x 2^64."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < int(val_fraction * 2**64)


def hash_split(docs: list, val_fraction: float) -> dict[str, list[str]]:
    kept = [d for d in docs if d]  # empty and null texts are dropped
    return {"train": [d for d in kept if not held_out(d, val_fraction)],
            "val": [d for d in kept if held_out(d, val_fraction)]}


def hand_ids(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d) + [EOT_ID]
    return np.array(ids, dtype=np.uint16)


def split_ids(out: Path, split: str) -> np.ndarray:
    """A split's chunks read back with numpy (not the loader), concatenated."""
    m = read_manifest(out)
    return np.concatenate([np.fromfile(out / c["file"], dtype=m["dtype"]) for c in m["splits"][split]["chunks"]])


def write_jsonl(path: Path, texts: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")


def write_parquet(path: Path, texts: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path)


WRITERS = {"jsonl": write_jsonl, "parquet": write_parquet}


def write_folder(root: Path, fmt: str, parts: dict[str, list]) -> Path:
    for name, texts in parts.items():
        WRITERS[fmt](root / f"{name}.{fmt}", texts)
    return root


def same_files(a: Path, b: Path) -> None:
    """Two prepared folders hold the same chunk files, byte for byte, and the same manifest but for its timing."""
    ma, mb = read_manifest(a), read_manifest(b)
    assert {k: v for k, v in ma.items() if k != "seconds"} == {k: v for k, v in mb.items() if k != "seconds"}
    for split in ma["splits"]:
        for c in ma["splits"][split]["chunks"]:
            assert (a / c["file"]).read_bytes() == (b / c["file"]).read_bytes(), c["file"]


def folder_files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def expected_files(out: Path) -> set[str]:
    m = read_manifest(out)
    chunks = {c["file"] for v in m["splits"].values() for c in v["chunks"]}
    return chunks | {"manifest.json", "tokenizer.json", ".prepare.lock"}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(make_docs(300, seed=99), vocab_size=400)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks of ~10 documents and reads of 32 rows: many tasks and checkpoints on a corpus of a few hundred KB.
    The code path is the production one; only the two sizes shrink."""
    monkeypatch.setattr(data.prepare, "tasks", functools.partial(data.prepare.tasks, max_chars=SMALL_TASK_CHARS))
    monkeypatch.setattr(data.prepare, "READ_BATCH_DOCS", 32)


@pytest.fixture
def rows_read(monkeypatch) -> dict:
    """Counts what preparation reads from the stream: the rows iter_texts yields, and the skip it was asked for."""
    seen = {"rows": 0, "skips": []}
    real = data.prepare.iter_texts

    def counting(rp, batch_docs=1024, skip=0, cache_dir=None):
        seen["skips"].append(skip)
        for batch in real(rp, batch_docs, skip, cache_dir):
            seen["rows"] += len(batch)
            yield batch

    monkeypatch.setattr(data.prepare, "iter_texts", counting)
    return seen


# --- 1. streamed local folders: token ids and counts -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hashed", "named"])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_local_folder_is_streamed_into_the_hand_encoding(tmp_path, tok, hf_cache, fmt, layout):
    docs = make_docs(240, seed=1)
    docs[7], docs[50], docs[51] = "", None, ""  # dropped: they would only add a lone EOT
    if layout == "hashed":  # no validation files: the hash rule holds documents out
        src = write_folder(tmp_path / "src", fmt, {"a-0": docs[:100], "a-1": docs[100:180], "b-0": docs[180:]})
        expected = hash_split(docs, 0.05)
    else:  # files named train* and val*: the source's own split
        src = write_folder(tmp_path / "src", fmt, {"train-0": docs[:120], "train-1": docs[120:200],
                                                    "val-0": docs[200:]})
        expected = {"train": [d for d in docs[:200] if d], "val": [d for d in docs[200:] if d]}
    assert expected["val"] and expected["train"]
    out = tmp_path / "out"
    m = prepare(str(src), tok, out, val_fraction=0.05, workers=1, verbose=False, hf_cache_dir=hf_cache)

    assert m["complete"] and m["dtype"] == "uint16" and m["eot_id"] == EOT_ID and m["vocab_size"] == tok.vocab_size
    for split, texts in expected.items():
        np.testing.assert_array_equal(split_ids(out, split), hand_ids(tok, texts))
        v = m["splits"][split]
        assert v["documents"] == len(texts)
        assert v["tokens"] == len(hand_ids(tok, texts)) == sum(c["tokens"] for c in v["chunks"])
        assert v["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert Tokenizer.load(out / "tokenizer.json").hash == tok.hash == m["key"]["tokenizer_hash"]
    assert folder_files(out) == expected_files(out)  # no partial chunk or temporary left behind
    assert open_prepared(out).chunks("train")[0].open().dtype == np.uint16
    assert not list(Path(hf_cache).rglob("*.arrow"))  # streamed: no Arrow copy of the source in the cache


# --- 2. hf:FOLDER:CONFIG: a dataset repository whose README declares configs ------------------------------------


README = """\
---
configs:
- config_name: small
  data_files:
  - split: train
    path: small/train-*.parquet
  - split: validation
    path: small/validation-*.parquet
- config_name: web
  data_files:
  - split: train
    path: web/*.parquet
---
# A dataset repository on disk, laid out as on the Hub
"""


@pytest.fixture(scope="module")
def dataset_repo(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("repo") / "my-dataset"
    docs = {"small-train": make_docs(60, seed=2), "small-val": make_docs(20, seed=3), "web": make_docs(200, seed=4)}
    write_parquet(root / "small" / "train-00000.parquet", docs["small-train"][:30])
    write_parquet(root / "small" / "train-00001.parquet", docs["small-train"][30:])
    write_parquet(root / "small" / "validation-00000.parquet", docs["small-val"])
    write_parquet(root / "web" / "part-0.parquet", docs["web"][:120])
    write_parquet(root / "web" / "part-1.parquet", docs["web"][120:])
    (root / "README.md").write_text(README, encoding="utf-8")
    return root, docs


def test_dataset_repository_config_reads_its_own_files_and_splits(tmp_path, tok, hf_cache, dataset_repo):
    root, docs = dataset_repo
    # `small` has a validation split: read as it is
    small = tmp_path / "small"
    m = prepare(f"hf:{root}:small", tok, small, workers=1, verbose=False, hf_cache_dir=hf_cache)
    np.testing.assert_array_equal(split_ids(small, "train"), hand_ids(tok, docs["small-train"]))
    np.testing.assert_array_equal(split_ids(small, "val"), hand_ids(tok, docs["small-val"]))
    assert m["splits"]["val"]["documents"] == 20 and m["kind"] == "hub"
    # `web` has only train: the hash rule holds documents out
    web = tmp_path / "web"
    prepare(f"hf:{root}:web", tok, web, val_fraction=0.05, workers=1, verbose=False, hf_cache_dir=hf_cache)
    expected = hash_split(docs["web"], 0.05)
    assert expected["val"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_ids(web, split), hand_ids(tok, expected[split]))


def test_a_prepared_dataset_repository_is_reused_without_opening_it(tmp_path, tok, hf_cache, dataset_repo,
                                                                     monkeypatch):
    """The second preparation of the same Hub-path source finds the folder complete and never opens the source
    (for a real Hub dataset: no network), so a cached preparation also works offline."""
    root, _ = dataset_repo
    out = tmp_path / "out"
    first = prepare(f"hf:{root}:small", tok, out, workers=1, verbose=False, hf_cache_dir=hf_cache)

    def no_reading(*args, **kwargs):
        raise AssertionError("the source was opened")

    monkeypatch.setattr(data.prepare, "read_passes", no_reading)
    monkeypatch.setattr(datasets, "load_dataset", no_reading)
    assert prepare(f"hf:{root}:small", tok, out, workers=1, verbose=False, hf_cache_dir=hf_cache) == first


def test_unknown_config_of_a_dataset_repository_lists_the_valid_ones(tmp_path, tok, hf_cache, dataset_repo):
    root, _ = dataset_repo
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        prepare(f"hf:{root}:tiny", tok, out, verbose=False, hf_cache_dir=hf_cache)
    message = str(e.value)
    assert "'tiny'" in message and "'small'" in message and "'web'" in message, message
    assert not out.exists()  # refused before anything was written


# --- 3. caps stop the reading ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped_source(tmp_path_factory) -> tuple[Path, list[str]]:
    """4,000 documents of 150-250 characters (~0.8 MB of JSONL in 4 files), no validation files."""
    rng = random.Random(5)
    docs = []
    for d in make_docs(4000, seed=5, words=(40, 80)):
        docs.append(d[: rng.randint(150, 250)].strip() or "x")
    root = tmp_path_factory.mktemp("capped")
    for i in range(4):
        write_jsonl(root / f"part-{i}.jsonl", docs[i * 1000 : (i + 1) * 1000])
    return root, docs


def _cap_row(tok, docs, val_fraction, max_docs=0, max_tokens=0) -> int:
    """The row of the training document that brings the training split to the cap (hand count)."""
    n_docs = n_tokens = 0
    for row, d in enumerate(docs):
        if held_out(d, val_fraction):
            continue
        n_docs, n_tokens = n_docs + 1, n_tokens + len(tok.encode(d)) + 1
        if (max_docs and n_docs >= max_docs) or (max_tokens and n_tokens >= max_tokens):
            return row
    raise AssertionError("the cap is never reached")


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("cap", [{"max_docs": 150}, {"max_tokens": 9000}])
def test_caps_stop_reading_at_the_document_that_reaches_them(tmp_path, tok, hf_cache, capped_source, small_tasks,
                                                              rows_read, cap, workers):
    src, docs = capped_source
    out = tmp_path / "out"
    m = prepare(str(src), tok, out, val_fraction=0.05, workers=workers, chunk_tokens=4096, verbose=False,
                hf_cache_dir=hf_cache, **cap)
    row = _cap_row(tok, docs, 0.05, **cap)
    expected = hash_split(docs[: row + 1], 0.05)  # the held-out documents read before the cap stay in val
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_ids(out, split), hand_ids(tok, expected[split]))
    if "max_docs" in cap:
        assert m["splits"]["train"]["documents"] == cap["max_docs"]
    else:  # the shard ends with the document that crossed the cap: without it the split is below the cap
        last = len(tok.encode(expected["train"][-1])) + 1
        assert m["splits"]["train"]["tokens"] - last < cap["max_tokens"] <= m["splits"]["train"]["tokens"]
    # Reading stopped soon after the cap: at most the tasks in flight (2 x workers, or 1 in this process) and the
    # one being filled, each of at most SMALL_TASK_CHARS // shortest + 1 rows, and one read batch, past the cap.
    in_flight = 1 if workers == 1 else 2 * workers
    per_task = SMALL_TASK_CHARS // min(map(len, docs)) + 1
    bound = row + 1 + (in_flight + 1) * per_task + data.prepare.READ_BATCH_DOCS
    assert row + 1 <= rows_read["rows"] <= bound < len(docs) / 8, (rows_read, row, bound)


def test_caps_stop_reading_with_the_default_task_sizes(tmp_path, tok, hf_cache, rows_read):
    """The same with the production sizes (tasks of 256K characters, reads of 1,024 rows) on 20,000 documents."""
    docs = make_docs(20000, seed=6, words=(50, 60))  # ~250 characters each: ~5.5 MB of JSONL
    src = tmp_path / "src"
    for i in range(4):
        write_jsonl(src / f"part-{i}.jsonl", docs[i * 5000 : (i + 1) * 5000])
    m = prepare(str(src), tok, tmp_path / "out", workers=1, max_docs=100, verbose=False, hf_cache_dir=hf_cache)
    assert m["splits"]["train"]["documents"] == 100
    # at most the task that reached the cap (2^18 characters: 2^18 // shortest + 1 rows) and one read batch
    per_task = 2**18 // min(map(len, docs)) + 1
    assert rows_read["rows"] <= per_task + READ_BATCH_DOCS < len(docs) / 5, (rows_read, per_task)


def test_zero_caps_read_everything(tmp_path, tok, hf_cache, capped_source, small_tasks, rows_read):
    src, docs = capped_source
    m = prepare(str(src), tok, tmp_path / "out", val_fraction=0.05, max_docs=0, max_tokens=0, workers=1,
                verbose=False, hf_cache_dir=hf_cache)
    assert rows_read["rows"] == len(docs)
    assert m["splits"]["train"]["documents"] == len(hash_split(docs, 0.05)["train"])


@pytest.mark.parametrize("key", ["data.max_tokens", "data.max_docs"])
def test_negative_caps_are_refused_naming_the_key(key):
    from training.config import parse_args

    with pytest.raises(ValueError, match=rf"{key}=-1 must be >= 0"):
        parse_args([f"--{key}=-1"])


# --- 4. chunk boundaries -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chunked_source(tmp_path_factory) -> tuple[Path, list[str]]:
    docs = make_docs(400, seed=7)
    docs[123] = " ".join(make_docs(400, seed=8))  # one document of several chunks' length
    return write_folder(tmp_path_factory.mktemp("chunked"), "jsonl", {"a": docs[:250], "b": docs[250:]}), docs


@pytest.mark.parametrize("chunk_tokens", [1024, 4093])
def test_chunks_concatenate_to_the_one_chunk_preparation(tmp_path, tok, hf_cache, chunked_source, chunk_tokens):
    src, docs = chunked_source
    whole = prepare(str(src), tok, tmp_path / "whole", val_fraction=0.2, workers=1, verbose=False,
                    hf_cache_dir=hf_cache)
    out = tmp_path / "chunked"
    m = prepare(str(src), tok, out, val_fraction=0.2, chunk_tokens=chunk_tokens, workers=1, verbose=False,
                hf_cache_dir=hf_cache)
    assert len(tok.encode(docs[123])) > 2 * chunk_tokens  # a document straddles at least two boundaries
    assert len(m["splits"]["train"]["chunks"]) >= 3 and (chunk_tokens > 1024 or len(m["splits"]["val"]["chunks"]) >= 2)
    for split in ("train", "val"):
        chunks = m["splits"][split]["chunks"]
        assert len(whole["splits"][split]["chunks"]) == 1
        assert len(chunks) == -(-m["splits"][split]["tokens"] // chunk_tokens)  # ceil: only the last is short
        assert [c["file"] for c in chunks] == [f"{split}-{i:05d}.bin" for i in range(len(chunks))]
        assert [(out / c["file"]).stat().st_size for c in chunks[:-1]] == [2 * chunk_tokens] * (len(chunks) - 1)
        assert [c["tokens"] for c in chunks[:-1]] == [chunk_tokens] * (len(chunks) - 1)
        assert 0 < chunks[-1]["tokens"] <= chunk_tokens
        joined = b"".join((out / c["file"]).read_bytes() for c in chunks)
        assert joined == (tmp_path / "whole" / f"{split}-00000.bin").read_bytes()
        for key in ("tokens", "bytes", "documents"):
            assert m["splits"][split][key] == whole["splits"][split][key]
    np.testing.assert_array_equal(split_ids(out, "train"), hand_ids(tok, hash_split(docs, 0.2)["train"]))


# --- 5. resume after an interruption -----------------------------------------------------------------------------

# Prepares with 2 worker processes, small tasks and reads; once the manifest on disk records 2 training chunks and
# the open training chunk holds ids past what the manifest records (written since its last rewrite), it touches
# MARKER and blocks in the reader until it is killed.
KILLED_PREPARATION = """\
import functools, sys, time
from pathlib import Path
import data.prepare as prep
from data.tokenizer import Tokenizer

source, out, tokenizer, marker, hf_cache = sys.argv[1:6]
prep.READ_BATCH_DOCS = 16
prep.tasks = functools.partial(prep.tasks, max_chars=TASK_CHARS)
real_iter_texts = prep.iter_texts

def stalls_after_two_chunks(*args, **kwargs):
    for batch in real_iter_texts(*args, **kwargs):
        yield batch
        m = prep.read_manifest(out)
        train = m["splits"]["train"] if m else {"chunks": []}
        partial = Path(out, f".train-{len(train['chunks']):05d}.bin.partial")
        if len(train["chunks"]) >= 2 and partial.stat().st_size > 2 * train["open_tokens"]:
            Path(marker).touch()
            time.sleep(600)

prep.iter_texts = stalls_after_two_chunks
prep.prepare(source, Tokenizer.load(tokenizer), out, chunk_tokens=1024, val_fraction=0.2, workers=2,
             verbose=False, hf_cache_dir=hf_cache)
print("finished without stalling")
"""


def _kill_mid_way(tmp_path: Path, src: Path, tok: Tokenizer, out: Path, hf_cache: str) -> None:
    script = tmp_path / "killed.py"
    script.write_text(KILLED_PREPARATION.replace("TASK_CHARS", str(SMALL_TASK_CHARS)), encoding="utf-8")
    tok.save(tmp_path / "tok.json")
    marker = tmp_path / "stalled"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(out), str(tmp_path / "tok.json"),
                             str(marker), hf_cache], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # its own group: the workers too
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the preparation did not stall: {proc.communicate(timeout=30)[0].decode()[-3000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the main process and its 2 workers, no cleanup
        proc.wait(timeout=30)
    from filelock import FileLock

    with FileLock(str(out / ".prepare.lock"), timeout=30):  # released by the kill (a worker holding it would hang)
        pass


def test_preparation_killed_mid_way_resumes_to_the_same_bytes(tmp_path, tok, hf_cache, chunked_source,
                                                                rows_read):
    src, docs = chunked_source
    reference = tmp_path / "reference"
    prepare(str(src), tok, reference, chunk_tokens=1024, val_fraction=0.2, workers=1, verbose=False,
            hf_cache_dir=hf_cache)
    out = tmp_path / "out"
    _kill_mid_way(tmp_path, src, tok, out, hf_cache)

    killed = read_manifest(out)
    k, open_tokens = len(killed["splits"]["train"]["chunks"]), killed["splits"]["train"]["open_tokens"]
    rows = killed["position"]["rows"]
    assert not killed["complete"] and k >= 2 and 0 < rows < len(docs)
    partial = out / f".train-{k:05d}.bin.partial"
    assert partial.stat().st_size > 2 * open_tokens  # ids written after the last manifest: cut back on resume
    crafted = tmp_path / "crafted"
    shutil.copytree(out, crafted)
    with pytest.raises(ValueError, match=r"not completely prepared .*prepare_data\.py"):
        open_prepared(out)

    rows_read.update(rows=0, skips=[])  # count the resumed run only
    prepare(str(src), tok, out, chunk_tokens=1024, val_fraction=0.2, workers=1, verbose=False,
            hf_cache_dir=hf_cache)
    same_files(out, reference)
    assert folder_files(out) == expected_files(out)
    # The resumed run read only the rows after the recorded position, not the source from its start.
    assert rows_read["skips"] == [rows] and rows_read["rows"] == len(docs) - rows

    # A chunk renamed into place after the last manifest write (two, by one long append) and the next one begun:
    # the state of a kill between the rename and the manifest. Chunks k and k+1 come from the reference.
    ref_chunk = [(reference / f"train-{i:05d}.bin").read_bytes() for i in (k, k + 1, k + 2)]
    assert (crafted / partial.name).read_bytes()[: 2 * open_tokens] == ref_chunk[0][: 2 * open_tokens]
    (crafted / partial.name).unlink()
    (crafted / f"train-{k:05d}.bin").write_bytes(ref_chunk[0])
    (crafted / f"train-{k + 1:05d}.bin").write_bytes(ref_chunk[1])
    (crafted / f".train-{k + 2:05d}.bin.partial").write_bytes(ref_chunk[2][:200])
    prepare(str(src), tok, crafted, chunk_tokens=1024, val_fraction=0.2, workers=1, verbose=False,
            hf_cache_dir=hf_cache)
    same_files(crafted, reference)
    assert folder_files(crafted) == expected_files(crafted)


def interrupt_after_two_chunks(src: Path, tok: Tokenizer, out: Path, hf_cache: str, monkeypatch,
                               open_tokens: int) -> None:
    """Prepare src into out (1024-token chunks) and Ctrl-C it (KeyboardInterrupt) once the manifest records two
    complete train chunks and at least open_tokens ids in the open one; the source's reader is restored after."""
    real = data.prepare.iter_texts

    def interrupted(*args, **kwargs):
        for batch in real(*args, **kwargs):
            yield batch
            m = read_manifest(out)
            if m and len(m["splits"]["train"]["chunks"]) >= 2 and m["splits"]["train"]["open_tokens"] >= open_tokens:
                raise KeyboardInterrupt

    monkeypatch.setattr(data.prepare, "iter_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), tok, out, chunk_tokens=1024, val_fraction=0.2, workers=1, verbose=False,
                hf_cache_dir=hf_cache)
    monkeypatch.setattr(data.prepare, "iter_texts", real)


def test_preparation_interrupted_in_process_resumes(tmp_path, tok, hf_cache, chunked_source, small_tasks,
                                                    rows_read, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) after the second chunk; the folder is refused as incomplete, then resumed."""
    src, _ = chunked_source
    reference = tmp_path / "reference"
    prepare(str(src), tok, reference, chunk_tokens=1024, val_fraction=0.2, workers=1, verbose=False,
            hf_cache_dir=hf_cache)
    out = tmp_path / "out"
    interrupt_after_two_chunks(src, tok, out, hf_cache, monkeypatch, open_tokens=0)
    with pytest.raises(ValueError, match=re.escape(f"{out} is not completely prepared") + r".*scripts/prepare_data\.py"):
        open_prepared(out)
    rows = read_manifest(out)["position"]["rows"]
    rows_read.update(rows=0, skips=[])
    prepare(str(src), tok, out, chunk_tokens=1024, val_fraction=0.2, workers=1, verbose=False,
            hf_cache_dir=hf_cache)
    same_files(out, reference)
    assert rows > 0 and rows_read["skips"] == [rows]  # went on from the recorded position


def test_an_interrupted_preparation_with_a_damaged_open_chunk(tmp_path, tok, hf_cache, chunked_source, small_tasks,
                                                                monkeypatch):
    """An open chunk shorter than its manifest records cannot be resumed: refused naming it (a folder of your own),
    prepared afresh to the right bytes with overwrite (the trainer's cache)."""
    src, _ = chunked_source
    reference = tmp_path / "reference"
    prepare(str(src), tok, reference, chunk_tokens=1024, val_fraction=0.2, workers=1, verbose=False,
            hf_cache_dir=hf_cache)
    out = tmp_path / "out"
    interrupt_after_two_chunks(src, tok, out, hf_cache, monkeypatch, open_tokens=11)
    (partial,) = out.glob(".train-*.bin.partial")
    partial.write_bytes(partial.read_bytes()[:4])  # shorter than recorded
    with pytest.raises(ValueError, match=re.escape(str(partial)) + ".*shorter than"):
        prepare(str(src), tok, out, chunk_tokens=1024, val_fraction=0.2, workers=1, verbose=False,
                hf_cache_dir=hf_cache)
    prepare(str(src), tok, out, chunk_tokens=1024, val_fraction=0.2, workers=1, verbose=False, overwrite=True,
            hf_cache_dir=hf_cache)
    same_files(out, reference)


# --- 6. workers ----------------------------------------------------------------------------------------------------


def test_one_and_two_workers_give_the_same_bytes(tmp_path, tok, hf_cache, chunked_source, small_tasks):
    src, docs = chunked_source
    runs = {"in process": dict(workers=1, in_process=True), "2 workers": dict(workers=2),
            "1 worker process": dict(workers=1, in_process=False)}
    for name, how in runs.items():
        prepare(str(src), tok, tmp_path / name, chunk_tokens=1024, val_fraction=0.2, verbose=False,
                hf_cache_dir=hf_cache, **how)
    for name in ("2 workers", "1 worker process"):
        same_files(tmp_path / name, tmp_path / "in process")
    for split, texts in hash_split(docs, 0.2).items():
        np.testing.assert_array_equal(split_ids(tmp_path / "2 workers", split), hand_ids(tok, texts))


# --- 7. the loader's memory ----------------------------------------------------------------------------------------


def _loader_peak(folder: Path, n_chunks: int, tokens: int) -> tuple[int, int]:
    """(tracemalloc peak in bytes, blocks) of listing n_chunks memory-mapped chunks, building a TokenLoader over
    them and taking one full epoch of batches."""
    rng = np.random.default_rng(n_chunks)
    folder.mkdir()
    for i in range(n_chunks):
        rng.integers(0, 400, tokens, dtype=np.uint16).tofile(folder / f"train-{i:05d}.bin")
    tracemalloc.start()
    try:
        chunks = [Chunk(folder / f"train-{i:05d}.bin", tokens, "uint16") for i in range(n_chunks)]
        loader = TokenLoader(chunks, batch_size=512, block_size=8, seed=0)
        for _ in range(loader.steps_per_epoch):
            loader.next_batch()
        assert (loader.epoch, loader.position) == (0, loader.steps_per_epoch)
        return tracemalloc.get_traced_memory()[1], loader.n_blocks
    finally:
        tracemalloc.stop()


def test_loader_memory_does_not_grow_with_the_number_of_chunks(tmp_path):
    tokens = 4096 * 8 + 1  # 4,096 blocks of 8 per chunk
    _loader_peak(tmp_path / "warm-up", 1, tokens)  # first-use allocations (torch, numpy) outside the measurement
    small, small_blocks = _loader_peak(tmp_path / "n", 4, tokens)
    large, large_blocks = _loader_peak(tmp_path / "10n", 40, tokens)
    permutation = 8 * (large_blocks - small_blocks)  # what an int64 order over all blocks would add
    print(f"loader peak: {small:,} B for 4 chunks ({small_blocks:,} blocks), {large:,} B for 40 chunks "
          f"({large_blocks:,} blocks): +{large - small:,} B; an int64 permutation would add {permutation:,} B")
    assert large - small < 0.1 * permutation
    assert large < 8 * large_blocks / 4  # the whole peak: under a quarter of one permutation of the larger corpus


# --- 8. bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path, tok, hf_cache, fmt):
    src = tmp_path / "src"
    src.mkdir()
    good = b'{"text": "fine"}\n' * 50 if fmt == "jsonl" else b"fine\n" * 50
    bad = b'{"text": "ok"}\n{"text": "caf\xe9 au lait"}\n' if fmt == "jsonl" else b"ok\ncaf\xe9 au lait\n"
    offset = bad.index(0xE9)
    (src / f"a.{fmt}").write_bytes(good)
    (src / f"b.{fmt}").write_bytes(bad)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(f"{src / f'b.{fmt}'}: not valid UTF-8 at byte offset {offset} ")):
        prepare(str(src), tok, out, workers=1, verbose=False, hf_cache_dir=hf_cache)
    assert not read_manifest(out) and not list(out.glob("*.bin"))  # nothing that looks prepared


def test_invalid_utf8_in_a_dataset_repository_names_the_file_and_byte_offset(tmp_path, tok, hf_cache):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                    "    path: data/*.jsonl\n---\n", encoding="utf-8")
    (root / "data" / "a.jsonl").write_bytes(b'{"text": "fine"}\n' * 50)
    bad = b'{"text": "ok"}\n{"text": "caf\xe9 au lait"}\n'
    (root / "data" / "b.jsonl").write_bytes(bad)
    where = f"{root / 'data' / 'b.jsonl'}: not valid UTF-8 at byte offset {bad.index(0xE9)} "
    with pytest.raises(ValueError, match=re.escape(where)):
        prepare(f"hf:{root}:main", tok, tmp_path / "out", workers=1, verbose=False, hf_cache_dir=hf_cache)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok, hf_cache) -> Path:
    src = write_folder(tmp_path_factory.mktemp("text"), "jsonl", {"a": make_docs(200, seed=9)})
    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare(str(src), tok, out, val_fraction=0.05, chunk_tokens=1024, workers=1, verbose=False, hf_cache_dir=hf_cache)
    return out


def test_sft_and_dpo_refuse_a_prepared_pretraining_folder(prepared, tok):
    from data.preference import load_preferences
    from data.sft import load_records, load_sft

    with pytest.raises(ValueError, match=r"prepared pre-training corpus .* --stage sft reads chat records "
                                         r"\(messages, or prompt \+ completion\)"):
        load_records(str(prepared), "train", "sft")
    with pytest.raises(ValueError, match=r"prepared pre-training corpus .* --stage sft reads chat records"):
        load_sft(str(prepared), "train", tok, 64)
    with pytest.raises(ValueError, match=r"prepared pre-training corpus .* --stage dpo reads preference pairs "
                                         r"\(prompt, chosen, rejected\)"):
        load_preferences(str(prepared), "train", tok, 64)


def test_prepared_folder_is_not_a_source_to_prepare(tmp_path, prepared, tok):
    with pytest.raises(ValueError, match=r"is a prepared folder of token shards, not text to prepare"):
        prepare(str(prepared), tok, tmp_path / "out", verbose=False)


def test_prepared_folder_with_other_settings_is_refused_naming_the_keys(tmp_path, prepared, tok, hf_cache,
                                                                        rows_read):
    manifest = read_manifest(prepared)
    src = manifest["source"]
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    with pytest.raises(ValueError, match=r"differs \(\['chunk_tokens', 'max_docs'\]\)"):
        prepare(src, tok, prepared, val_fraction=0.05, chunk_tokens=2048, max_docs=50, workers=1, verbose=False,
                hf_cache_dir=hf_cache)
    other = train_tokenizer(make_docs(100, seed=10), vocab_size=300)
    with pytest.raises(ValueError, match=r"differs \(\['tokenizer_hash'\]\)"):
        prepare(src, other, prepared, val_fraction=0.05, chunk_tokens=1024, workers=1, verbose=False,
                hf_cache_dir=hf_cache)
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before  # left as it was
    # the same settings reuse it, reading nothing
    assert prepare(src, tok, prepared, val_fraction=0.05, chunk_tokens=1024, verbose=False,
                   hf_cache_dir=hf_cache) == manifest
    assert rows_read == {"rows": 0, "skips": []}


def test_single_file_format_says_to_prepare_again(tmp_path, tok, hf_cache):
    old = tmp_path / "old"
    old.mkdir()
    np.arange(100, dtype=np.uint16).tofile(old / "train.bin")
    (old / "train.json").write_text(json.dumps({"tokens": 100}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"older single-file format .*prepare_data\.py SOURCE --out DIR"):
        open_prepared(old)
    src = write_folder(tmp_path / "src", "jsonl", {"a": make_docs(100, seed=11)})
    with pytest.raises(ValueError, match=r"shards of the older single-file format"):
        prepare(str(src), tok, old, workers=1, val_fraction=0.1, verbose=False, hf_cache_dir=hf_cache)
    assert (old / "train.bin").exists()
    prepare(str(src), tok, old, workers=1, val_fraction=0.1, overwrite=True, verbose=False, hf_cache_dir=hf_cache)
    assert not (old / "train.bin").exists() and open_prepared(old).splits == ("train", "val")


def test_a_preparation_from_before_chunk_checksums_is_prepared_again(tmp_path, prepared, tok, hf_cache):
    """Manifests of format 2 written before chunks recorded their sha256 (2026-12-01): opening one raised KeyError
    'sha256' from data_hash, and the trainer's cache reused it, so `python train.py` crashed on an upgraded machine."""
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    manifest = read_manifest(out)
    manifest["format"] = manifest["key"]["format"] = 2
    for split in manifest["splits"].values():
        for chunk in split["chunks"]:
            del chunk["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ValueError, match=r"has format 2, this version reads 3; prepare the source again"):
        open_prepared(out)
    src = manifest["source"]
    with pytest.raises(ValueError, match=r"differs \(\['format'\]\)"):
        prepare(src, tok, out, val_fraction=0.05, chunk_tokens=1024, workers=1, verbose=False, hf_cache_dir=hf_cache)
    prepare(src, tok, out, val_fraction=0.05, chunk_tokens=1024, workers=1, overwrite=True, verbose=False,
            hf_cache_dir=hf_cache)  # the trainer's own cache: prepared again
    same_files(out, prepared)
    assert open_prepared(out).hash == open_prepared(prepared).hash


def test_chunks_without_a_manifest_are_not_called_the_old_format(tmp_path, prepared, tok, hf_cache):
    """A preparation killed after its first chunk was renamed into place but before the manifest was written."""
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    (out / "manifest.json").unlink()
    src = read_manifest(prepared)["source"]
    names = re.escape("chunk files (train-00000.bin, train-00001.bin, train-00002.bin ...) but no manifest.json")
    with pytest.raises(ValueError, match=names) as e:
        prepare(src, tok, out, val_fraction=0.05, chunk_tokens=1024, workers=1, verbose=False,
                hf_cache_dir=hf_cache)
    assert "older single-file format" not in str(e.value)
    prepare(src, tok, out, val_fraction=0.05, chunk_tokens=1024, workers=1, overwrite=True, verbose=False,
            hf_cache_dir=hf_cache)
    same_files(out, prepared)


# --- 9. an empty validation split ----------------------------------------------------------------------------------


def test_hash_split_with_no_held_out_document_names_val_and_val_fraction(tmp_path, tok, hf_cache):
    docs = [d for d in make_docs(40, seed=12) if not held_out(d, 0.01)][:30]
    src = write_folder(tmp_path / "src", "parquet", {"a": docs})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"the val split of .*no document's hash fell below val_fraction=0\.01"):
        prepare(str(src), tok, out, workers=1, verbose=False, hf_cache_dir=hf_cache)
    # nothing half-written is left: no chunk, no manifest (the whole source was read; a retry fails the same way)
    assert sorted(p.name for p in out.iterdir()) == [".prepare.lock"]
    with pytest.raises(FileNotFoundError, match=r"not a prepared data folder"):
        open_prepared(out)

