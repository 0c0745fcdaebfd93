"""Data pipeline tests: sources, preparation into chunked shards and its manifest, the token loader, bad inputs.

Real files in tmp_path, real tokenizers trained here, real `datasets` streaming of JSON Lines, Parquet and CSV.
"""

import hashlib
import json
import math
import os
import random
import sys
import threading
import tracemalloc
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import data.prepare as prepare_module  # noqa: E402
from data.encode import doc_hash  # noqa: E402
from data.prepare import prepare, read_manifest, token_dtype  # noqa: E402
from data.shards import (  # noqa: E402
    Chunk,
    TokenLoader,
    count_eval_blocks,
    eval_batches,
    open_prepared,
)
from data.sources import (  # noqa: E402
    STDLIB_EXCLUDED_DIRS,
    STDLIB_VAL_FILES,
    VAL_FRACTION,
    Source,
    check_utf8,
    describe_source,
    iter_texts,
    read_passes,
    stdlib_files,
    stdlib_root,
    val_threshold,
)
from data.tokenizer import EOT_ID, Tokenizer, train_tokenizer  # noqa: E402

datasets.disable_progress_bars()

WORDS = "alpha beta gamma delta café naïve 😀 日本 def return x = 1 + 2 ( ) : \n".split(" ")


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + f" doc{i}" for i in range(n)]


DOCS = make_docs(120)
QUIET = {"verbose": False, "workers": 1}  # one process: the worker count is tested where it matters


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def tok2():
    return train_tokenizer(DOCS, vocab_size=280, min_frequency=1)


@pytest.fixture
def hf_cache(tmp_path):
    return str(tmp_path / "hf_cache")


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def shard_files(out_dir: Path) -> list[str]:
    """What a failed preparation left: anything but its lock (a manifest, chunks, open chunks, the tokenizer)."""
    if not out_dir.exists():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.name != ".prepare.lock")


def expected_tokens(tok, docs: list[str]) -> list[int]:
    out = []
    for d in docs:
        out += tok.encode(d) + [EOT_ID]
    return out


def held_out(docs: list[str], val_fraction: float = VAL_FRACTION) -> list[str]:
    """The validation documents of a source without its own validation split, by the rule, in reading order."""
    return [d for d in docs if d and doc_hash(d) < val_threshold(val_fraction)]


def split_ids(out: Path, split: str) -> np.ndarray:
    """A prepared split's ids: its chunks concatenated in order."""
    data = open_prepared(out)
    return np.concatenate([np.fromfile(c.path, dtype=c.dtype) for c in data.chunks(split)])


def split_bytes(out: Path, split: str) -> bytes:
    return b"".join(c.path.read_bytes() for c in open_prepared(out).chunks(split))


def stream_texts(spec: str, split: str | None = None, **kwargs) -> list[str]:
    """The non-empty texts of the pass of ``spec`` that holds ``split`` (None: the one pass split by hash)."""
    passes = read_passes(spec, **kwargs)
    (rp,) = [p for p in passes if p.split == split]
    return [t for batch in iter_texts(rp, cache_dir=kwargs.get("cache_dir")) for t in batch if t]


def without_time(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "seconds"}


# --- preparation and manifest -----------------------------------------------------------------------------------


