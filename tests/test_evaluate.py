"""scripts/evaluate.py: every figure in the JSON, bits per byte by hand, accuracy that SFT lifts, agreement with
the trainer's own validation, TensorBoard output, torchrun, and clear errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.load import load_run

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gptrain_script_evaluate", ROOT / "scripts" / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)

VAL_TEXT = "\n".join(f"def area_{i}(width, height):\n    return width * height + {i}  # rectangle number {i}\n"
                     for i in range(12))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="module")
def sft_run(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    """tiny_run fine-tuned on the built-in synthetic tasks for 80 steps (about 10 s); (run folder, summary)."""
    from train import main

    out = tmp_path_factory.mktemp("sft") / "run"
    summary = main(["--stage", "sft", "--init-from", str(tiny_run), "--out", str(out), "--train.max_steps=80",
                    "--train.lr=3e-3", "--train.warmup_steps=5", "--data.synthetic_train=1000", "--eval.interval=0",
                    "--log.health_interval=0", "--log.hist_interval=0", "--eval.sample_tokens=8"])
    return out, summary


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_text")
    (root / "train").mkdir()
    (root / "val").mkdir()
    (root / "train" / "a.txt").write_text("x = 1\n" * 50)
    (root / "val" / "b.txt").write_text(VAL_TEXT)
    return root


def run_eval(*argv) -> dict:
    return evaluate.main([str(a) for a in argv] + ["--device", "cpu"])


def test_json_has_every_field(tiny_run, sft_run, small_text, tmp_path):
    run_dir, _ = sft_run
    out = tmp_path / "eval.json"
    result = run_eval(run_dir, "--data", small_text, "--chat-data", "synthetic", "--preference-data", "synthetic",
                      "--max-examples", 24, "--prompt", "What is 2+3?", "--json", out)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("val_loss", "perplexity", "bits_per_byte", "accuracy", "preference_accuracy", "reward_margin",
                "checkpoint", "data", "tokens", "bytes", "logp_accuracy", "logp_margin", "examples", "pairs",
                "reference", "samples", "accuracy_by_task"):
        assert key in saved, key
    assert set(saved["data"]) == {"text", "chat", "preference"}
    assert saved["checkpoint"] == str(Path(load_run(run_dir, "cpu").ckpt["path"]).resolve())
    assert saved["examples"] == saved["pairs"] == 24
    assert saved["perplexity"] == pytest.approx(math.exp(saved["val_loss"]))
    assert saved["reward_margin"] == pytest.approx(saved["chosen_reward"] - saved["rejected_reward"], abs=1e-6)
    assert Path(saved["reference"]).resolve() == Path(load_run(tiny_run, "cpu").ckpt["path"]).resolve()  # init_from
    assert 0 <= saved["preference_accuracy"] <= 1 and 0 <= saved["logp_accuracy"] <= 1
    assert saved["samples"][0]["prompt"] == "What is 2+3?" and "<|" not in saved["samples"][0]["completion"]


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are given: logits (1, T, V), whatever the inputs."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, x):
        return self.logits


def test_bits_per_byte_leaves_out_special_targets_by_hand():
    """Vocabulary (<|endoftext|> 0 bytes, 'a' 1 byte, 'bc' 2 bytes); targets a, <|endoftext|>, bc, ignored, with
    probabilities 1/2, 1/4, 1/8: nats ln 2, ln 4, ln 8. loss averages all three targets: 6 ln 2 / 3 = 2 ln 2. Bits per
    byte leaves the end-of-text target out of both sums: (ln 2 + ln 8) / (ln 2 x 3 bytes) = 4/3 (counting its nats
    would give 6 ln 2 / (3 ln 2) = 2)."""
    from model.losses import IGNORE
    from training.evaluation import lm_figures

    probs = torch.tensor([[[1 / 4, 1 / 2, 1 / 4], [1 / 4, 1 / 2, 1 / 4], [1 / 2, 3 / 8, 1 / 8], [1 / 3, 1 / 3, 1 / 3]]])
    targets = torch.tensor([[1, 0, 2, IGNORE]])
    byte_lengths = torch.tensor([0, 1, 2])
    f = lm_figures(FixedLogits(probs.log()), [(torch.zeros_like(targets), targets)], byte_lengths, nullcontext())
    assert f["tokens"] == 3 and f["bytes"] == 3
    assert f["loss"] == pytest.approx(2 * math.log(2), rel=1e-6)
    assert f["perplexity"] == pytest.approx(4.0, rel=1e-6)
    assert f["bpb"] == pytest.approx(4 / 3, rel=1e-6)


def test_bits_per_byte_by_hand(tiny_run, tmp_path):
    # The same document twice: the token stream is document, end-of-text, document, end-of-text whatever the order,
    # so an end-of-text token sits among the scored targets
    source = tmp_path / "two_docs"
    for split in ("train", "val"):
        (source / split).mkdir(parents=True)
        for name in ("a.txt", "b.txt"):
            (source / split / name).write_text(VAL_TEXT)
    result = run_eval(tiny_run, "--data", source, "--batch-size", 3, "--split", "val")  # the val documents below
    run = load_run(tiny_run, "cpu", "fp32")
    T = run.gcfg.block_size
    ids = (run.tok.encode(VAL_TEXT) + [0]) * 2  # each document and its end-of-text token
    n_blocks = (len(ids) - 1) // T
    assert n_blocks >= 3
    x = torch.tensor([ids[i * T: i * T + T] for i in range(n_blocks)])
    y = torch.tensor([ids[i * T + 1: i * T + T + 1] for i in range(n_blocks)])
    assert (y == 0).sum() == 1
    with torch.no_grad():
        nats = F.cross_entropy(run.model(x).flatten(0, 1), y.flatten(), reduction="none")  # (n_blocks * T,)
    text = y.flatten() != 0  # the end-of-text target is left out of bits per byte, not of the loss
    tokens = y.numel()
    nbytes = sum(len(run.tok.decode([t]).encode("utf-8")) for t in y.flatten().tolist() if t != 0)  # ASCII text
    assert (result["tokens"], result["bytes"]) == (tokens, nbytes)
    assert result["val_loss"] == pytest.approx(nats.sum().item() / tokens, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats[text].sum().item() / (math.log(2) * nbytes), rel=1e-5)
    assert nats[~text].item() > 1e-3 * nats.sum().item()  # large enough that counting it would fail the line above


def test_default_data_is_the_runs_validation_split(tiny_run):
    """Without --data a pre-training run is scored on its own validation split; over the tokens the trainer scored
    last, the figures equal its last validation."""
    last_val = [r for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]
    n = int(last_val[-1]["val/tokens"])
    result = run_eval(tiny_run, "--max-tokens", n)
    assert list(result["data"]) == ["text"]
    assert result["data"]["text"].startswith(f"{load_run(tiny_run, 'cpu').cfg.data.source} (val split")
    assert result["tokens"] == n
    assert result["val_loss"] == pytest.approx(last_val[-1]["val/loss"], rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(last_val[-1]["val/bpb"], rel=1e-5)


def test_sft_lifts_accuracy(tiny_run, sft_run):
    run_dir, summary = sft_run
    before = run_eval(tiny_run, "--chat-data", "synthetic", "--max-examples", 100)
    after = run_eval(run_dir)  # an SFT run's default: its own chat validation data
    assert after["data"] == {"chat": before["data"]["chat"]} and after["examples"] == 200
    after = run_eval(run_dir, "--max-examples", 100)  # the trainer's 100 accuracy examples
    assert after["accuracy"] == summary["val"]["accuracy"]  # the same criterion as the trainer's validation
    assert after["accuracy"] > before["accuracy"], (before, after)
    assert set(after["accuracy_by_task"]) == {"add", "count", "reverse", "sort"}


def test_group_counts_and_figures_by_hand():
    """4 prompts x 3 sampled replies: right, right, right / none / one / two. 6 of 12 replies right
    (sampled_accuracy 0.5), 3 of 4 prompts with a right reply (pass_at_k 0.75), 2 of 4 all right or all wrong
    (all_equal_share 0.5); counts of two halves add up to the whole's."""
    from training.evaluation import group_counts, group_figures

    right = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    counts = group_counts(right)
    assert counts.tolist() == [6, 12, 4, 3, 2]
    assert group_figures(counts) == {"sampled_accuracy": 0.5, "pass_at_k": 0.75, "all_equal_share": 0.5}
    assert torch.equal(group_counts(right[:2]) + group_counts(right[2:]), counts)


