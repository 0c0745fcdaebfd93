"""Data pipeline tests: sources, shard preparation and cache, the token loader, bad inputs. Real files in tmp_path."""

import json
import os
import random
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import data.shards as shards  # noqa: E402
from data.shards import (  # noqa: E402
    TokenLoader,
    eval_batches,
    open_tokens,
    prepare,
    read_manifest,
    token_dtype,
)
from data.sources import (  # noqa: E402
    STDLIB_EXCLUDED_DIRS,
    STDLIB_VAL_FILES,
    Source,
    check_utf8,
    describe_source,
    load_source,
    stdlib_files,
    stdlib_root,
)
from data.tokenizer import EOT_ID, train_tokenizer  # noqa: E402

datasets.disable_progress_bars()

WORDS = "alpha beta gamma delta café naïve 😀 日本 def return x = 1 + 2 ( ) : \n".split(" ")


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + f" doc{i}" for i in range(n)]


DOCS = make_docs(120)


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
    """Files a failed preparation must not leave: shards, manifests, temporaries."""
    if not out_dir.exists():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.suffix in (".bin", ".json", ".tmp"))


def expected_tokens(tok, docs: list[str]) -> list[int]:
    out = []
    for d in docs:
        out += tok.encode(d) + [EOT_ID]
    return out


# --- preparation and manifest -----------------------------------------------------------------------------------