def test_prepare_writes_documents_with_eot_and_right_counts(tmp_path, tok, hf_cache):
    src = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = tmp_path / "shards"
    manifest = prepare(str(src), tok, out, val_fraction=0.1, hf_cache_dir=hf_cache, **QUIET)
    val_docs = held_out(DOCS, 0.1)  # about 12 of the 120 documents, by their hash
    train_docs = [d for d in DOCS if d not in val_docs]
    assert 0 < len(val_docs) < 30 and len(train_docs) + len(val_docs) == len(DOCS)
    assert manifest["complete"] and manifest["kind"] == "local" and manifest["python_version"] is None
    assert manifest["dtype"] == "uint16" and manifest["eot_id"] == EOT_ID and manifest["vocab_size"] == tok.vocab_size
    assert manifest["key"]["tokenizer_hash"] == tok.hash and Tokenizer.load(out / "tokenizer.json").hash == tok.hash
    assert read_manifest(out) == manifest and open_prepared(out).manifest == manifest
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = split_ids(out, split)
        assert ids.tolist() == expected_tokens(tok, docs)  # document order kept, EOT after each
        counts = manifest["splits"][split]
        assert counts["documents"] == len(docs) and counts["tokens"] == len(ids)
        assert counts["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        assert [c["file"] for c in counts["chunks"]] == [f"{split}-00000.bin"]  # one chunk at the default size
        # Bytes from the tokenizer's byte lengths agree with the UTF-8 count (EOT counts 0).
        assert tok.token_byte_lengths()[ids].sum() == counts["bytes"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"]


def test_shards_byte_identical_across_preparations_and_workers(tmp_path, tok, hf_cache, monkeypatch):
    src = write_jsonl(tmp_path / "corpus.jsonl", make_docs(600, seed=4))
    pools = []
    real_context = prepare_module._mp_context
    monkeypatch.setattr(prepare_module, "_mp_context", lambda: pools.append(1) or real_context())
    common = {"val_fraction": 0.05, "chunk_tokens": 2000, "hf_cache_dir": hf_cache, "verbose": False}
    a = prepare(str(src), tok, tmp_path / "a", workers=1, **common)
    b = prepare(str(src), tok, tmp_path / "b", workers=1, **common)
    assert pools == []  # one worker tokenizes in this process
    c = prepare(str(src), tok, tmp_path / "c", workers=2, **common)
    assert pools == [1]  # the two worker processes really ran
    assert len(a["splits"]["train"]["chunks"]) > 3  # several chunks, each a copy at a different offset
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix == ".bin")
    for name in files:
        blob = (tmp_path / "a" / name).read_bytes()
        assert blob == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    assert without_time(a) == without_time(b) == without_time(c)
    assert open_prepared(tmp_path / "a").hash == open_prepared(tmp_path / "c").hash


def test_cache_reused_and_invalidated(tmp_path, tok, tok2, hf_cache, capsys):
    src = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = tmp_path / "shards"
    common = {"val_fraction": 0.1, "hf_cache_dir": hf_cache, "workers": 1}
    first = prepare(str(src), tok, out, **common)
    stamp = (out / "train-00000.bin").stat().st_mtime_ns
    assert prepare(str(src), tok, out, **common) == first
    assert (out / "train-00000.bin").stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().out

    # A different tokenizer never reuses the prepared data: refused in a folder given by hand, prepared again in
    # the trainer's cache (overwrite).
    with pytest.raises(ValueError, match=r"already holds prepared data that differs \(\['tokenizer_hash'\]\)"):
        prepare(str(src), tok2, out, **common)
    assert read_manifest(out) == first and (out / "train-00000.bin").stat().st_mtime_ns == stamp
    other = prepare(str(src), tok2, out, overwrite=True, **common)
    assert other["key"]["tokenizer_hash"] == tok2.hash != first["key"]["tokenizer_hash"]
    assert split_ids(out, "train").tolist() == expected_tokens(tok2, [d for d in DOCS if d not in held_out(DOCS, 0.1)])
    # Changed source content re-prepares too.
    write_jsonl(src, DOCS[:60])
    smaller = prepare(str(src), tok2, out, overwrite=True, **common)
    assert smaller["splits"]["train"]["documents"] + smaller["splits"]["val"]["documents"] == 60
    # A truncated chunk (an interrupted copy, say) is named; the trainer's cache prepares it again.
    with open(out / "train-00000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"train-00000\.bin: expected \d+ tokens .* found 10 bytes"):
        prepare(str(src), tok2, out, **common)
    assert without_time(prepare(str(src), tok2, out, overwrite=True, **common)) == without_time(smaller)
    assert (out / "train-00000.bin").stat().st_size == 2 * smaller["splits"]["train"]["tokens"]


def test_concurrent_prepare_runs_once(tmp_path, tok, hf_cache, monkeypatch):
    src = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    calls = []
    real_iter = prepare_module.iter_texts
    monkeypatch.setattr(prepare_module, "iter_texts", lambda *a, **k: calls.append(1) or real_iter(*a, **k))
    results = [None] * 3

    def run(i):
        results[i] = prepare(str(src), tok, tmp_path / "out", val_fraction=0.1, hf_cache_dir=hf_cache, **QUIET)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # one pass (a source split by hash), read once
    assert results[0] == results[1] == results[2] and results[0]["splits"]["train"]["tokens"] > 0


def test_text_column_and_formats(tmp_path, tok, hf_cache):
    docs = DOCS[:40]
    write_jsonl(tmp_path / "j" / "a.jsonl", docs, column="content")
    datasets.Dataset.from_dict({"content": docs, "n": list(range(40))}).to_parquet(str(tmp_path / "p" / "a.parquet"))
    datasets.Dataset.from_dict({"content": docs}).to_csv(str(tmp_path / "c" / "a.csv"), index=False)
    for d in "jpc":  # every format streams the same documents, in order
        assert stream_texts(str(tmp_path / d), text_column="content", cache_dir=hf_cache) == docs
    val_docs = held_out(docs, 0.2)
    for d in "jpc":
        m = prepare(str(tmp_path / d), tok, tmp_path / f"out-{d}", text_column="content", val_fraction=0.2,
                    hf_cache_dir=hf_cache, **QUIET)
        assert m["splits"]["val"]["documents"] == len(val_docs) > 0
        assert split_ids(tmp_path / f"out-{d}", "train").tolist() == expected_tokens(
            tok, [t for t in docs if t not in val_docs])
    assert split_bytes(tmp_path / "out-j", "val") == split_bytes(tmp_path / "out-p", "val") == split_bytes(
        tmp_path / "out-c", "val")


def test_txt_folder_one_document_per_file_and_named_splits(tmp_path, hf_cache):
    folder = tmp_path / "txt"
    for name, text in {"train_a.txt": "first\r\nfile\n", "train_b.txt": "second", "val.txt": "held out"}.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(text.encode())
    (folder / ".hidden.txt").write_text("ignored")
    passes = read_passes(str(folder), splits=("train", "validation"))
    assert [(p.split, [Path(f).name for f in p.files]) for p in passes] == [
        ("train", ["train_a.txt", "train_b.txt"]), ("val", ["val.txt"])]
    assert stream_texts(str(folder), "train") == ["first\nfile\n", "second"]
    assert stream_texts(str(folder), "val") == ["held out"]


def test_single_document_is_split_at_a_line_break(tmp_path, tok, hf_cache):
    lines = [f"line {i} of the only document" for i in range(300)]
    src = tmp_path / "one.txt"
    src.write_text("\n".join(lines) + "\n")
    train, val = stream_texts(str(src), "train"), stream_texts(str(src), "val")
    assert len(train) == len(val) == 1
    assert train[0] + val[0] == src.read_text() and train[0].endswith("\n")
    assert 0 < len(val[0]) <= 0.02 * len(src.read_text())
    m = prepare(str(src), tok, tmp_path / "out", hf_cache_dir=hf_cache, **QUIET)
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (1, 1)
    assert split_ids(tmp_path / "out", "val").tolist() == expected_tokens(tok, val)


def test_doc_hash_is_a_stable_blake2b_and_the_threshold_is_the_fraction_of_2_64():
    # Pinned values: a changed hash would move documents between splits and every published validation figure.
    assert doc_hash("") == int.from_bytes(hashlib.blake2b(b"", digest_size=8).digest(), "little")
    assert doc_hash("café 😀") == int.from_bytes(hashlib.blake2b("café 😀".encode(), digest_size=8).digest(), "little")
    assert doc_hash("hello") == 0x7D34E501A8EDB6A7
    # val_fraction x 2^64 exactly, for the double val_fraction is (0.01 is a little above 1/100: 2^64 / 100 rounds
    # down to ...516); scaling by a power of two is exact, so the threshold is the same on every machine.
    assert val_threshold(0.01) == math.floor(Fraction(0.01) * 2**64) == 184467440737095520
    assert val_threshold(0.5) == 2**63 and val_threshold(0) == 0


def test_hash_split_is_deterministic_order_free_and_capped_as_a_prefix(tmp_path, tok, hf_cache):
    docs = make_docs(400, seed=1)
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    write_jsonl(tmp_path / "a.jsonl", docs)
    write_jsonl(tmp_path / "b" / "b.jsonl", shuffled)
    common = {"val_fraction": 0.05, "hf_cache_dir": hf_cache, **QUIET}
    ma = prepare(str(tmp_path / "a.jsonl"), tok, tmp_path / "out-a", **common)
    mb = prepare(str(tmp_path / "b"), tok, tmp_path / "out-b", **common)
    val_a, val_b = held_out(docs, 0.05), held_out(shuffled, 0.05)
    assert 5 <= len(val_a) <= 40 and sorted(val_a) == sorted(val_b)  # the same documents, whatever the file order
    assert ma["splits"]["val"]["documents"] == mb["splits"]["val"]["documents"] == len(val_a)
    assert split_ids(tmp_path / "out-a", "val").tolist() == expected_tokens(tok, val_a)
    assert split_ids(tmp_path / "out-b", "val").tolist() == expected_tokens(tok, val_b)
    train_a = [d for d in docs if d not in val_a]
    assert split_ids(tmp_path / "out-a", "train").tolist() == expected_tokens(tok, train_a)
    assert ma["splits"]["train"]["documents"] == 400 - len(val_a)
    # A cap stops the reading at the 200th training document; validation keeps the held-out documents read until
    # then: by the same rule, so a prefix of the uncapped validation split.
    capped = prepare(str(tmp_path / "a.jsonl"), tok, tmp_path / "out-capped", max_docs=200, **common)
    read = docs[: docs.index(train_a[199]) + 1]
    assert capped["splits"]["train"]["documents"] == 200
    assert split_ids(tmp_path / "out-capped", "train").tolist() == expected_tokens(tok, train_a[:200])
    capped_val = held_out(read, 0.05)
    assert 0 < len(capped_val) < len(val_a) and capped_val == val_a[: len(capped_val)]
    assert split_ids(tmp_path / "out-capped", "val").tolist() == expected_tokens(tok, capped_val)


# --- byte identity with the single-file format of before ----------------------------------------------------------


def write_explicit_splits(root: Path) -> tuple[Path, Path]:
    """Two sources with their own validation split, from a seeded generator: a JSON Lines folder (train.jsonl +
    validation.jsonl, each with an empty and a null text) and a folder of .txt documents (train/ and val/, some
    files with \\r\\n line ends)."""
    rng = random.Random(14)

    def doc() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))

    jl = root / "jl"
    jl.mkdir(parents=True)
    for name, n in (("train.jsonl", 300), ("validation.jsonl", 40)):
        texts = [doc() for _ in range(n)]
        texts[7], texts[11] = "", None
        rows = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts))
        (jl / name).write_text(rows, encoding="utf-8")
    txt = root / "txt"
    for split, n in (("train", 30), ("val", 5)):
        (txt / split).mkdir(parents=True)
        for i in range(n):
            text = "\n".join(doc() for _ in range(rng.randint(1, 8)))
            (txt / split / f"doc{i:02d}.txt").write_bytes(text.replace("\n", "\r\n" if i % 3 == 0 else "\n").encode())
    return jl, txt