def test_sampled_figures_at_temperature_0_are_the_greedy_accuracy(sft_run):
    """Greedy sampling (--samples-temperature 0) gives K copies of the greedy reply: sampled_accuracy and pass_at_k
    equal the greedy accuracy, overall and per task, and every group is all-equal. At temperature 1 the figures
    keep their order (sampled accuracy <= pass@K), are reproducible with the seed, and some group mixes right and
    wrong replies (the samples differ)."""
    run_dir, _ = sft_run
    greedy = run_eval(run_dir, "--max-examples", 40, "--samples-per-prompt", 3, "--samples-temperature", 0)
    assert greedy["accuracy"] > 0  # the comparison is not 0 == 0
    assert greedy["sampled_accuracy"] == greedy["pass_at_k"] == greedy["accuracy"]
    assert greedy["all_equal_share"] == 1.0
    for task, figures in greedy["sampled_by_task"].items():
        assert figures["sampled_accuracy"] == figures["pass_at_k"] == greedy["accuracy_by_task"][task], task
    sampled = run_eval(run_dir, "--max-examples", 40, "--samples-per-prompt", 8)
    assert sampled["samples_per_prompt"] == 8 and sampled["samples_temperature"] == 1.0
    assert 0 < sampled["sampled_accuracy"] <= sampled["pass_at_k"] <= 1
    assert sampled["all_equal_share"] < 1
    again = run_eval(run_dir, "--max-examples", 40, "--samples-per-prompt", 8)
    assert {k: again[k] for k in ("sampled_accuracy", "pass_at_k", "all_equal_share", "sampled_by_task")} == \
        {k: sampled[k] for k in ("sampled_accuracy", "pass_at_k", "all_equal_share", "sampled_by_task")}


