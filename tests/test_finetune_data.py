"""Fine-tuning data tests: built-in synthetic tasks, SFT and preference loading from real files, bad records,
truncation, and the batchers (padding, packing boundaries, exact resume, rank slices)."""

import json
import re

import datasets
import pytest
import torch

from data.chat import IGNORE_INDEX, render, render_prompt
from data.preference import PreferenceBatcher, load_preferences
from data.sft import SFTBatcher, SFTExample, load_records, load_sft
from data.synthetic import answer_matches, make_preferences, make_sft, split_of, write_builtin
from data.tokenizer import ASSISTANT_ID, END_ID, PAD_ID, USER_ID, Tokenizer, train_tokenizer
from training.config import Config
from training.stages.base import chat_eval_items


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = [m["content"] for r in make_sft(400, 0) for m in r["messages"]]
    code = ["def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n", "Hello there, how are you?"]
    return train_tokenizer(text + code * 30, vocab_size=400, min_frequency=1)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def conv(q, a, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


# --- synthetic tasks ----------------------------------------------------------------------------------------------


def _solve(prompt: str) -> str:
    """Independent reference solution of each built-in task, parsed from the prompt text."""
    if m := re.fullmatch(r"What is (\d+)\+(\d+)\?", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Reverse: (.+)", prompt):
        return " ".join(m[1].split()[::-1])
    if m := re.fullmatch(r"Sort: (.+)", prompt):
        return " ".join(map(str, sorted(map(int, m[1].split()))))
    if m := re.fullmatch(r"Count (\w) in '(\w+)'", prompt):
        return str(m[2].count(m[1]))
    raise AssertionError(f"unknown prompt form {prompt!r}")


def test_synthetic_deterministic_and_correct():
    a, b = make_sft(200, seed=7, split="train"), make_sft(200, seed=7, split="train")
    assert a == b
    assert make_sft(200, seed=8, split="train") != a
    assert {r["task"] for r in a} == {"add", "reverse", "sort", "count"}
    for r in a + make_sft(100, 7, "validation"):
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == _solve(user["content"])
    prompts = [r["messages"][0]["content"] for r in a]
    assert len(set(prompts)) == len(prompts)  # unique within a split


def test_synthetic_train_validation_disjoint():
    train = {r["messages"][0]["content"] for s in (0, 1) for r in make_sft(2000, s, "train")}
    train |= {r["prompt"][0]["content"] for r in make_preferences(2000, 0, "train")}
    val = {r["messages"][0]["content"] for r in make_sft(300, 0, "validation")}
    val |= {r["prompt"][0]["content"] for r in make_preferences(300, 1, "validation")}
    assert len(val) > 400 and not train & val
    assert all(split_of(p) == "validation" for p in val) and all(split_of(p) == "train" for p in train)


def test_synthetic_preferences_plausible_and_wrong():
    pairs = make_preferences(400, 3, "train")
    assert pairs == make_preferences(400, 3, "train")
    for r in pairs:
        prompt, chosen, rejected = r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert answer_matches(chosen, _solve(prompt))
        assert not answer_matches(rejected, chosen)
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        if r["task"] in ("add", "count"):
            assert abs(int(rejected) - int(chosen)) in (1, 2, 10)  # off by one/two/ten
        else:
            assert sorted(rejected.split()) == sorted(chosen.split())  # same elements, wrong order


def test_answer_matches():
    assert answer_matches(" 432\n", "432")
    assert answer_matches("c b a", " c b a ")
    assert not answer_matches("4320", "432")
    assert not answer_matches("c  b a", "c b a")
    assert not answer_matches("", "0")


def test_write_builtin_loads_through_datasets(tok, tmp_path):
    paths = write_builtin(tmp_path, seed=5, n_train=40, n_val=12)
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["train.jsonl", "validation.jsonl"]
    lines = (tmp_path / "sft" / "validation.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == make_sft(12, 5, "validation")
    ex, stats = load_sft(paths["sft"], "validation", tok, block_size=64)
    assert stats["n_records"] == 12 and stats["source"].endswith("validation.jsonl")
    ex_mem, _ = load_sft("synthetic", "val", tok, block_size=64, seed=5, n_synthetic=12)
    assert ex == ex_mem  # the files hold exactly the in-memory built-in data
    pairs, pstats = load_preferences(paths["dpo"], "train", tok, block_size=64)
    assert pstats["n_records"] == 40 and len(pairs) == 40


# --- SFT loading --------------------------------------------------------------------------------------------------


def test_load_sft_formats_render_identically(tok, tmp_path):
    q, a = "What is 2+3?", "5"
    records = [
        {"messages": conv(q, a)},
        {"prompt": q, "completion": a},
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]},
    ]
    expected_ids, _ = render(conv(q, a), tok)
    for i, r in enumerate(records):
        path = write_jsonl(tmp_path / f"f{i}.jsonl", [r] * 3)
        ex, stats = load_sft(path, "train", tok, block_size=64)
        assert stats["n_records"] == 2 and stats["n_dropped"] == 0  # 3 records: one held out for validation
        assert ex[0].input_ids == expected_ids[:-1], r
        n_prompt = len(render_prompt(conv(q, a)[:1], tok))
        assert ex[0].labels == [IGNORE_INDEX] * (n_prompt - 1) + tok.encode(a) + [END_ID]


def test_load_sft_parquet_and_held_out_split(tok, tmp_path):
    records = [{"messages": conv(f"What is {i}+1?", str(i + 1))} for i in range(60)]
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(path))
    train, _ = load_sft(path, "train", tok, block_size=64)
    val, vstats = load_sft(path, "validation", tok, block_size=64)
    assert (len(train), len(val)) == (57, 3)  # 5% held out
    assert not {tuple(e.input_ids) for e in train} & {tuple(e.input_ids) for e in val}
    assert load_sft(path, "validation", tok, block_size=64)[0] == val  # deterministic
    assert vstats["source"] == str(path)


