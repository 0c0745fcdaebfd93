"""The reward model (--stage rm): its losses by hand, the score head's independence from padding and batch
composition, its data (pairs with margins, rated completions, the built-in partial credit), real train.py runs."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

import train
from data.reward import RatedCompletion, RewardBatcher, RewardPair, load_reward_data
from data.synthetic import make_ratings, partial_credit
from data.tokenizer import END_ID, PAD_ID
from model import GPT, GPTConfig, RewardModel, bradley_terry_loss, score_mse
from tests.conftest import assert_resumes_exactly
from training import checkpoint
from training.load import load_run


# ----------------------------------------------------------------------------------------------- losses
def test_bradley_terry_loss_by_hand_with_and_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    plain = bradley_terry_loss(chosen, rejected)
    assert plain.tolist() == pytest.approx([-math.log(sig(1.0)), math.log(2.0), -math.log(sig(-2.0))], abs=1e-6)
    margin = torch.tensor([0.5, 1.0, 0.0])  # the chosen score must beat the rejected one by this much
    with_margin = bradley_terry_loss(chosen, rejected, margin)
    assert with_margin.tolist() == pytest.approx([-math.log(sig(0.5)), -math.log(sig(-1.0)),
                                                  -math.log(sig(-2.0))], abs=1e-6)
    assert with_margin.dtype == torch.float32


def test_score_mse_by_hand():
    assert score_mse(torch.tensor([1.0, -0.5]), torch.tensor([0.0, 1.5])).tolist() == pytest.approx([1.0, 4.0])


# ----------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_score_ignores_right_padding_and_batch_composition(arch):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, arch=arch, bias=arch == "gpt2")
    rm = RewardModel(cfg).eval()
    short = torch.tensor([5, 9, 17, 3, END_ID])
    longer = [torch.randint(8, 64, (n,)) for n in (11, 20)]
    alone = rm.scores(short[None], torch.tensor([4]))
    batch = torch.full((3, 20), PAD_ID)
    batch[0, :5] = short
    for row, seq in enumerate(longer, start=1):
        batch[row, : len(seq)] = seq
    together = rm.scores(batch, torch.tensor([4, 10, 19]))
    assert together.shape == (3,) and together.dtype == torch.float32
    assert together[0].item() == pytest.approx(alone.item(), abs=1e-6)
    # the score is the head on the final normed hidden state at the end position, nothing else
    h = rm.hidden_states(short[None])[0, 4]
    assert alone.item() == pytest.approx((h @ rm.score.weight[0]).item(), abs=1e-6)
    # the forward of the wrapped model (what DDP/FSDP call) gives the same scores; without end positions, logits
    assert torch.equal(rm(batch, end_positions=torch.tensor([4, 10, 19])), together)
    assert rm(batch).shape == (3, 20, 64)


def test_reward_model_loads_a_gpt_state_and_keeps_its_logits():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    gpt = GPT(cfg).eval()
    rm = RewardModel(cfg).eval()
    missing, unexpected = rm.load_state_dict(gpt.state_dict(), strict=False)
    assert missing == ["score.weight"] and unexpected == []
    idx = torch.randint(0, 64, (2, 7))
    assert torch.equal(rm(idx), gpt(idx))


# ----------------------------------------------------------------------------------------------- data


def test_partial_credit_by_hand():
    assert partial_credit("sort", "7 7 19 42", "7 7 19 42") == 1.0
    assert partial_credit("sort", "7 19 7 42", "7 7 19 42") == 0.5  # positions 0 and 3 right
    assert partial_credit("reverse", "c b", "c b a") == pytest.approx(2 / 3)  # a missing element is a wrong position
    assert partial_credit("reverse", "a b c", "c b a") == pytest.approx(1 / 3)
    assert partial_credit("add", "433", "432") == 0.5
    assert partial_credit("add", "422", "432") == pytest.approx(1 / 11)
    assert partial_credit("count", " 3 ", "3") == 1.0
    assert partial_credit("count", "three", "3") == 0.0


def test_builtin_ratings_are_seeded_and_scored_by_partial_credit():
    a, b = make_ratings(40, seed=3), make_ratings(40, seed=3)
    assert a == b and a != make_ratings(40, seed=4)
    scores = {r["score"] for r in a}
    assert 1.0 in scores and len(scores) > 3  # right answers and a spread of partial credit
    for r in a:  # the score is the credit of the given answer against the task's right one
        prompt = r["prompt"][0]["content"]
        if r["task"] == "sort":
            ref = " ".join(map(str, sorted(int(x) for x in prompt.split()[1:])))
            assert r["score"] == partial_credit("sort", r["completion"][0]["content"], ref)


@pytest.fixture(scope="module")
def tok():
    from data.tokenizer import train_tokenizer

    text = "What is the answer? yes no good bad apple rock Rate: " * 50
    return train_tokenizer([text], vocab_size=300)


def write_jsonl(path, records, val_records=None):
    """A folder source `path` (named like a file, to read in messages) with train.jsonl and validation.jsonl."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    for split, recs in (("train", records), ("validation", val_records or records)):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def test_pairs_with_margins_and_message_lists_end_at_the_closing_end(tmp_path, tok):
    f = write_jsonl(tmp_path / "pairs", [
        {"prompt": "What is the answer?", "chosen": "yes", "rejected": "no", "margin": 1.5},
        {"prompt": [{"role": "user", "content": "good?"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad bad"}]},
    ])
    examples, stats = load_reward_data("pairs", f, "train", tok, 64)
    assert stats["n_examples"] == 2 and [e.margin for e in examples] == [1.5, 0.0]
    batch = RewardBatcher(examples, 2, shuffle=False).next_batch()
    for side in ("chosen", "rejected"):
        ids, end = batch[f"{side}_input_ids"], batch[f"{side}_end"]
        assert (ids[torch.arange(2), end] == END_ID).all()
        assert (ids[:, :][torch.arange(ids.shape[1])[None] > end[:, None]] == PAD_ID).all()
    assert batch["margin"].tolist() == [1.5, 0.0]


def test_a_pair_too_long_for_its_end_token_is_dropped_and_counted(tmp_path, tok):
    f = write_jsonl(tmp_path / "pairs", [{"prompt": "yes " * 80, "chosen": "yes", "rejected": "no"},
                                               {"prompt": "yes", "chosen": "yes", "rejected": "no"}])
    examples, stats = load_reward_data("pairs", f, "train", tok, 16)
    assert stats["n_dropped"] == 1 and stats["kept"] == [1] and isinstance(examples[0], RewardPair)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "completion": "b"}, "needs a numeric 'score'; it is missing"),
    ({"prompt": "a", "completion": "b", "score": "high"}, "'score' must be a finite number, got 'high'"),
    ({"prompt": "a", "completion": "b", "score": True}, "'score' must be a finite number, got True"),
])
def test_a_bad_score_names_the_record_and_the_file(tmp_path, tok, record, message):
    f = write_jsonl(tmp_path / "rated", [{"prompt": "a", "completion": "b", "score": 0.5}, record])
    with pytest.raises(ValueError, match=r"record 1 of .*rated/train\.jsonl: ") as e:
        load_reward_data("ratings", f, "train", tok, 64)
    assert message in str(e.value)