def test_judge_counts_by_hand():
    from training.evaluation import judge_counts, judge_figures

    right = [False, True, False, True]
    scores = torch.tensor([0.5, 2.0, 3.0, 1.0])  # the best-scored reply (index 2) is wrong
    # (right, wrong) pairs: (1, 0) 2 > 0.5 yes, (1, 2) 2 > 3 no, (3, 0) 1 > 0.5 yes, (3, 2) no
    assert judge_counts(right, scores).tolist() == [0.0, 2.0, 4.0]
    assert judge_counts(right, torch.tensor([0.0, 5.0, 1.0, 1.0])).tolist() == [1.0, 3.0, 4.0]  # a tie (3, 2) is not ranked
    assert judge_counts([True, True], torch.tensor([1.0, 1.0])).tolist() == [1.0, 0.0, 0.0]  # no mixed pair
    total = judge_counts(right, scores) + judge_counts([True, True], torch.tensor([1.0, 1.0]))
    assert judge_figures(total, 2) == {"best_of_k_accuracy": 0.5, "judge_pair_accuracy": 0.5}
    assert judge_figures(torch.tensor([1.0, 0.0, 0.0]), 1) == {"best_of_k_accuracy": 1.0}  # nothing to rank


def test_judge_ranks_the_sampled_replies_as_recomputed_from_them(sft_run, tmp_path):
    """--judge RM: the figures equal a recomputation from the same sampled replies scored by the reward model
    directly; a judge that is not a reward model is refused, and --judge needs K >= 2."""
    from train import main
    from training.evaluation import judge_counts, judge_figures, sampled_replies
    from training.rewards import RewardModelScorer, Rollouts

    run_dir, _ = sft_run
    rm = tmp_path / "rm"
    main(["--stage", "rm", "--init-from", str(run_dir), "--out", str(rm), "--train.max_steps=20",
          "--eval.interval=0", "--data.synthetic_train=200", "--data.synthetic_val=4", "--train.batch_size=8",
          "--log.tensorboard=false", "--log.health_interval=0", "--log.hist_interval=0"])
    got = run_eval(run_dir, "--max-examples", 24, "--samples-per-prompt", 4, "--judge", rm)
    run = load_run(run_dir, "cpu")
    items, _ = evaluate.chat_items("synthetic", evaluate.parse_args([str(run_dir), "--max-examples", "24"]), run)
    scorer = RewardModelScorer(str(rm), run.tok, run.gcfg.block_size)
    scorer.build(torch.device("cpu"), lambda m: m)
    total = torch.zeros(3, dtype=torch.float64)
    for i, (messages, reference, _) in enumerate(items):
        ids = evaluate.render_prompt(messages, run.tok)
        budget = min(evaluate.reply_budget(run, reference), run.gcfg.block_size - len(ids))
        texts, reply_ids = sampled_replies(run.model, run.tok, ids, 4, 1.0, budget, 1337, i, run.device,
                                           with_ids=True)
        scores = scorer(Rollouts([messages] * 4, texts, reply_ids, {}, [ids] * 4, ["x"] * 4), run.device,
                        torch.autocast("cpu", enabled=False))
        total += judge_counts([evaluate.answer_matches(t, reference) for t in texts], scores)
    expected = judge_figures(total, len(items))
    assert total[2] > 0  # some prompt mixes right and wrong replies: the pair figure is measured
    assert got["judge_pair_accuracy"] == pytest.approx(expected["judge_pair_accuracy"], abs=1e-12)
    assert got["best_of_k_accuracy"] == pytest.approx(expected["best_of_k_accuracy"], abs=1e-12)
    assert all("best_of_k_accuracy" in figures for figures in got["sampled_by_task"].values())
    with pytest.raises(ValueError, match="--judge ranks the sampled replies"):
        run_eval(run_dir, "--samples-per-prompt", 1, "--judge", rm)
    with pytest.raises(ValueError, match=f"--judge {run_dir}: .* is not a reward model"):
        run_eval(run_dir, "--max-examples", 4, "--samples-per-prompt", 2, "--judge", run_dir)
    with pytest.raises(ValueError, match="is a reward model .*: --kl-reference .* needs a policy run"):
        run_eval(run_dir, "--max-examples", 4, "--samples-per-prompt", 2, "--kl-reference", rm)