def test_load_sft_bad_records_name_index_and_file(tok, tmp_path):
    good = {"messages": conv("hi", "hello")}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, {"prompt": "only a prompt", "extra": 1}] + [good] * 40)
    with pytest.raises(ValueError, match=r"record 2 of .*bad\.jsonl.*'messages'.*found fields \['extra', 'prompt'\]"):
        load_sft(path, "train", tok, block_size=64)
    path = write_jsonl(tmp_path / "role.jsonl", [good, {"messages": [{"role": "bot", "content": "x"}]}] + [good] * 40)
    with pytest.raises(ValueError, match=r"record 1 of .*role\.jsonl: message 0 has unknown role 'bot'"):
        load_sft(path, "train", tok, block_size=64)
    path = write_jsonl(tmp_path / "noasst.jsonl", [good, good, good, {"messages": conv("q", "a")[:1]}] + [good] * 40)
    with pytest.raises(ValueError, match=r"record 3 of .*noasst\.jsonl: conversation has no assistant turn"):
        load_sft(path, "train", tok, block_size=64)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_sft(tmp_path / "missing.jsonl", "train", tok, block_size=64)
    with pytest.raises(ValueError, match="split"):
        load_sft("synthetic", "test", tok, block_size=64)


@pytest.mark.parametrize("bad,holds", [("[1, 2]", "a list"), ("7", "a number"), ('"a bare string"', "a string")])
def test_record_line_that_is_not_an_object_names_file_and_line(tok, tmp_path, bad, holds):
    sft = json.dumps({"messages": conv("hi", "hello")})
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join([sft] * 4 + [bad] + [sft] * 40) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"sft\.jsonl: line 5 holds {holds}, not a JSON object"):
        load_sft(path, "train", tok, block_size=64)
    pair = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    (tmp_path / "dpo").mkdir()
    write_jsonl(tmp_path / "dpo" / "train.jsonl", [json.loads(pair)] * 5)
    (tmp_path / "dpo" / "validation.jsonl").write_text("\n".join([pair, bad, pair]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"dpo/validation\.jsonl: line 2 holds {holds}, not a JSON object"):
        load_preferences(tmp_path / "dpo", "train", tok, block_size=64)  # datasets reads every split of a folder


def test_record_folder_mixing_formats_is_refused_like_pretraining(tok, tmp_path):
    """datasets would read the folder's commonest format and silently drop the rest (here the parquet file)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"messages": conv(f"q{i}", "a")} for i in range(5)])
    write_jsonl(folder / "train-2.jsonl", [{"messages": conv(f"r{i}", "a")} for i in range(5)])
    write_jsonl(folder / "validation.jsonl", [{"messages": conv(f"v{i}", "a")} for i in range(3)])
    datasets.Dataset.from_list([{"prompt": f"p{i}", "completion": "c"} for i in range(4)]).to_parquet(
        str(folder / "train-3.parquet"))
    mixed = r"folder .*mixed mixes file formats \['json', 'parquet'\]; keep one format per source"
    with pytest.raises(ValueError, match=mixed):
        load_sft(folder, "train", tok, block_size=64)
    with pytest.raises(ValueError, match=mixed):
        load_preferences(folder, "train", tok, block_size=64)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "train.txt").write_text("some text")
    with pytest.raises(ValueError, match=r"texts: unsupported file type '\.txt' for records"):
        load_sft(texts, "train", tok, block_size=64)


def test_truncation_drops_and_counts(tok, tmp_path):
    short, long_ = conv("What is 1+1?", "2"), conv("Reverse: " + " ".join("abcdefghij" * 4), "j i h")
    n_prompt_long = len(render_prompt(long_[:1], tok))
    block = n_prompt_long - 2  # the long prompt alone overflows: its answer is cut away
    assert len(render(short, tok)[0]) - 1 <= block
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": short}] * 30 + [{"messages": long_}] * 10)
    records, _ = load_records(path, "train", "sft")
    n_long = sum(r["messages"] == long_ for _, r in records)
    ex, stats = load_sft(path, "train", tok, block_size=block)
    assert stats["n_dropped"] == n_long > 0 and len(ex) == stats["n_records"] - n_long
    assert all(len(e.input_ids) <= block for e in ex)
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"messages": long_}] * 5)
    with pytest.raises(ValueError, match=r"no SFT examples left .*long\.jsonl.*block_size"):
        load_sft(only_long, "train", tok, block_size=block)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_validation_prompts_leave_out_records_dropped_for_length(tok, tmp_path, kind):
    """A validation record dropped for length is not among the prompts scored for accuracy (or sampled), and
    neither is a kept one whose prompt fills the whole context (generate() would cut it to its last half)."""
    edge_q, long_q = "Sort: 5 3 9 1 7 2 8 4 6", "Reverse: " + " ".join("abcdefghij" * 4)
    short = [(f"What is {i}+1?", str(i + 1)) for i in range(3)]
    block = len(render_prompt([{"role": "user", "content": edge_q}], tok))  # the edge prompt fills the context
    assert len(render_prompt([{"role": "user", "content": long_q}], tok)) > block + 1  # nothing of it is supervised
    assert all(len(render_prompt([{"role": "user", "content": q}], tok)) < block for q, _ in short)
    qa = [short[0], (long_q, "j i h"), short[1], (edge_q, "1 2 3 4 5 6 7 8 9"), short[2]]
    if kind == "sft":
        records, load = [{"messages": conv(q, a)} for q, a in qa], load_sft
    else:
        records, load = [{"prompt": q, "chosen": a, "rejected": a + " 0"} for q, a in qa], load_preferences
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", records[:1] * 4)
    write_jsonl(tmp_path / "data" / "validation.jsonl", records)
    _, stats = load(tmp_path / "data", "validation", tok, block_size=block)
    assert stats["n_dropped"] == 1 and stats["kept"] == [0, 2, 3, 4]  # the edge record keeps a supervised token
    cfg = Config()
    cfg.data.source = str(tmp_path / "data")
    items = chat_eval_items(cfg, kind, 100, tok, block, stats["kept"])
    assert items == [([{"role": "user", "content": q}], a) for q, a in short]
    assert chat_eval_items(cfg, kind, 2, tok, block, stats["kept"]) == items[:2]


# --- preference loading -------------------------------------------------------------------------------------------


def test_load_preferences_masks_completion_only(tok, tmp_path):
    prompt = conv("What is 1+1?", "2") + [{"role": "user", "content": "And 2+2?"}]  # an assistant turn in the prompt
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}
    path = write_jsonl(tmp_path / "p.jsonl", [record] * 3)
    (ex,), stats = load_preferences(path, "validation", tok, block_size=64)
    p_ids = render_prompt(prompt, tok)
    for side, answer in (("chosen", "4"), ("rejected", "5")):
        ids, labels = getattr(ex, f"{side}_input_ids"), getattr(ex, f"{side}_labels")
        assert ids == p_ids + tok.encode(answer)  # the final <|end|> is only a label
        assert labels == [IGNORE_INDEX] * (len(p_ids) - 1) + tok.encode(answer) + [END_ID]
    assert stats["n_examples"] == 1


def test_load_preferences_bad_records(tok, tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    for missing in ("prompt", "chosen", "rejected"):
        bad = {k: v for k, v in good.items() if k != missing}
        path = write_jsonl(tmp_path / f"no_{missing}.jsonl", [good] * 4 + [bad] + [good] * 40)
        with pytest.raises(ValueError, match=rf"record 4 of .*no_{missing}\.jsonl.*missing \['{missing}'\]"):
            load_preferences(path, "train", tok, block_size=64)
    path = write_jsonl(tmp_path / "user.jsonl", [good, {**good, "chosen": [{"role": "user", "content": "x"}]}] * 20)
    with pytest.raises(ValueError, match=r"record 1 of .*user\.jsonl: 'chosen' has no assistant message"):
        load_preferences(path, "train", tok, block_size=64)
    with pytest.raises(ValueError, match="no preference pairs left"):
        load_preferences("synthetic", "train", tok, block_size=3, n_synthetic=8)


# --- batchers -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_examples(tok):
    return load_sft("synthetic", "train", tok, block_size=48, n_synthetic=37)[0]


def test_sft_batch_padding_never_supervised(sft_examples):
    b = SFTBatcher(sft_examples, batch_size=5, seed=0).next_batch()
    assert set(b) == {"input_ids", "labels"} and b["input_ids"].dtype == b["labels"].dtype == torch.long
    T = b["input_ids"].shape[1]
    rows = []  # the example in each row: the one whose ids start the row, followed by padding only
    for ids in b["input_ids"].tolist():
        (ex,) = [e for e in sft_examples if ids == e.input_ids + [PAD_ID] * (T - len(e.input_ids))]
        rows.append(ex)
    assert len({tuple(e.input_ids) for e in rows}) == 5  # five different examples (37 in the epoch)
    assert T == max(len(e.input_ids) for e in rows)  # padded to the batch's longest example, no further
    for ex, labels in zip(rows, b["labels"].tolist(), strict=True):  # the example's labels, padding ignored
        assert labels == ex.labels + [IGNORE_INDEX] * (T - len(ex.labels))
    fixed = SFTBatcher(sft_examples, batch_size=2, block_size=48, pad_to_block=True).next_batch()
    assert fixed["input_ids"].shape == (2, 48)


def test_packed_rows_never_supervise_across_boundaries(sft_examples):
    block = 48
    batcher = SFTBatcher(sft_examples, batch_size=4, seed=1, pack=True, block_size=block)
    by_ids = {tuple(e.input_ids): e.labels for e in sft_examples}
    n_docs = 0
    for _ in range(6):  # several steps, crossing epochs
        b = batcher.next_batch()
        assert set(b) == {"input_ids", "labels", "positions", "doc_ids"}
        assert all(t.shape == (4, block) for t in b.values())
        for row in range(4):
            ids, labels, pos, doc = (b[k][row].tolist() for k in ("input_ids", "labels", "positions", "doc_ids"))
            starts = [t for t in range(block) if t == 0 or doc[t] != doc[t - 1]]
            assert doc[0] == 0 and len(set(doc)) == len(starts)  # each doc id is one contiguous segment
            for s, e in zip(starts, starts[1:] + [block], strict=True):
                assert pos[s:e] == list(range(e - s))  # positions restart at every example
                if ids[s] == PAD_ID:  # the padding tail: its own doc id, nothing supervised
                    assert e == block and set(ids[s:e]) == {PAD_ID} and set(labels[s:e]) == {IGNORE_INDEX}
                    continue
                n_docs += 1
                assert by_ids[tuple(ids[s:e])] == labels[s:e]  # a whole example with its own labels
                # the label at an example's last position is its own final token, never the next example's first
                assert labels[e - 1] in (END_ID, IGNORE_INDEX)
                if e < block and ids[e] != PAD_ID:
                    assert ids[e] == USER_ID and labels[e - 1] != ids[e]
            for t in range(block - 1):  # inside a doc, a supervised label is the next input token
                if labels[t] != IGNORE_INDEX and doc[t] == doc[t + 1]:
                    assert labels[t] == ids[t + 1]
    assert n_docs > 4 * 6  # rows really hold several examples


def test_packing_hand_built_row():
    a = SFTExample([USER_ID, 10, END_ID, ASSISTANT_ID], [-100, -100, -100, 20])
    b = SFTExample([USER_ID, 11, 12, END_ID, ASSISTANT_ID, 21], [-100, -100, -100, -100, 21, END_ID])
    batcher = SFTBatcher([a, b], batch_size=1, seed=0, pack=True, block_size=12, shuffle=False)
    out = batcher.next_batch()
    assert out["input_ids"][0].tolist() == a.input_ids + b.input_ids + [PAD_ID] * 2
    assert out["labels"][0].tolist() == a.labels + b.labels + [-100, -100]
    assert out["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1]
    assert out["doc_ids"][0].tolist() == [0] * 4 + [1] * 6 + [2] * 2
    with pytest.raises(ValueError, match="block_size"):
        SFTBatcher([a, b], batch_size=1, pack=True, block_size=5)


def _batches(batcher, n):
    return [batcher.next_batch() for _ in range(n)]


def _same(xs, ys):
    return len(xs) == len(ys) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                      for x, y in zip(xs, ys, strict=True))


@pytest.mark.parametrize("pack", [False, True])
def test_sft_resume_exact_and_epochs_reshuffled(sft_examples, pack):
    make = lambda: SFTBatcher(sft_examples, batch_size=3, seed=4, pack=pack, block_size=48)  # noqa: E731
    ref = _batches(make(), 30)  # 37 examples, 3 per step: crosses several epoch boundaries mid-batch
    first = make()
    _batches(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON/checkpoint round trip
    resumed = make()
    resumed.load_state_dict(state)
    assert _same(_batches(resumed, 13), ref[17:])
    assert first.epoch > 1
    other = SFTBatcher(sft_examples, batch_size=3, seed=5, pack=pack, block_size=48)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_epochs_are_reshuffled_permutations(sft_examples):
    n = len(sft_examples)
    epoch0, epoch1 = _batches(SFTBatcher(sft_examples, batch_size=n, seed=3), 2)  # one batch == one epoch
    rows0, rows1 = (sorted(map(tuple, b["input_ids"].tolist())) for b in (epoch0, epoch1))
    assert rows0 == rows1 and len(set(rows0)) == n  # every example exactly once per epoch ...
    assert not torch.equal(epoch0["input_ids"], epoch1["input_ids"])  # ... in a new order
    in_order = SFTBatcher(sft_examples, batch_size=n, seed=3, shuffle=False).next_batch()
    assert [r[: len(e.input_ids)] for r, e in zip(in_order["input_ids"].tolist(), sft_examples, strict=True)] == [
        e.input_ids for e in sft_examples]


@pytest.mark.parametrize("pack", [False, True])
def test_sft_rank_slices_reassemble_single_process_batch(sft_examples, pack):
    world, B = 3, 2
    single = SFTBatcher(sft_examples, batch_size=B * world, seed=9, pack=pack, block_size=48)
    ranks = [SFTBatcher(sft_examples, batch_size=B, seed=9, rank=r, world_size=world, pack=pack, block_size=48)
             for r in range(world)]
    for step in range(8):
        want = single.next_batch()
        got = [r.next_batch() for r in ranks]
        for k in want:
            assert torch.equal(torch.cat([g[k] for g in got]), want[k])
        if not pack and step < 6:  # inside epoch 0 (37 examples, 6 per step) the ranks see different examples
            rows = {tuple(row) for g in got for row in g["input_ids"].tolist()}
            assert len(rows) == B * world
    with pytest.raises(ValueError, match="rank"):
        SFTBatcher(sft_examples, batch_size=2, rank=3, world_size=3)


def test_preference_batcher(tok):
    pairs, _ = load_preferences("synthetic", "train", tok, block_size=48, n_synthetic=23)
    world, B = 2, 3
    single = PreferenceBatcher(pairs, batch_size=B * world, seed=2)
    ranks = [PreferenceBatcher(pairs, batch_size=B, seed=2, rank=r, world_size=world) for r in range(world)]
    seen = []
    for _ in range(5):
        want = single.next_batch()
        assert set(want) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "index"}
        assert want["chosen_input_ids"].shape == want["rejected_input_ids"].shape  # one T for [chosen; rejected]
        got = [r.next_batch() for r in ranks]
        for k in want:
            assert torch.equal(torch.cat([g[k] for g in got]), want[k])
        idx = want["index"].tolist()
        seen += idx
        for row, i in enumerate(idx):  # index points at the pair in the row; padding is never supervised
            for side in ("chosen", "rejected"):
                ids, labels = getattr(pairs[i], f"{side}_input_ids"), getattr(pairs[i], f"{side}_labels")
                assert want[f"{side}_input_ids"][row, : len(ids)].tolist() == ids
                T = want[f"{side}_labels"].shape[1]
                assert want[f"{side}_labels"][row].tolist() == labels + [IGNORE_INDEX] * (T - len(labels))
                assert (want[f"{side}_input_ids"][row, len(ids):] == PAD_ID).all()
    assert sorted(seen[:23]) == list(range(23))  # the first epoch visits every pair once
    # exact resume
    a = PreferenceBatcher(pairs, batch_size=4, seed=1)
    ref = _batches(a, 9)
    b = PreferenceBatcher(pairs, batch_size=4, seed=1)
    _batches(b, 4)
    c = PreferenceBatcher(pairs, batch_size=4, seed=1)
    c.load_state_dict(b.state_dict())
    assert _same(_batches(c, 5), ref[4:])