# sha256 of the train.bin / val.bin the single-file code (before chunked shards) wrote for write_explicit_splits
# with the `tok` fixture, and (tokens, bytes, documents) of its manifests: computed by running that code (commit
# eb070c8, data.shards.prepare(src, tok, out, split) for each split), not by the code under test.
OLD_FORMAT_SHARDS = {
    "jl/train": ["bd0295ff4eed64ba2890e9a561672a7940208bcedef664444b234b2ab44f83e3", 17130, 35570, 298],
    "jl/val": ["45a1dd2ffe1cd6ac21681f873a8c4cdc63b263b8b020f0245c36e72eead75b3c", 2184, 4599, 38],
    "txt/train": ["07c2820853cc1561abdb82440bfc68c6008b0a7ed626e2080856170f7464a5f6", 7005, 14591, 30],
    "txt/val": ["e92848fa18740c48ebca7c8b847ba163cc09ea15b085b78f84f94f1ee6f9a76e", 1251, 2649, 5],
}
TOK_HASH = "189bca4e5718441c4536174260e93b2b90f61be81a1f0d3b12db5bead13e84e9"


@pytest.mark.parametrize("chunk_tokens", [2**27, 1000])  # one chunk per split; several, cut inside documents
def test_explicit_splits_give_the_bytes_of_the_single_file_format(tmp_path, tok, hf_cache, chunk_tokens):
    assert tok.hash == TOK_HASH  # the tokenizer the reference was computed with
    for src in write_explicit_splits(tmp_path / "src"):
        out = tmp_path / f"out-{src.name}"
        m = prepare(str(src), tok, out, chunk_tokens=chunk_tokens, hf_cache_dir=hf_cache, **QUIET)
        for split in ("train", "val"):
            counts = m["splits"][split]
            got = [hashlib.sha256(split_bytes(out, split)).hexdigest(), counts["tokens"], counts["bytes"],
                   counts["documents"]]
            assert got == OLD_FORMAT_SHARDS[f"{src.name}/{split}"], (src.name, split)
            assert all(c["tokens"] == chunk_tokens for c in counts["chunks"][:-1])
            assert (len(counts["chunks"]) > 1) == (chunk_tokens < counts["tokens"])


# --- the stdlib source ------------------------------------------------------------------------------------------


def test_stdlib_split_is_explicit_deterministic_and_mixed():
    val = describe_source("stdlib", "val")
    train = describe_source("stdlib", "train")
    assert describe_source("stdlib", "val") == val and describe_source("stdlib", "train") == train
    root = stdlib_root()
    val_rel = [Path(f).relative_to(root).as_posix() for f in val.files]
    # Every listed validation file that exists on this Python is used, and nothing else.
    assert val_rel == sorted(f for f in STDLIB_VAL_FILES if (root / f).is_file())
    assert len(val_rel) >= 25
    assert not set(val.files) & set(train.files)
    packages = {f.split("/")[0] for f in val_rel}
    assert len(packages) >= 20  # a mix of modules, not one package
    assert val.python_version == ".".join(map(str, sys.version_info[:3]))
    train_rel = [Path(f).relative_to(root).parts for f in train.files]
    assert len(train_rel) > 300
    assert not any(set(parts[:-1]) & STDLIB_EXCLUDED_DIRS for parts in train_rel)
    assert ("json", "decoder.py") not in train_rel and ("json", "scanner.py") in train_rel
    # The reader's passes read exactly these files, one split each.
    passes = read_passes("stdlib")
    assert [(p.split, p.files) for p in passes] == [("train", train.files), ("val", val.files)]