def test_kl_reference_is_zero_to_itself_and_equals_an_unpadded_recomputation(sft_run, tiny_run):
    """--kl-reference RUN: to the run itself the KL is exactly 0; to the pre-training run it started from, the
    figures equal the exact KL recomputed reply by reply from the same sampled replies, each reply alone (no right
    padding), its position t's distribution read from the logits before token t, summed over the whole vocabulary."""
    from training.evaluation import sampled_replies

    run_dir, _ = sft_run
    itself = run_eval(run_dir, "--max-examples", 12, "--samples-per-prompt", 3, "--kl-reference", run_dir)
    assert itself["kl_to_reference"] == 0.0 and itself["kl_per_token"] == 0.0
    got = run_eval(run_dir, "--max-examples", 12, "--samples-per-prompt", 3, "--kl-reference", tiny_run,
                   "--samples-temperature", 0.8)
    run, base = load_run(run_dir, "cpu"), load_run(tiny_run, "cpu")
    items, _ = evaluate.chat_items("synthetic", evaluate.parse_args([str(run_dir), "--max-examples", "12"]), run)
    nats, tokens, replies = 0.0, 0, 0
    for i, (messages, reference, _) in enumerate(items):
        ids = evaluate.render_prompt(messages, run.tok)
        budget = min(evaluate.reply_budget(run, reference), run.gcfg.block_size - len(ids))
        _, reply_ids = sampled_replies(run.model, run.tok, ids, 3, 0.8, budget, 1337, i, run.device, with_ids=True)
        for reply in reply_ids:
            seq = torch.tensor([ids + reply])
            with torch.no_grad():
                logp = (run.model(seq)[0].double() / 0.8).log_softmax(-1)
                logr = (base.model(seq)[0].double() / 0.8).log_softmax(-1)
            for t in range(len(reply)):  # the distribution of reply token t is read at position len(ids) - 1 + t
                pos = len(ids) - 1 + t
                nats += (logp[pos].exp() * (logp[pos] - logr[pos])).sum().item()
            tokens += len(reply)
            replies += 1
    assert nats > 0 and replies == 3 * len(items)
    assert got["kl_per_token"] == pytest.approx(nats / tokens, rel=1e-4)
    assert got["kl_to_reference"] == pytest.approx(nats / replies, rel=1e-4)
    assert got["kl_reference"] == str(tiny_run)
    assert all("kl_per_token" in figures for figures in got["sampled_by_task"].values())
    with pytest.raises(ValueError, match="--kl-reference measures the KL on sampled replies"):
        run_eval(run_dir, "--max-examples", 4, "--kl-reference", tiny_run)
    with pytest.raises(ValueError, match="--kl-reference measures the KL on sampled replies"):
        run_eval(run_dir, "--samples-per-prompt", 2, "--samples-temperature", 0, "--kl-reference", tiny_run)