def test_a_bad_margin_is_refused(tmp_path, tok):
    f = write_jsonl(tmp_path / "pairs", [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}])
    with pytest.raises(ValueError, match=r"record 0 of .*pairs/train\.jsonl: 'margin' must be a finite number"):
        load_reward_data("pairs", f, "train", tok, 64)


def test_ratings_load_and_batch(tmp_path, tok):
    f = write_jsonl(tmp_path / "rated", [{"prompt": "a", "completion": "good", "score": 1},
                                               {"prompt": "a", "completion": [{"role": "assistant", "content": "bad"}],
                                                "score": -0.5}])
    examples, _ = load_reward_data("ratings", f, "train", tok, 64)
    assert isinstance(examples[0], RatedCompletion) and [e.score for e in examples] == [1.0, -0.5]
    batch = RewardBatcher(examples, 2, shuffle=False).next_batch()
    assert (batch["input_ids"][torch.arange(2), batch["end"]] == END_ID).all()
    assert batch["score"].tolist() == [1.0, -0.5]


# ----------------------------------------------------------------------------------------------- train.py --stage rm


def load_script(name):
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gptrain_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate = load_script("evaluate")
QUIET = ["--log.interval=1", "--log.health_interval=0", "--log.hist_interval=0", "--log.tensorboard=false",
         "--train.peak_flops=1e11", "--eval.sample_interval=0"]