def test_stdlib_exclusions_on_a_fake_tree(tmp_path):
    files = {
        "os.py": "x",
        "json/decoder.py": "x",
        "json/scanner.py": "x",
        "test/test_os.py": "x",
        "unittest/test/test_case.py": "x",
        "idlelib/editor.py": "x",
        "idlelib/idle_test/test_x.py": "x",
        "site-packages/pkg/mod.py": "x",
        "pydoc_data/topics.py": "x",
        "encodings/cp1252.py": '""" Python Character Mapping Codec cp1252 generated from x with gencodec.py.\n"""',
        "encodings/utf_8.py": '""" Python utf-8 codec"""',
        "README.txt": "x",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    rel = [p.relative_to(tmp_path).as_posix() for p in stdlib_files("train", tmp_path)]
    assert rel == ["encodings/utf_8.py", "idlelib/editor.py", "json/scanner.py", "os.py"]
    assert [p.relative_to(tmp_path).as_posix() for p in stdlib_files("val", tmp_path)] == ["json/decoder.py"]


def test_prepare_stdlib_val(tmp_path, tok, hf_cache):
    manifest = prepare("stdlib", tok, tmp_path, splits=("val",), block_size=64, hf_cache_dir=hf_cache, **QUIET)
    assert manifest["python_version"] == ".".join(map(str, sys.version_info[:3])) and manifest["kind"] == "stdlib"
    assert list(manifest["splits"]) == ["val"]
    files = sorted(f for f in STDLIB_VAL_FILES if (stdlib_root() / f).is_file())
    texts = [(stdlib_root() / f).read_text(encoding="utf-8") for f in files]
    texts = [t for t in texts if t]
    counts = manifest["splits"]["val"]
    assert counts["documents"] == len(texts)
    assert counts["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert tok.token_byte_lengths()[split_ids(tmp_path, "val")].sum() == counts["bytes"]


# --- the loader -------------------------------------------------------------------------------------------------


def test_loader_blocks_are_shifted_windows_and_an_epoch_visits_each_once():
    data = np.arange(1000, dtype=np.uint16)  # token value = position: windows are easy to recognise
    loader = TokenLoader(data, batch_size=4, block_size=10, seed=0)
    assert loader.n_blocks == 99 and loader.steps_per_epoch == 24  # 3 blocks skipped per epoch
    starts = []
    for _ in range(loader.steps_per_epoch):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (4, 10)
        assert torch.equal(y, x + 1) and torch.equal(x[:, 0] % 10, torch.zeros(4, dtype=torch.long))
        starts += (x[:, 0] // 10).tolist()
    assert len(set(starts)) == 96 and loader.epoch == 0
    next_epoch = []
    for _ in range(loader.steps_per_epoch):
        next_epoch += (loader.next_batch()[0][:, 0] // 10).tolist()
        assert loader.epoch == 1
    assert len(set(next_epoch)) == 96 and next_epoch != starts  # reshuffled
    assert loader.position == loader.steps_per_epoch


def test_one_chunk_loader_reads_the_blocks_in_the_order_of_the_single_file_loader():
    """A one-chunk corpus (the stdlib) keeps the batches of before the chunked format: epoch e reads the blocks in
    the order np.random.default_rng([seed, e]).permutation(n_blocks), global batch after global batch."""
    data = np.arange(2001, dtype=np.uint16)
    T, B, seed = 8, 3, 11
    n_blocks = 2000 // T
    for world_size in (1, 2):
        ranks = [TokenLoader(data, B, T, seed=seed, rank=r, world_size=world_size) for r in range(world_size)]
        steps = n_blocks // (B * world_size)
        for epoch in range(2):
            order = np.random.default_rng([seed, epoch]).permutation(n_blocks)
            for step in range(steps):
                for r, loader in enumerate(ranks):
                    x, y = loader.next_batch()
                    first = step * B * world_size + r * B
                    assert (x[:, 0] // T).tolist() == order[first : first + B].tolist()
                    assert torch.equal(y, x + 1)


def test_loader_same_seed_same_batches():
    data = np.random.default_rng(0).integers(0, 300, 5000).astype(np.uint16)
    a, b, c = (TokenLoader(data, 3, 16, seed=s) for s in (7, 7, 8))
    for _ in range(200):  # several epochs: reshuffled each one, the same way for the same seed
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == 1
    a2 = TokenLoader(data, 3, 16, seed=7)
    assert not all(torch.equal(a2.next_batch()[0], c.next_batch()[0]) for _ in range(5))


@pytest.mark.parametrize("steps_before", [5, 103, 104, 105])  # mid-epoch, around the epoch boundary (104 steps)
def test_loader_state_restore_continues_exactly(steps_before):
    data = np.random.default_rng(1).integers(0, 300, 5000).astype(np.uint16)
    ref = TokenLoader(data, 3, 16, seed=3)
    for _ in range(steps_before):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # survives serialisation
    resumed = TokenLoader(data, 3, 16, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    for _ in range(110):
        x0, y0 = ref.next_batch()
        x1, y1 = resumed.next_batch()
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert ref.state_dict() == resumed.state_dict()


def test_loader_state_mismatch_is_rejected():
    data = np.arange(5000, dtype=np.uint16)
    state = TokenLoader(data, 3, 16).state_dict()
    with pytest.raises(ValueError, match="block_size=16, but this loader uses block_size=32"):
        TokenLoader(data, 3, 32).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch=3, but this loader uses global_batch=4"):
        TokenLoader(data, 4, 16).load_state_dict(state)
    with pytest.raises(ValueError, match="4000 tokens, but <array> holds 5000"):
        TokenLoader(data, 3, 16).load_state_dict({**state, "tokens": 4000})


def test_two_ranks_are_disjoint_and_together_equal_one_process():
    data = np.random.default_rng(2).integers(0, 300, 20000).astype(np.uint16)
    single = TokenLoader(data, batch_size=8, block_size=16, seed=5)
    ranks = [TokenLoader(data, batch_size=4, block_size=16, seed=5, rank=r, world_size=2) for r in range(2)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == ranks[1].steps_per_epoch
    for _ in range(single.steps_per_epoch + 5):
        x, y = single.next_batch()
        (x0, y0), (x1, y1) = (r.next_batch() for r in ranks)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        rows0, rows1 = {tuple(r) for r in x0.tolist()}, {tuple(r) for r in x1.tolist()}
        assert not rows0 & rows1
    # Rank 0's state restores a different world size with the same global batch (8 = 8 x 1).
    resumed = TokenLoader(data, batch_size=8, block_size=16, seed=0)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(resumed.next_batch()[0], torch.cat([r.next_batch()[0] for r in ranks]))


# Chunks of different lengths whose token values name their place: chunk c, position p holds c * 100_000 + p.
CHUNK_LENGTHS = (161, 330, 97, 250, 42)  # 20 + 41 + 12 + 31 + 5 = 109 blocks of 8 tokens
CHUNK_BLOCKS = tuple((n - 1) // 8 for n in CHUNK_LENGTHS)


def position_chunks() -> list[np.ndarray]:
    return [np.arange(c * 100_000, c * 100_000 + n, dtype=np.uint32) for c, n in enumerate(CHUNK_LENGTHS)]


def block_ids(x: torch.Tensor, block_size: int = 8) -> list[tuple[int, int]]:
    """(chunk, block) of each row of a batch of position_chunks()."""
    return [(int(v) // 100_000, int(v) % 100_000 // block_size) for v in x[:, 0]]


def test_an_epoch_over_several_chunks_visits_every_block_once():
    loader = TokenLoader(position_chunks(), batch_size=4, block_size=8, seed=2)
    assert loader.n_blocks == sum(CHUNK_BLOCKS) == 109 and loader.steps_per_epoch == 27  # 1 block skipped
    assert loader.n_tokens == sum(CHUNK_LENGTHS)
    every = {(c, b) for c, n in enumerate(CHUNK_BLOCKS) for b in range(n)}
    epochs = []
    for _ in range(3):
        seen, spanning = [], 0
        for _ in range(loader.steps_per_epoch):
            x, y = loader.next_batch()
            assert torch.equal(y, x + 1)  # a shifted window inside one chunk: no block straddles two chunks
            assert torch.equal(x[:, 0] % 8, torch.zeros(4, dtype=torch.long))
            ids = block_ids(x)
            spanning += len({c for c, _ in ids}) > 1
            seen += ids
        assert len(seen) == len(set(seen)) == 108 and set(seen) <= every  # each block at most once, all but one
        assert spanning > 0  # some global batches take blocks from two chunks
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    # A chunk's blocks come one after the other (one chunk is read at a time), the chunks in an order of the epoch.
    orders = [list(dict.fromkeys(c for c, _ in seen)) for seen in epochs]
    changes = [sum(a[0] != b[0] for a, b in zip(seen[:-1], seen[1:], strict=True)) for seen in epochs]
    assert all(sorted(o) == list(range(len(CHUNK_LENGTHS))) for o in orders) and changes == [4, 4, 4]
    assert len({tuple(o) for o in orders}) > 1


def test_an_epoch_of_exactly_divisible_chunks_visits_every_block_exactly_once():
    chunks = [np.arange(c * 100_000, c * 100_000 + n, dtype=np.uint32) for c, n in enumerate((81, 49, 33, 57))]
    loader = TokenLoader(chunks, batch_size=3, block_size=8, seed=0)  # 10 + 6 + 4 + 7 = 27 blocks, 9 steps
    assert (loader.n_blocks, loader.steps_per_epoch) == (27, 9)
    seen = [ids for _ in range(9) for ids in block_ids(loader.next_batch()[0])]
    assert sorted(seen) == [(c, b) for c, n in enumerate((10, 6, 4, 7)) for b in range(n)]


def test_two_ranks_over_several_chunks_are_disjoint_and_together_equal_one_process():
    single = TokenLoader(position_chunks(), batch_size=6, block_size=8, seed=9)
    ranks = [TokenLoader(position_chunks(), batch_size=3, block_size=8, seed=9, rank=r, world_size=2) for r in (0, 1)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 18
    for _ in range(2 * single.steps_per_epoch + 3):  # into the third epoch
        x, y = single.next_batch()
        (x0, y0), (x1, y1) = (r.next_batch() for r in ranks)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert not set(block_ids(x0)) & set(block_ids(x1))
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_loader_resumes_exactly_mid_epoch_across_a_chunk_boundary():
    ref = TokenLoader(position_chunks(), 4, 8, seed=4)
    # the first step whose global batch takes blocks from two chunks: a chunk boundary inside the batch
    probe = TokenLoader(position_chunks(), 4, 8, seed=4)
    boundary = next(s for s in range(probe.steps_per_epoch) if len({c for c, _ in block_ids(probe.next_batch()[0])}) > 1)
    assert 0 < boundary < ref.steps_per_epoch - 1  # mid-epoch
    for steps_before in (boundary, boundary + 1):  # the state taken just before the boundary batch, and just after
        ref = TokenLoader(position_chunks(), 4, 8, seed=4)
        for _ in range(steps_before):
            ref.next_batch()
        resumed = TokenLoader(position_chunks(), 4, 8, seed=0)
        resumed.load_state_dict(json.loads(json.dumps(ref.state_dict())))
        for _ in range(ref.steps_per_epoch + 5):
            x0, y0 = ref.next_batch()
            x1, y1 = resumed.next_batch()
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert ref.state_dict() == resumed.state_dict()


def test_loader_reads_prepared_chunks(tmp_path, tok, hf_cache):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS * 4)
    prepare(str(src), tok, tmp_path / "s", val_fraction=0.1, chunk_tokens=1500, hf_cache_dir=hf_cache, **QUIET)
    data = open_prepared(tmp_path / "s")
    chunks = data.chunks("train")
    assert len(chunks) > 2 and all(isinstance(c, Chunk) and c.dtype == "uint16" for c in chunks)
    arrays = [np.fromfile(c.path, dtype=np.uint16) for c in chunks]
    assert all(np.array_equal(c.open(), a) and c.tokens == len(a) for c, a in zip(chunks, arrays, strict=True))
    # The memory-mapped chunks give the batches of the same chunks held in memory.
    mapped, in_memory = TokenLoader(chunks, 2, 32, seed=0), TokenLoader(arrays, 2, 32, seed=0)
    for _ in range(mapped.steps_per_epoch + 2):
        xa, ya = mapped.next_batch()
        xb, yb = in_memory.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # One chunk: its blocks in the order of the single-file loader.
    first = TokenLoader(chunks[0], 2, 32, seed=0)
    x, _ = first.next_batch()
    order = np.random.default_rng([0, 0]).permutation((chunks[0].tokens - 1) // 32)
    assert x.tolist() == [arrays[0][b * 32 : b * 32 + 32].tolist() for b in order[:2]]


def test_loader_memory_does_not_grow_with_the_number_of_chunks(tmp_path):
    """The loader holds one chunk's block order and a few numbers per chunk, not an array over every block."""
    path = tmp_path / "chunk.bin"
    np.random.default_rng(0).integers(0, 300, 40_001).astype(np.uint16).tofile(path)  # 10,000 blocks of 4

    def peak(n_chunks: int) -> int:
        chunks = [Chunk(path, 40_001, "uint16")] * n_chunks  # memory-mapped: the pages are not Python memory
        tracemalloc.start()
        loader = TokenLoader(chunks, batch_size=4, block_size=4, seed=0)
        for _ in range(3000):  # across chunk boundaries (2,500 steps a chunk)
            loader.next_batch()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(4), peak(40)  # 40,000 and 400,000 blocks: 3.2 MB for an int64 order of every block
    assert small < 400_000 and large < small + 50_000, (small, large)


def test_eval_batches_in_order_with_max_tokens():
    data = np.arange(1001, dtype=np.uint32)
    batches = list(eval_batches(data, batch_size=4, block_size=10))
    assert [len(x) for x, _ in batches] == [4] * 25  # all 100 full blocks, in order
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x[:, 0], torch.arange(0, 1000, 10)) and torch.equal(batches[0][1], batches[0][0] + 1)
    limited = list(eval_batches(data, batch_size=4, block_size=10, max_tokens=55))
    assert [len(x) for x, _ in limited] == [4, 1]
    r1 = torch.cat([b[0] for b in eval_batches(data, 4, 10, rank=1, world_size=3)])
    assert torch.equal(r1[:, 0], torch.arange(10, 1000, 30))


def test_eval_batches_over_several_chunks_read_each_chunks_grid_in_order():
    chunks = position_chunks()
    expected = [(c, b) for c, n in enumerate(CHUNK_BLOCKS) for b in range(n)]  # chunk after chunk
    assert count_eval_blocks(chunks, 8) == len(expected) == 109
    batches = list(eval_batches(chunks, batch_size=4, block_size=8))
    assert [len(x) for x, _ in batches] == [4] * 27 + [1]
    assert [ids for x, _ in batches for ids in block_ids(x)] == expected
    assert all(torch.equal(y, x + 1) for x, y in batches)
    # a token budget ending in the second chunk: the first 25 blocks, across the boundary
    assert count_eval_blocks(chunks, 8, max_tokens=203) == 25
    limited = [ids for x, _ in eval_batches(chunks, 4, 8, max_tokens=203) for ids in block_ids(x)]
    assert limited == expected[:25]
    # three ranks: blocks r, r + 3, ...; together every block once
    per_rank = [[ids for x, _ in eval_batches(chunks, 4, 8, rank=r, world_size=3) for ids in block_ids(x)]
                for r in range(3)]
    assert all(per_rank[r] == expected[r::3] for r in range(3))


def test_target_bytes_and_dtype(tok):
    from training.evaluation import bpb_sums  # the one bits-per-byte definition

    text = "café 😀 x"
    ids = torch.tensor([tok.encode(text) + [EOT_ID, -100]])
    # one nat per target: the text's tokens count, the end-of-text token (0 bytes) and the ignored one do not
    text_nats, nbytes = bpb_sums(torch.ones(ids.shape), ids, torch.as_tensor(tok.token_byte_lengths()).long())
    assert (text_nats, nbytes) == (len(tok.encode(text)), len(text.encode("utf-8")))
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# --- bad input: a clear error, and nothing written ---------------------------------------------------------------


def test_missing_path(tmp_path, tok):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="data source not found: .*nope.jsonl"):
        prepare(str(tmp_path / "nope.jsonl"), tok, out)
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub"):
        read_passes("no-such-owner/no-such-dataset-xyz")


def test_empty_sources(tmp_path, tok, hf_cache):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty data source: .*empty.txt"):
        prepare(str(tmp_path / "empty.txt"), tok, out, hf_cache_dir=hf_cache, **QUIET)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("not a supported type")
    with pytest.raises(ValueError, match="empty data source: folder .*folder holds no"):
        prepare(str(tmp_path / "folder"), tok, out, hf_cache_dir=hf_cache, **QUIET)
    write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    with pytest.raises(ValueError, match="empty data source: the train split of .*blank.jsonl holds no non-empty text"):
        prepare(str(tmp_path / "blank.jsonl"), tok, out, hf_cache_dir=hf_cache, **QUIET)
    assert shard_files(out) == []


def test_an_empty_validation_split_is_an_error_naming_the_rule(tmp_path, tok, hf_cache):
    docs = DOCS[:20]
    assert held_out(docs, 0.001) == []  # by hand: no hash of these 20 falls below 0.001 x 2^64
    src = write_jsonl(tmp_path / "few.jsonl", docs)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"the val split of .*few\.jsonl holds no non-empty text \(no document's "
                                         r"hash fell below val_fraction=0\.001 x 2\^64"):
        prepare(str(src), tok, out, val_fraction=0.001, hf_cache_dir=hf_cache, **QUIET)
    assert shard_files(out) == []  # the whole source was read: nothing left to resume
    with pytest.raises(FileNotFoundError, match="not a prepared data folder"):
        open_prepared(out)


def test_a_read_error_after_a_checkpoint_keeps_what_can_resume(tmp_path, tok, hf_cache, monkeypatch):
    """A read that fails once the train pass is recorded (a dropped connection, say) keeps that work: the next call
    resumes at the val pass and writes the bytes of an uninterrupted preparation."""
    jl, _ = write_explicit_splits(tmp_path / "src")
    real_iter = prepare_module.iter_texts

    def failing_val_pass(rp, *args, **kwargs):
        if rp.split == "val":
            raise ValueError(f"cannot read json data from {rp.files[0]}: connection reset")
        return real_iter(rp, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "iter_texts", failing_val_pass)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="connection reset"):
        prepare(str(jl), tok, out, hf_cache_dir=hf_cache, **QUIET)
    recorded = read_manifest(out)
    assert not recorded["complete"] and recorded["position"] == {"pass": 1, "rows": 0}
    assert recorded["splits"]["train"]["documents"] == OLD_FORMAT_SHARDS["jl/train"][3]
    with pytest.raises(ValueError, match="not completely prepared"):
        open_prepared(out)
    reads = []
    monkeypatch.setattr(prepare_module, "iter_texts", lambda rp, *a, **k: reads.append(rp.split) or real_iter(rp, *a, **k))
    m = prepare(str(jl), tok, out, hf_cache_dir=hf_cache, **QUIET)
    assert reads == ["val"]  # the train pass was not read again
    for split in ("train", "val"):
        counts = m["splits"][split]
        got = [hashlib.sha256(split_bytes(out, split)).hexdigest(), counts["tokens"], counts["bytes"],
               counts["documents"]]
        assert got == OLD_FORMAT_SHARDS[f"jl/{split}"]


def test_too_small_source(tmp_path, tok, hf_cache):
    out = tmp_path / "out"
    docs = ["tiny doc", "another tiny doc", "a third one", "a fourth one"]
    assert held_out(docs, 0.5) == docs[1:3]  # by hand: two documents in each split
    write_jsonl(tmp_path / "small.jsonl", docs)
    with pytest.raises(ValueError, match=r"train split of .*small.jsonl is too small: \d+ tokens .*block_size=256"):
        prepare(str(tmp_path / "small.jsonl"), tok, out, val_fraction=0.5, block_size=256, hf_cache_dir=hf_cache,
                **QUIET)
    assert shard_files(out) == []
    # The loader refuses a shard too short for one block, or for one global batch.
    with pytest.raises(ValueError, match="too small: 5 tokens cannot fill one block of block_size=8"):
        TokenLoader(np.arange(5, dtype=np.uint16), 1, 8)
    with pytest.raises(ValueError, match="too small: 8 tokens cannot fill one block of block_size=8"):
        TokenLoader([np.arange(5, dtype=np.uint16), np.arange(8, dtype=np.uint16)], 1, 8)  # blocks never straddle
    with pytest.raises(ValueError, match="3 blocks of block_size=8 cannot fill one global batch of batch_size=2"):
        TokenLoader(np.arange(25, dtype=np.uint16), 2, 8, world_size=2)


def test_missing_column(tmp_path, tok, hf_cache):
    out = tmp_path / "out"
    write_jsonl(tmp_path / "c.jsonl", DOCS[:5], column="content")
    with pytest.raises(
        ValueError, match=r"column 'text' not found in .*c\.jsonl; available columns: \['content', 'id'\]"
    ):
        prepare(str(tmp_path / "c.jsonl"), tok, out, hf_cache_dir=hf_cache, **QUIET)
    with pytest.raises(ValueError, match=r"column 'id' in .*c\.jsonl holds a number, not text"):
        prepare(str(tmp_path / "c.jsonl"), tok, out, text_column="id", hf_cache_dir=hf_cache, **QUIET)
    assert shard_files(out) == []


@pytest.mark.parametrize("bad,holds", [("[1, 2]", "a list"), ("42", "a number"), ('"just text"', "a string")])
def test_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path, tok, hf_cache, bad, holds):
    out = tmp_path / "out"
    lines = [json.dumps({"text": d}) for d in DOCS[:8]]
    folder = tmp_path / "docs"
    write_jsonl(folder / "a.jsonl", DOCS[8:12])  # a good file first: the message must name the bad one
    (folder / "b.jsonl").write_text("\n".join(lines[:4] + ["", bad] + lines[4:]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"docs/b\.jsonl: line 6 holds {holds}, not a JSON object"):
        prepare(str(folder), tok, out, hf_cache_dir=hf_cache, **QUIET)
    assert shard_files(out) == []
    # a .json file may be one array of objects: its element is named instead of a line
    (tmp_path / "array.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}, json.loads(bad)]))
    with pytest.raises(ValueError, match=rf"array\.json: element 2 of its array holds {holds}, not a JSON object"):
        stream_texts(str(tmp_path / "array.json"), cache_dir=hf_cache)
    (tmp_path / "broken.jsonl").write_text("\n".join(lines[:2] + ['{"text": "unterminated'] + lines[2:]))
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3 is not valid JSON \(Unterminated string"):
        stream_texts(str(tmp_path / "broken.jsonl"), cache_dir=hf_cache)


def test_folder_mixing_formats_is_refused(tmp_path, tok, hf_cache):
    write_jsonl(tmp_path / "mixed" / "a.jsonl", DOCS[:20])
    (tmp_path / "mixed" / "b.txt").write_text(DOCS[20])
    with pytest.raises(ValueError, match=r"folder .*mixed mixes file formats \['json', 'text'\]; keep one format"):
        prepare(str(tmp_path / "mixed"), tok, tmp_path / "out", hf_cache_dir=hf_cache, **QUIET)


def test_non_utf8_rejected_with_file_and_offset(tmp_path, tok, hf_cache):
    out = tmp_path / "out"
    good = "héllo wörld 😀\n".encode()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(good * 3 + "caf\xe9 au lait".encode("latin-1"))
    offset = len(good) * 3 + 3
    with pytest.raises(ValueError, match=rf"latin1.txt: not valid UTF-8 at byte offset {offset}\b"):
        prepare(str(bad), tok, out, hf_cache_dir=hf_cache, **QUIET)
    assert shard_files(out) == []
    # Streamed files too: a .txt document of a folder, a JSON Lines file (after a good one), named with the offset.
    (tmp_path / "txt" / "train").mkdir(parents=True)
    (tmp_path / "txt" / "val").mkdir()
    (tmp_path / "txt" / "train" / "a.txt").write_text("fine")
    (tmp_path / "txt" / "train" / "b.txt").write_bytes(bad.read_bytes())
    (tmp_path / "txt" / "val" / "c.txt").write_text("fine too")
    with pytest.raises(ValueError, match=rf"train/b\.txt: not valid UTF-8 at byte offset {offset}\b"):
        prepare(str(tmp_path / "txt"), tok, tmp_path / "out-txt", hf_cache_dir=hf_cache, **QUIET)
    write_jsonl(tmp_path / "jl" / "a.jsonl", DOCS[:3])
    row = b'{"text": "caf\xe9"}\n'
    (tmp_path / "jl" / "b.jsonl").write_bytes(b'{"text": "ok"}\n' + row)
    with pytest.raises(ValueError, match=r"jl/b\.jsonl: not valid UTF-8 at byte offset 28\b"):
        prepare(str(tmp_path / "jl"), tok, tmp_path / "out-jl", hf_cache_dir=hf_cache, **QUIET)
    # The offset is exact when a chunk boundary falls inside a character or right before the bad byte.
    for chunk in (1, 2, 3, 5, 7, 64):
        with pytest.raises(ValueError, match=rf"byte offset {offset}\b"):
            check_utf8(bad, chunk_bytes=chunk)
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_bytes(b'{"text": "ok"}\n' + "😀".encode()[:2])
    with pytest.raises(ValueError, match=r"truncated.jsonl: not valid UTF-8 at byte offset 15\b"):
        check_utf8(truncated, chunk_bytes=4)


def test_bad_split_name(tmp_path, tok):
    with pytest.raises(ValueError, match="split='test'"):
        prepare("stdlib", tok, tmp_path, splits=("test",))


# --- one grammar of data sources, one split vocabulary ------------------------------------------------------------


def test_parse_source_reads_each_form(tmp_path, monkeypatch):
    from data.sources import parse_source

    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "folder").mkdir()
    assert parse_source("stdlib") == Source("stdlib", "stdlib")
    assert parse_source("synthetic") == Source("synthetic", "synthetic")
    assert parse_source(str(tmp_path / "docs.jsonl")) == Source(str(tmp_path / "docs.jsonl"), "file",
                                                                path=tmp_path / "docs.jsonl")
    assert parse_source(tmp_path / "folder") == Source(str(tmp_path / "folder"), "folder", path=tmp_path / "folder")
    assert parse_source("hf:roneneldan/TinyStories") == Source("hf:roneneldan/TinyStories", "hub",
                                                                name="roneneldan/TinyStories")
    assert parse_source("hub:wikitext:wikitext-2-raw-v1") == Source("hub:wikitext:wikitext-2-raw-v1", "hub",
                                                                     name="wikitext", config="wikitext-2-raw-v1")
    bare = parse_source("HuggingFaceFW/fineweb-edu:sample-10BT")  # no such local path: a Hub id
    assert (bare.kind, bare.name, bare.config, bare.hub_id) == ("hub", "HuggingFaceFW/fineweb-edu", "sample-10BT",
                                                                 "HuggingFaceFW/fineweb-edu:sample-10BT")
    assert bare.label == "hub dataset HuggingFaceFW/fineweb-edu (sample-10BT)"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stdlib").mkdir()
    (tmp_path / "roneneldan" / "TinyStories").mkdir(parents=True)
    assert parse_source("stdlib").kind == "stdlib"  # the built-in name wins over a folder of that name ...
    assert parse_source("./stdlib") == Source("./stdlib", "folder", path=Path("stdlib"))  # ... unless written as one
    assert parse_source("roneneldan/TinyStories").kind == "folder"  # an existing path wins over a Hub id
    assert parse_source("hf:roneneldan/TinyStories").kind == "hub"  # unless hf: says otherwise
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_source("~/docs.jsonl") == Source("~/docs.jsonl", "file", path=tmp_path / "docs.jsonl")


@pytest.mark.parametrize("text,error,message", [
    ("hf:", ValueError, r"data source 'hf:': no dataset name"),
    ("hub:", ValueError, r"data source 'hub:': no dataset name"),
    ("hf::cfg", ValueError, r"data source 'hf::cfg': no dataset name"),
    ("hf:wikitext:", ValueError, r"data source 'hf:wikitext:': no configuration after ':'"),
    ("hf:a b", ValueError, r"data source 'hf:a b': 'a b' is not a Hub dataset name"),
    ("hf:a/b/c", ValueError, r"'a/b/c' is not a Hub dataset name"),
    ("", ValueError, r"data source '': expected 'stdlib', 'synthetic', a file or folder path"),
    ("  ", ValueError, r"data source '  ': expected"),
    ("nope.jsonl", FileNotFoundError, r"data source not found: nope.jsonl \(no such file or folder\)"),
    ("missing.txt", FileNotFoundError, r"data source not found: missing.txt"),
    ("./corpus", FileNotFoundError, r"data source not found: ./corpus"),
    ("~/no/such/corpus", FileNotFoundError, r"data source not found: ~/no/such/corpus"),
    ("a/b/c", FileNotFoundError, r"data source not found: a/b/c"),
    ("owner/name:bad config", FileNotFoundError, r"data source not found: owner/name:bad config"),
])
def test_parse_source_refuses_bad_input_naming_it(tmp_path, monkeypatch, text, error, message):
    from data.sources import parse_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        parse_source(text)


def test_every_loader_reads_sources_through_the_one_parser(tmp_path, monkeypatch, hf_cache):
    """The same bad source gives the same error from pre-training, the SFT/DPO records and evaluate.py."""
    import importlib.util

    from data.sft import load_records

    spec = importlib.util.spec_from_file_location("gptrain_eval_sources", Path(__file__).parents[1] / "scripts" /
                                                  "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    monkeypatch.chdir(tmp_path)
    for load in (lambda s: read_passes(s, cache_dir=hf_cache), lambda s: describe_source(s, "val"),
                 lambda s: load_records(s, "train", cache_dir=hf_cache), evaluate.peek_fields):
        with pytest.raises(ValueError, match=r"data source 'hf:': no dataset name"):
            load("hf:")
        with pytest.raises(FileNotFoundError, match=r"data source not found: missing\.txt"):
            load("missing.txt")
    with pytest.raises(ValueError, match=r"'synthetic' is the built-in SFT/DPO data \(records\), not text"):
        describe_source("synthetic", "train")
    with pytest.raises(ValueError, match=r"'stdlib' is the built-in text corpus for pre-training, not DPO records"):
        load_records("stdlib", "train", "dpo")
    write_jsonl(tmp_path / "rows.jsonl", ["x"], column="answer")
    assert evaluate.peek_fields("rows.jsonl") == {"answer", "id"} and evaluate.peek_fields("stdlib") is None
    (tmp_path / "notes.txt").write_text("plain text")
    assert evaluate.peek_fields("notes.txt") is None


def test_one_split_vocabulary():
    from data import synthetic
    from data.sft import load_records
    from data.sources import SPLITS, dataset_split_names, normalize_split

    assert SPLITS == ("train", "val")
    assert [normalize_split(s) for s in ("train", "val", "validation")] == ["train", "val", "val"]
    assert dataset_split_names("train") == ("train",)
    assert dataset_split_names("validation") == dataset_split_names("val") == ("validation", "valid", "val", "dev",
                                                                               "test")
    for bad in ("test", "dev", "Val", ""):
        with pytest.raises(ValueError, match=rf"split={bad!r}: expected one of \('train', 'val'\)"):
            normalize_split(bad)
        with pytest.raises(ValueError, match=rf"split={bad!r}"):
            load_records("synthetic", bad)
    # the built-in records keep their own split name, so their content (seeded by it) does not move
    records, label = load_records("synthetic", "val", "sft", seed=3, n_synthetic=5)
    assert [r for _, r in records] == synthetic.make_sft(5, 3, "validation")
    assert label == "built-in synthetic sft data (validation, seed 3)"
    assert load_records("synthetic", "validation", "sft", seed=3, n_synthetic=5) == (records, label)


def test_the_label_ignore_value_is_defined_once():
    import data.chat
    import model.losses

    # the very same object, not two equal literals (CPython caches only -5..256, so two -100s are two objects)
    assert model.losses.IGNORE is data.chat.IGNORE_INDEX