def test_samples_per_prompt_needs_chat_data_and_sane_values(tiny_run, sft_run):
    with pytest.raises(ValueError, match="--samples-per-prompt samples replies to chat prompts"):
        run_eval(tiny_run, "--samples-per-prompt", 2)  # a pre-training run measures text by default
    with pytest.raises(ValueError, match="--samples-per-prompt=-1"):
        run_eval(sft_run[0], "--samples-per-prompt", -1)
    with pytest.raises(ValueError, match="--samples-temperature=-0.5"):
        run_eval(sft_run[0], "--samples-per-prompt", 2, "--samples-temperature", -0.5)


def test_tensorboard_writes_eval_scalars(sft_run):
    run_dir, _ = sft_run
    n_events = len(list(run_dir.glob("events.out.tfevents.*")))
    run_eval(run_dir, "--chat-data", "synthetic", "--max-examples", 8, "--tensorboard", "--prompt", "Sort: 3 1 2")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 80 and "eval/accuracy" in last and "eval/accuracy/sort" in last
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == n_events + 1


def test_bad_input_is_a_clear_error(tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        run_eval(tmp_path / "empty", "--json", out)
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        run_eval(tmp_path / "missing", "--json", out)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "2+2?", "answer": "4"}\n' * 5)
    with pytest.raises(ValueError, match=r"fields \['answer', 'question'\]"):
        run_eval(tiny_run, "--data", odd, "--json", out)
    with pytest.raises(ValueError, match="needs 'messages', or 'prompt' and 'completion'"):
        run_eval(tiny_run, "--chat-data", odd, "--json", out)
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"prompt": "2+2?", "completion": "4"}\n' * 5)
    with pytest.raises(ValueError, match=r"missing \['chosen', 'rejected'\]"):
        run_eval(tiny_run, "--preference-data", chats, "--json", out)
    assert not out.exists()


def test_torchrun_figures_equal_single_process(tiny_run, sft_run, small_text, tmp_path):
    """Two processes split the blocks, examples, sampled prompts and pairs; the reduced figures are the
    single-process ones (the sampled replies' noise is keyed by prompt index, not by rank)."""
    args = [str(sft_run[0]), "--data", str(small_text), "--preference-data", "synthetic", "--reference",
            str(tiny_run), "--chat-data", "synthetic", "--samples-per-prompt", 4, "--max-examples", 12,
            "--device", "cpu"]
    args = [str(a) for a in args]
    single = evaluate.main(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "evaluate.py"), *args, "--json", str(tmp_path / "dist.json")]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=120)
    dist = json.loads((tmp_path / "dist.json").read_text())
    assert dist["world_size"] == 2
    for key in ("tokens", "bytes", "pairs", "examples", "accuracy", "accuracy_by_task", "sampled_accuracy",
                "pass_at_k", "all_equal_share", "sampled_by_task"):
        assert dist[key] == single[key], key
    assert 0 < single["sampled_accuracy"] < 1 and single["all_equal_share"] < 1  # not an all-0 comparison
    for key in ("val_loss", "bits_per_byte", "logp_accuracy", "logp_margin", "preference_accuracy"):
        assert dist[key] == pytest.approx(single[key], rel=1e-5, abs=1e-5), key  # sums in another order