GOOD, BAD = ["apple", "pear", "plum", "fig"], ["rock", "sand", "iron", "clay"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


def rm_run(out, init, *args):
    return train.main(["--stage", "rm", "--out", str(out), *(["--init-from", str(init)] if init else []), *QUIET,
                       *args])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def series(out, key):
    return {m["step"]: m[key] for m in metrics(out) if key in m}


def toy(n, seed):
    """Separable toy data: a prompt of two random words; a fruit is always the better answer than a mineral."""
    rng = random.Random(seed)
    words = GOOD + BAD
    return [{"prompt": f"{rng.choice(words)} {rng.choice(words)}", "good": rng.choice(GOOD), "bad": rng.choice(BAD)}
            for _ in range(n)]


def test_rm_needs_init_from(tmp_path):
    with pytest.raises(ValueError, match="--stage rm fine-tunes a checkpoint: give --init-from"):
        train.main(["--stage", "rm", "--out", str(tmp_path / "rm")])
    assert not (tmp_path / "rm").exists()


def test_rm_on_builtin_pairs_logs_its_metrics_and_saves_a_reward_model(tmp_path, tiny_run):
    out = tmp_path / "rm"
    rm_run(out, tiny_run, "--train.max_steps=4", "--eval.interval=2", "--data.synthetic_train=64",
           "--data.synthetic_val=16", "--train.batch_size=8")
    for key in ("train/loss", "train/accuracy", "train/margin"):
        assert sorted(series(out, key)) == [1, 2, 3, 4], key
    for key in ("val/loss", "val/accuracy", "val/margin", "val/accuracy/add"):
        assert sorted(series(out, key)) == [0, 2, 4], key
    ck = checkpoint.load(out)
    assert ck["stage"] == "rm" and ck["model"]["score.weight"].shape == (1, 64)
    run = load_run(out)
    assert isinstance(run.model, RewardModel)
    assert torch.equal(run.model.score.weight, ck["model"]["score.weight"])
    # the head started fresh, the transformer from the starting run
    start = checkpoint.load(tiny_run)
    assert "score.weight" not in start["model"]
    # evaluate.py scores the same held-out pairs as the final validation
    result = evaluate.main([str(out), "--device", "cpu", "--json", str(tmp_path / "eval.json")])
    assert result["pairs"] == 16 and json.loads((tmp_path / "eval.json").read_text())["pairs"] == 16
    assert result["preference_accuracy"] == pytest.approx(series(out, "val/accuracy")[4], abs=1e-6)
    assert result["reward_margin"] == pytest.approx(series(out, "val/margin")[4], abs=1e-5)
    assert result["preference_loss"] == pytest.approx(series(out, "val/loss")[4], abs=1e-5)
    with pytest.raises(ValueError, match="--samples-per-prompt: .* is a reward model"):  # it writes no replies
        evaluate.main([str(out), "--device", "cpu", "--samples-per-prompt", "2"])
    # a policy stage refuses to start from it, before writing anything
    with pytest.raises(ValueError, match="is a reward model .* --stage sft trains a policy"):
        train.main(["--stage", "sft", "--init-from", str(out), "--out", str(tmp_path / "sft"), *QUIET])
    assert not (tmp_path / "sft").exists()


def test_rm_resumes_exactly(tmp_path, tiny_run):
    args = ["--train.max_steps=4", "--eval.interval=0", "--data.synthetic_train=32", "--data.synthetic_val=4",
            "--train.batch_size=4", "--train.precision=fp32"]
    whole = assert_resumes_exactly(lambda out, *a: rm_run(out, tiny_run, *a), tmp_path, args, stop_after=2)
    assert checkpoint.load(whole)["step"] == 4


def test_rm_learns_a_separable_toy_from_pairs_and_from_ratings(tmp_path, tiny_run):
    pairs = write_jsonl(tmp_path / "pairs", [{"prompt": r["prompt"], "chosen": r["good"], "rejected": r["bad"]}
                                             for r in toy(256, 0)],
                        [{"prompt": r["prompt"], "chosen": r["good"], "rejected": r["bad"]} for r in toy(32, 1)])
    out = tmp_path / "rm-pairs"
    rm_run(out, tiny_run, "--data", str(pairs), "--train.max_steps=30", "--eval.interval=30",
           "--train.batch_size=16", "--train.lr=1e-3")
    acc, loss = series(out, "val/accuracy"), series(out, "val/loss")
    assert acc[30] == 1.0 and loss[30] < 0.5 * loss[0], (acc, loss)

    def rated(rows):
        return [x for r in rows for x in ({"prompt": r["prompt"], "completion": r["good"], "score": 1.0},
                                          {"prompt": r["prompt"], "completion": r["bad"], "score": 0.0})]

    ratings = write_jsonl(tmp_path / "ratings", rated(toy(128, 2)), rated(toy(16, 3)))
    out = tmp_path / "rm-ratings"
    rm_run(out, tiny_run, "--data", str(ratings), "--rm.data=ratings", "--train.max_steps=60",
           "--eval.interval=60", "--train.batch_size=16", "--train.lr=1e-3")
    assert sorted(series(out, "train/mse")) == list(range(1, 61)) and "train/accuracy" not in metrics(out)[-1]
    mse = series(out, "val/mse")
    assert series(out, "val/loss") == mse and mse[60] < 0.05 < 0.2 < mse[0], mse  # 0.25: the scores' variance
    assert evaluate.main([str(out), "--device", "cpu"])["reward_mse"] == pytest.approx(mse[60], abs=1e-6)


# ----------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_export_as_sequence_classifier_scores_as_the_native_model(tmp_path, tiny_run, arch):
    from tests.conftest import optional_import
    from training.load import save_run

    transformers = optional_import("transformers")
    export_hf = load_script("export_hf")
    tok = load_run(tiny_run).tok
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32, arch=arch,
                    bias=arch == "gpt2")
    rm = RewardModel(cfg).eval()
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 1.0)  # scores well away from 0, so a wrong read position shows
    run_dir = save_run(tmp_path / "rm", rm.state_dict(), cfg, tok, stage="rm")
    folder = export_hf.export(run_dir, tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(hf).__name__ == {"modern": "LlamaForSequenceClassification",
                                 "gpt2": "GPT2ForSequenceClassification"}[arch]
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD_ID
    # a batch of pairs as the RM stage pads them: right-padded with <|pad|>, each row ending at its <|end|>
    examples, _ = load_reward_data("pairs", "synthetic", "val", tok, 32, n_synthetic=6)
    batch = RewardBatcher(examples, 6, shuffle=False).next_batch()
    ids, ends = batch["chosen_input_ids"], batch["chosen_end"]
    assert (ids == PAD_ID).any()
    with torch.no_grad():
        ours, theirs = rm.scores(ids, ends), hf(ids).logits[:, 0]
    assert ours.abs().min() > 1e-3 and torch.allclose(theirs, ours, atol=1e-5), (theirs, ours)


def test_export_whose_scores_differ_writes_nothing(tmp_path, tiny_run, monkeypatch):
    from tests.conftest import optional_import
    from training.load import save_run

    optional_import("transformers")
    export_hf = load_script("export_hf")
    tok = load_run(tiny_run).tok
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    run_dir = save_run(tmp_path / "rm", RewardModel(cfg).state_dict(), cfg, tok, stage="rm")
    to_hf = export_hf.to_hf_model

    def wrong_head(model):  # the classifier's head off by a little: the parity check must catch it
        hf = to_hf(model)
        with torch.no_grad():
            hf.score.weight.add_(0.1)
        return hf

    monkeypatch.setattr(export_hf, "to_hf_model", wrong_head)
    with pytest.raises(RuntimeError, match="scores differ"):
        export_hf.export(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


# ----------------------------------------------------------------------------------------------- policy pairs
def test_policy_pairs_are_the_policys_own_wrong_answers_against_the_reference(tmp_path, tiny_run):
    """scripts/policy_pairs.py: every policy pair's rejected side is one of the run's samples on that prompt (redone
    here with the same keys) that fails the checker, its chosen side the reference; built-in pairs are added; the
    file is reproducible, loads as RM pairs, and holds no validation prompt."""
    from data.chat import render_prompt
    from data.synthetic import answer_matches, make_sft, split_of
    from model.generation import generate_rollouts

    policy_pairs = load_script("policy_pairs")
    out = policy_pairs.main([str(tiny_run), "--out", str(tmp_path / "p.jsonl"), "--prompts", "6", "--samples", "3",
                             "--builtin", "5", "--max-new-tokens", "8", "--seed", "3"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["source"] == "builtin" for r in records) == 5
    policy = [r for r in records if r["source"] == "policy"]
    run = load_run(tiny_run, "cpu")
    wanted = []  # the samples again, by hand: each prompt's distinct non-empty wrong answers
    for i, conv in enumerate(make_sft(6, 3, "train")):
        keys = torch.tensor([policy_pairs.sample_key(3, i, s) for s in range(3)])
        ro = generate_rollouts(run.model.eval(), [render_prompt(conv["messages"][:1], run.tok)] * 3, 8, 1.0, keys,
                               END_ID, PAD_ID)
        texts = []
        for s in range(3):
            ids = ro.input_ids[s, ro.prompt_len:][ro.completion_mask[s]].tolist()
            text = run.tok.decode(ids[:-1] if ids and ids[-1] == END_ID else ids)
            if not answer_matches(text, conv["messages"][1]["content"]) and text.strip() and text not in texts:
                texts.append(text)
        wanted += [(conv["messages"][0]["content"], conv["messages"][1]["content"], t) for t in texts]
    got = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in policy]
    assert len(wanted) > 6 and sorted(got) == sorted(wanted)  # a 150-step pre-trained model is nearly always wrong
    assert all(split_of(r["prompt"][0]["content"]) == "train" for r in records)
    again = policy_pairs.main([str(tiny_run), "--out", str(tmp_path / "q.jsonl"), "--prompts", "6", "--samples", "3",
                               "--builtin", "5", "--max-new-tokens", "8", "--seed", "3"])
    assert again.read_bytes() == out.read_bytes()
    split = [load_reward_data("pairs", out, name, run.tok, 64)[0] for name in ("train", "val")]
    assert sum(map(len, split)) == len(records)  # every record parses as a pair (the file splits as any file)
    for bad, message in [(["--temperature", "0"], "must be > 0"), (["--out", str(tmp_path / "p.json")], "a .jsonl")]:
        argv = [str(tiny_run), "--out", str(tmp_path / "r.jsonl"), *bad]
        with pytest.raises(ValueError, match=message):
            policy_pairs.main(argv)
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "p.json").exists()