def test_prepare_writes_documents_with_eot_and_right_counts(tmp_path, tok, hf_cache):
    src = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = tmp_path / "shards"
    train = prepare(str(src), tok, out, "train", hf_cache_dir=hf_cache, verbose=False)
    val = prepare(str(src), tok, out, "val", hf_cache_dir=hf_cache, verbose=False)
    # 1% of 120 documents, at least one, goes to validation; every document lands in exactly one split.
    assert val["documents"] == 1 and train["documents"] == 119
    val_docs = load_source(str(src), "val", cache_dir=hf_cache)["text"]
    train_docs = [d for d in DOCS if d not in val_docs]
    for manifest, docs in ((train, train_docs), (val, val_docs)):
        split = manifest["split"]
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert ids.tolist() == expected_tokens(tok, docs)  # document order kept, EOT after each
        assert manifest["tokens"] == len(ids)
        assert manifest["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        assert manifest["dtype"] == "uint16" and manifest["tokenizer_hash"] == tok.hash
        assert manifest["files"] == ["corpus.jsonl"] and manifest["python_version"] is None
        assert read_manifest(out / f"{split}.bin") == manifest
        # Bytes from the tokenizer's byte lengths agree with the UTF-8 count (EOT counts 0).
        assert tok.token_byte_lengths()[ids].sum() == manifest["bytes"]


def test_shards_byte_identical_across_preparations_and_num_proc(tmp_path, tok, hf_cache, monkeypatch):
    src = write_jsonl(tmp_path / "corpus.jsonl", DOCS * 3)
    a = prepare(str(src), tok, tmp_path / "a", "train", hf_cache_dir=hf_cache, verbose=False)
    b = prepare(str(src), tok, tmp_path / "b", "train", hf_cache_dir=hf_cache, verbose=False)
    map_procs = []
    real_map = datasets.Dataset.map
    monkeypatch.setattr(
        datasets.Dataset, "map", lambda self, *a, **k: map_procs.append(k.get("num_proc")) or real_map(self, *a, **k)
    )
    c = prepare(str(src), tok, tmp_path / "c", "train", num_proc=2, hf_cache_dir=hf_cache, verbose=False)
    assert 2 in map_procs  # the multi-process path really ran
    blob = (tmp_path / "a" / "train.bin").read_bytes()
    assert blob == (tmp_path / "b" / "train.bin").read_bytes() == (tmp_path / "c" / "train.bin").read_bytes()
    assert a == b == c


def test_cache_reused_and_invalidated(tmp_path, tok, tok2, hf_cache, capsys):
    src = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = tmp_path / "shards"
    first = prepare(str(src), tok, out, "train", hf_cache_dir=hf_cache)
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert prepare(str(src), tok, out, "train", hf_cache_dir=hf_cache) == first
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().out

    # A different tokenizer never reuses the old shard.
    other = prepare(str(src), tok2, out, "train", hf_cache_dir=hf_cache, verbose=False)
    assert other["tokenizer_hash"] == tok2.hash != first["tokenizer_hash"]
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == expected_tokens(
        tok2, load_source(str(src), "train", cache_dir=hf_cache)["text"]
    )
    # Changed source content re-prepares too.
    write_jsonl(src, DOCS[:60])
    smaller = prepare(str(src), tok2, out, "train", hf_cache_dir=hf_cache, verbose=False)
    assert smaller["documents"] == 59
    # So does a truncated shard (an interrupted copy, say).
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    assert prepare(str(src), tok2, out, "train", hf_cache_dir=hf_cache, verbose=False) == smaller
    assert (out / "train.bin").stat().st_size == 2 * smaller["tokens"]


def test_concurrent_prepare_runs_once(tmp_path, tok, hf_cache, monkeypatch):
    src = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    calls = []
    real_load = shards.load_source
    monkeypatch.setattr(shards, "load_source", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    results = [None] * 3

    def run(i):
        results[i] = prepare(str(src), tok, tmp_path / "out", "train", hf_cache_dir=hf_cache, verbose=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results[0] == results[1] == results[2] and results[0]["tokens"] > 0


def test_text_column_and_formats(tmp_path, tok, hf_cache):
    docs = DOCS[:20]
    write_jsonl(tmp_path / "j" / "a.jsonl", docs, column="content")
    datasets.Dataset.from_dict({"content": docs, "n": list(range(20))}).to_parquet(str(tmp_path / "p" / "a.parquet"))
    datasets.Dataset.from_dict({"content": docs}).to_csv(str(tmp_path / "c" / "a.csv"), index=False)
    got = [load_source(str(tmp_path / d), "train", text_column="content", cache_dir=hf_cache) for d in "jpc"]
    assert got[0]["text"] == got[1]["text"] == got[2]["text"] and len(got[0]) == 19
    assert got[0].column_names == ["text"]


def test_txt_folder_one_document_per_file_and_named_splits(tmp_path, hf_cache):
    folder = tmp_path / "txt"
    for name, text in {"train_a.txt": "first\r\nfile\n", "train_b.txt": "second", "val.txt": "held out"}.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(text.encode())
    (folder / ".hidden.txt").write_text("ignored")
    assert load_source(str(folder), "train", cache_dir=hf_cache)["text"] == ["first\nfile\n", "second"]
    assert load_source(str(folder), "validation", cache_dir=hf_cache)["text"] == ["held out"]


def test_single_document_is_split_at_a_line_break(tmp_path, hf_cache):
    lines = [f"line {i} of the only document" for i in range(300)]
    src = tmp_path / "one.txt"
    src.write_text("\n".join(lines) + "\n")
    train = load_source(str(src), "train", cache_dir=hf_cache)["text"]
    val = load_source(str(src), "val", cache_dir=hf_cache)["text"]
    assert len(train) == len(val) == 1
    assert train[0] + val[0] == src.read_text() and train[0].endswith("\n")
    assert 0 < len(val[0]) <= 0.02 * len(src.read_text())


def test_hash_split_is_deterministic_and_order_free(tmp_path, hf_cache):
    docs = make_docs(400, seed=1)
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    write_jsonl(tmp_path / "a.jsonl", docs)
    write_jsonl(tmp_path / "b" / "b.jsonl", shuffled)
    val_a = load_source(str(tmp_path / "a.jsonl"), "val", cache_dir=hf_cache)["text"]
    val_b = load_source(str(tmp_path / "b"), "val", cache_dir=hf_cache)["text"]
    assert len(val_a) == 4 and sorted(val_a) == sorted(val_b)
    train_a = load_source(str(tmp_path / "a.jsonl"), "train", cache_dir=hf_cache)["text"]
    assert len(train_a) == 396 and not set(train_a) & set(val_a)


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
    manifest = prepare("stdlib", tok, tmp_path, "val", block_size=64, hf_cache_dir=hf_cache, verbose=False)
    assert manifest["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert manifest["files"] == sorted(f for f in STDLIB_VAL_FILES if (stdlib_root() / f).is_file())
    texts = [(stdlib_root() / f).read_text(encoding="utf-8") for f in manifest["files"]]
    texts = [t for t in texts if t]
    assert manifest["documents"] == len(texts)
    assert manifest["bytes"] == sum(len(t.encode("utf-8")) for t in texts)


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


def test_loader_reads_prepared_shard(tmp_path, tok, hf_cache):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    prepare(str(src), tok, tmp_path / "s", "train", hf_cache_dir=hf_cache, verbose=False)
    tokens = np.fromfile(tmp_path / "s" / "train.bin", dtype=np.uint16)
    assert np.array_equal(open_tokens(tmp_path / "s" / "train.bin"), tokens)
    loader = TokenLoader(tmp_path / "s" / "train.bin", 2, 32, seed=0)
    x, y = loader.next_batch()
    start = int(loader._permutation()[0]) * 32
    assert x[0].tolist() == tokens[start : start + 32].tolist()


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
        prepare(str(tmp_path / "nope.jsonl"), tok, out, "train")
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub"):
        load_source("no-such-owner/no-such-dataset-xyz", "train")


def test_empty_sources(tmp_path, tok, hf_cache):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty data source: .*empty.txt"):
        prepare(str(tmp_path / "empty.txt"), tok, out, "train", hf_cache_dir=hf_cache)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("not a supported type")
    with pytest.raises(ValueError, match="empty data source: folder .*folder holds no"):
        prepare(str(tmp_path / "folder"), tok, out, "train", hf_cache_dir=hf_cache)
    write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    with pytest.raises(ValueError, match="empty data source: .*blank.jsonl holds no non-empty text"):
        prepare(str(tmp_path / "blank.jsonl"), tok, out, "train", hf_cache_dir=hf_cache)
    assert shard_files(out) == []


def test_too_small_source(tmp_path, tok, hf_cache):
    out = tmp_path / "out"
    write_jsonl(tmp_path / "small.jsonl", ["tiny doc", "another tiny doc"])
    with pytest.raises(ValueError, match=r"train split of .*small.jsonl is too small: \d+ tokens .*block_size=256"):
        prepare(str(tmp_path / "small.jsonl"), tok, out, "train", block_size=256, hf_cache_dir=hf_cache)
    assert shard_files(out) == []
    # The loader refuses a shard too short for one block, or for one global batch.
    with pytest.raises(ValueError, match="too small: 5 tokens cannot fill one block of block_size=8"):
        TokenLoader(np.arange(5, dtype=np.uint16), 1, 8)
    with pytest.raises(ValueError, match="3 blocks of block_size=8 cannot fill one global batch of batch_size=2"):
        TokenLoader(np.arange(25, dtype=np.uint16), 2, 8, world_size=2)


def test_missing_column(tmp_path, tok, hf_cache):
    out = tmp_path / "out"
    write_jsonl(tmp_path / "c.jsonl", DOCS[:5], column="content")
    with pytest.raises(
        ValueError, match=r"column 'text' not found in .*c\.jsonl; available columns: \['content', 'id'\]"
    ):
        prepare(str(tmp_path / "c.jsonl"), tok, out, "train", hf_cache_dir=hf_cache)
    with pytest.raises(ValueError, match=r"column 'id' in .*c\.jsonl holds .*int64.*not text"):
        prepare(str(tmp_path / "c.jsonl"), tok, out, "train", text_column="id", hf_cache_dir=hf_cache)
    assert shard_files(out) == []


@pytest.mark.parametrize("bad,holds", [("[1, 2]", "a list"), ("42", "a number"), ('"just text"', "a string")])
def test_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path, tok, hf_cache, bad, holds):
    out = tmp_path / "out"
    lines = [json.dumps({"text": d}) for d in DOCS[:8]]
    folder = tmp_path / "docs"
    write_jsonl(folder / "a.jsonl", DOCS[8:12])  # a good file first: the message must name the bad one
    (folder / "b.jsonl").write_text("\n".join(lines[:4] + ["", bad] + lines[4:]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"docs/b\.jsonl: line 6 holds {holds}, not a JSON object"):
        prepare(str(folder), tok, out, "train", hf_cache_dir=hf_cache)
    assert shard_files(out) == []
    # a .json file may be one array of objects: its element is named instead of a line
    (tmp_path / "array.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}, json.loads(bad)]))
    with pytest.raises(ValueError, match=rf"array\.json: element 2 of its array holds {holds}, not a JSON object"):
        load_source(str(tmp_path / "array.json"), "train", cache_dir=hf_cache)
    (tmp_path / "broken.jsonl").write_text("\n".join(lines[:2] + ['{"text": "unterminated'] + lines[2:]))
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3 is not valid JSON \(Unterminated string"):
        load_source(str(tmp_path / "broken.jsonl"), "train", cache_dir=hf_cache)


def test_folder_mixing_formats_is_refused(tmp_path, tok, hf_cache):
    write_jsonl(tmp_path / "mixed" / "a.jsonl", DOCS[:20])
    (tmp_path / "mixed" / "b.txt").write_text(DOCS[20])
    with pytest.raises(ValueError, match=r"folder .*mixed mixes file formats \['json', 'text'\]; keep one format"):
        prepare(str(tmp_path / "mixed"), tok, tmp_path / "out", "train", hf_cache_dir=hf_cache)


def test_non_utf8_rejected_with_file_and_offset(tmp_path, tok, hf_cache):
    out = tmp_path / "out"
    good = "héllo wörld 😀\n".encode()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(good * 3 + "caf\xe9 au lait".encode("latin-1"))
    offset = len(good) * 3 + 3
    with pytest.raises(ValueError, match=rf"latin1.txt: not valid UTF-8 at byte offset {offset}\b"):
        prepare(str(bad), tok, out, "train", hf_cache_dir=hf_cache)
    assert shard_files(out) == []
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
        prepare("stdlib", tok, tmp_path, "test")


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
    for load in (lambda s: load_source(s, "train", cache_dir=hf_cache), lambda s: describe_source(s, "val"),
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