def test_chat_prompts_without_room_to_reply_are_not_scored(tiny_run, tmp_path, capsys):
    """A prompt of block_size tokens or more would be cut by generate(): like the trainer's validation, evaluate.py
    leaves it out and says so, instead of scoring a reply to a truncated prompt."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("What is 2+3?", "5"), ("word " * 200, "long"), ("Reverse: a b", "b a"))]
    data = tmp_path / "chat"
    data.mkdir()
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(tiny_run, "--chat-data", data)
    assert result["examples"] == 2
    assert "chat: 1 of 3 prompts not scored: 64 tokens or longer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- multiple choice
def unbatched_logprob(run, context_ids: list[int], choice_ids: list[int]) -> float:
    """The reference: one unpadded forward of the last block_size + 1 tokens, the choice's targets summed."""
    T = run.gcfg.block_size
    ids = (context_ids + choice_ids)[-(T + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(run.model(torch.tensor([ids[:-1]])), dim=-1)[0]  # (len(ids) - 1, V)
    k = len(choice_ids)
    return sum(logp[len(ids) - 1 - k + j, t].item() for j, t in enumerate(choice_ids))


def test_choices_log_likelihoods_and_accuracies_by_hand(sft_run, tmp_path):
    """Every choice's summed log-prob equals an unpadded forward of the ids the conventions give (plain: " " +
    choice, a question's trailing space moved into the continuation; chat: the user turn, <|assistant|>, the choice
    alone), batched 3 rows at a time with a context cut from the left; the accuracies follow from them by hand."""
    from data.chat import render_prompt
    from tests.choice_records import sum_records, write_jsonl

    run_dir, _ = sft_run
    rows = sum_records(12)
    rows[1] = {"context": rows[1]["question"], "choices": rows[1]["choices"], "answer": rows[1]["answer"]}
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    run = load_run(run_dir, "cpu", "fp32")
    tok = run.tok
    for chat in (False, True):
        result = run_eval(run_dir, "--choices", path, "--batch-size", 3, *(["--chat"] if chat else []))
        assert list(result["data"]) == ["choices"] and "val_loss" not in result and "accuracy" not in result
        assert result["data"]["choices"] == f"{path} (12 records, {'chat' if chat else 'plain'} format)"
        hits = [0, 0, 0]
        for row, got in zip(rows, result["mc_loglikelihoods"], strict=True):
            question = row.get("question", row.get("context"))
            want = []
            for choice in row["choices"]:
                if chat:
                    ids = render_prompt([{"role": "user", "content": question}], tok), tok.encode(choice)
                else:
                    q = question.rstrip()  # "What is 1+2? " -> context "What is 1+2?", continuation "  3"
                    whole = tok.encode(q + question[len(q):] + " " + choice)
                    ids = tok.encode(q), whole[len(tok.encode(q)):]
                want.append(unbatched_logprob(run, *ids))
            assert got == pytest.approx(want, abs=1e-4)
            for k, per in enumerate((1, len, lambda c: len(c.encode("utf-8")))):
                scores = [lp / (1 if k == 0 else per(c)) for lp, c in zip(got, row["choices"], strict=True)]
                hits[k] += scores.index(max(scores)) == row["answer"]  # index(): the first of equal scores
        assert [result["mc_accuracy"], result["mc_accuracy_norm"], result["mc_accuracy_bytes"]] == \
            [h / len(rows) for h in hits]
        assert result["mc_records"] == 12
    assert len(tok.encode(rows[-1]["question"])) > run.gcfg.block_size  # the last context was cut from the left


def test_choice_accuracies_normalise_and_break_ties_like_the_harness():
    """Log-probs by hand: summed (ties to the first choice), per character (acc_norm), per UTF-8 byte (acc_bytes)."""
    from data.choices import ChoiceRecord, mc_accuracies

    records = [ChoiceRecord("q", ("a", "b"), 1),  # -2 == -2: a tie goes to choice 0, wrong
               ChoiceRecord("q", ("a", "bbbb"), 1),  # summed picks 0 (-2 > -4); per char 1 (-1 > -2)
               ChoiceRecord("q", ("éé", "abc"), 0)]  # per char picks 1 (-1.5 > -1.67); per byte 0 (-1.25 > -1.67)
    lps = [[-2.0, -2.0], [-2.0, -4.0], [-5.0, -5.0]]
    assert mc_accuracies(records, lps) == {"mc_accuracy": 1 / 3, "mc_accuracy_norm": 1 / 3,
                                           "mc_accuracy_bytes": 2 / 3}


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": [], "answer": 0}', r"record 2 \(line 4\): 'choices' must be a non-empty list"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', r"record 2 \(line 4\): 'answer' must be the index of a "
                                                               r"choice \(0 to 1\), got 2"),
    ('{"question": "q", "choices": ["a", ""], "answer": 0}', r"record 2 \(line 4\): choice 1 must be a non-empty"),
    ('{"question": "q", "choices": ["a", "b"]}', r"record 2 \(line 4\): missing \['answer'\]"),
    ('{"prompt": "q", "choices": ["a"], "answer": 0}', r"record 2 \(line 4\): missing \['question \(or context\)'\]"),
    ('{"question": "q", "choices": ["a"], "answer": 0', r"record 2 \(line 4\): not valid JSON"),
    ('{"question": "q", "choices": ["a"], "answer": true}', r"record 2 \(line 4\): 'answer' must be the index"),
], ids=["no-choices", "answer-out-of-range", "empty-choice", "missing-answer", "missing-question", "not-json",
        "bool-answer"])
def test_bad_choice_records_fail_naming_file_and_record_before_model_work(tmp_path, line, message):
    """The third record (after a blank line) is bad: the error names the file, the record and its line, and comes
    before any model work (the run folder given does not even exist)."""
    good = '{"question": "What is 1+1?", "choices": ["2", "3"], "answer": 0}\n'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + good + "\n" + line + "\n" + good)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        run_eval(tmp_path / "no-such-run", "--choices", path)


def test_chat_tuned_run_without_chat_gets_a_hint(sft_run, tmp_path, capsys):
    from tests.choice_records import sum_records, write_jsonl

    run_dir, _ = sft_run
    path = write_jsonl(tmp_path / "mc.jsonl", sum_records(3))
    run_eval(run_dir, "--choices", path)
    assert "--chat scores them as its reply" in capsys.readouterr().out
    for flag in ("--chat", "--no-chat"):
        run_eval(run_dir, "--choices", path, flag)
        assert "hint:" not in capsys.readouterr().out


def test_choices_under_autocast_say_fp32_gives_the_harness_figures(sft_run, tmp_path, capsys):
    """lm_eval scores the fp32 export in fp32; evaluate.py's auto precision is bf16 autocast on a capable GPU. Scored
    under bf16 (asked for here: on CPU auto is fp32) the choices' log-likelihoods move off the fp32 ones, and a notice
    names --precision fp32; in fp32 there is none."""
    from tests.choice_records import sum_records, write_jsonl

    run_dir, _ = sft_run
    path = write_jsonl(tmp_path / "mc.jsonl", sum_records(2))
    fp32 = run_eval(run_dir, "--choices", path, "--chat", "--precision", "fp32")
    assert "note:" not in capsys.readouterr().out and fp32["precision"] == "fp32"
    bf16 = run_eval(run_dir, "--choices", path, "--chat", "--precision", "bf16")
    assert "note: the choices are scored under bf16 autocast, lm_eval scores the exported model in fp32: " \
           "--precision fp32 gives its log-likelihoods" in capsys.readouterr().out
    apart = max(abs(a - b) for x, y in zip(fp32["mc_loglikelihoods"], bf16["mc_loglikelihoods"], strict=True)
                for a, b in zip(x, y, strict=True))
    assert apart > 1e-4  # beyond the parity tolerance of tests/test_lm_eval.py


# ----------------------------------------------------------------------------------------------- which split
def test_a_source_the_run_did_not_train_on_is_scored_whole(tiny_run, tmp_path):
    """--data on a file the run never saw: scored whole by default (train+val parts, the label says so), not only
    its held-out 1%; --split val and --split train narrow it on purpose."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(VAL_TEXT for _ in range(40)))  # its last 1%: more than one block
    default = run_eval(tiny_run, "--data", held_out)
    parts = {split: run_eval(tiny_run, "--data", held_out, "--split", split) for split in ("train", "val", "all")}
    assert default["data"]["text"] == f"{held_out} (whole (train+val splits); not the run's data)"
    assert parts["val"]["data"]["text"] == f"{held_out} (val split; not the run's data)"
    assert default["tokens"] == parts["all"]["tokens"] == parts["train"]["tokens"] + parts["val"]["tokens"]
    assert parts["val"]["tokens"] > 0 and parts["train"]["tokens"] > 10 * parts["val"]["tokens"]
    assert default["val_loss"] == parts["all"]["val_loss"]


def test_a_foreign_file_whose_last_part_fills_no_block_is_still_scored_whole(tiny_run, tmp_path):
    """A lone file's held-out 1% is usually shorter than a block: scoring the file whole must not require that part
    to fill one by itself (it failed with "the val split ... is too small" before); a file too small for any block
    is refused, naming it."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(VAL_TEXT for _ in range(4)))
    default = run_eval(tiny_run, "--data", held_out)
    train = run_eval(tiny_run, "--data", held_out, "--split", "train")
    assert default["data"]["text"] == f"{held_out} (whole (train+val splits); not the run's data)"
    assert default["tokens"] == train["tokens"] > 0 and default["val_loss"] == train["val_loss"]
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x = 1\n")
    with pytest.raises(ValueError, match=rf"--data {re.escape(str(tiny))} is too small to score: no split holds one block"):
        run_eval(tiny_run, "--data", tiny)


def test_the_runs_own_data_is_its_validation_split_by_hash(tiny_run, corpus_dir, tmp_path):
    """The run's own source (by name, or a prepared folder of the same data hash) is scored on its validation split;
    a prepared folder of other data (a document cap: another hash) is not the run's data and is scored whole."""
    from data.prepare import prepare

    run = load_run(tiny_run, "cpu")
    d = run.cfg.data
    same, capped = tmp_path / "same", tmp_path / "capped"
    for out, max_docs in ((same, d.max_docs), (capped, 15)):
        prepare(str(corpus_dir), run.tok, out, text_column=d.text_column, val_fraction=d.val_fraction,
                max_tokens=d.max_tokens, max_docs=max_docs, chunk_tokens=d.chunk_tokens, workers=1, verbose=False)
    by_name = run_eval(tiny_run, "--data", corpus_dir, "--max-tokens", 2048)
    assert by_name["data"]["text"] == f"{corpus_dir} (val split, first 2048 tokens)"
    assert run_eval(tiny_run, "--data", same, "--max-tokens", 2048)["data"]["text"] == \
        f"{same} (val split, first 2048 tokens)"
    other = run_eval(tiny_run, "--data", capped)
    assert other["data"]["text"] == f"{capped} (whole (train+val splits); not the run's data)"


def test_a_foreign_prepared_folder_of_one_split_is_scored_on_the_split_it_holds(tiny_run, corpus_dir, tmp_path):
    """A prepared folder of other data that holds only a val split (prepared with splits=("val",), as evaluate.py
    prepares a source for --split val) is scored whole by default -- its val split, the label says so -- instead of
    failing on the train split it lacks; --split train or all asks for that split on purpose: an error naming it."""
    from data.prepare import prepare

    run = load_run(tiny_run, "cpu")
    d = run.cfg.data
    only_val = tmp_path / "only_val"
    prepare(str(corpus_dir), run.tok, only_val, splits=("val",), text_column=d.text_column,
            val_fraction=d.val_fraction, max_docs=15, chunk_tokens=d.chunk_tokens, workers=1, verbose=False)
    default = run_eval(tiny_run, "--data", only_val)
    val = run_eval(tiny_run, "--data", only_val, "--split", "val")
    assert default["data"]["text"] == f"{only_val} (whole (val split); not the run's data)"
    assert val["data"]["text"] == f"{only_val} (val split; not the run's data)"
    assert default["tokens"] == val["tokens"] > 0 and default["val_loss"] == val["val_loss"]
    for split in ("train", "all"):
        with pytest.raises(ValueError, match=rf"{only_val} holds no train split \(it holds \['val'\]\)"):
            run_eval(tiny_run, "--data", only_val, "--split", split)
