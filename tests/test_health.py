"""Training health said in words (training/health.py): each watch fed sequences of numbers by hand (when it fires,
how it re-arms), the `[health]` options, and short real runs made to show each warning -- on the console, as
TensorBoard text read back from the event file, counted in the run summary -- and a healthy run of the default
pre-training recipe that raises none."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import statistics
from pathlib import Path

import pytest
import tomllib
import torch

from tests.conftest import TINY_ARGS
from train import main
from training import checkpoint
from training.config import parse_args
from training.health import (
    KINDS,
    ExplodingWatch,
    HealthWatch,
    OverfittingWatch,
    UpdateRatioWatch,
    VanishingWatch,
    lr_scales,
    update_ratios,
)

# The tiny shape of TINY_ARGS without its optimizer settings: with these alone a run follows the default recipe.
TINY_SHAPE = ["--model.vocab_size=384", "--model.n_layer=2", "--model.n_embd=64", "--model.n_head=4",
              "--model.block_size=64", "--data.num_proc=1", "--eval.sample_tokens=4"]


def fired_steps(watch_observe, values) -> list[int]:
    """The 1-based steps at which `watch_observe(step, value)` returned a warning."""
    return [step for step, v in enumerate(values, start=1) if watch_observe(step, v)]


# ----------------------------------------------------------------------------------------------- the watches
def test_exploding_fires_once_per_run_of_steps_above_the_threshold_and_rearms_below_it():
    watch = ExplodingWatch(threshold=10.0, steps=3)
    norms = [11, 12, 9, 11, 11, 11, 11, 11, 10, 20, 20, 20, 20]
    # 11 12 | 9 resets | 11 11 11 -> step 6 | 11 11 still the same episode | 10 is not above: re-armed | 20 x3 -> 12
    assert fired_steps(watch.observe, norms) == [6, 12]
    warning = ExplodingWatch(10.0, 2)
    warning.observe(1, 11.0)
    w = warning.observe(2, 42.5)
    assert w.kind == "exploding" and "above 10 for 2 steps in a row (now 42.5)" in w.message


def test_exploding_skips_fp16_overflows_and_is_off_at_zero_steps_or_without_clipping():
    watch = ExplodingWatch(10.0, 3)
    # an inf norm (a GradScaler-skipped step) neither counts nor resets the run of steps above
    assert fired_steps(watch.observe, [11, math.inf, 11, math.nan, 11]) == [5]
    assert fired_steps(ExplodingWatch(10.0, 0).observe, [1e9] * 50) == []
    h = parse_args(["--train.grad_clip=0"]).health
    assert fired_steps(HealthWatch.from_config(h, grad_clip=0.0).exploding.observe, [1e9] * 50) == []
    assert HealthWatch.from_config(h, grad_clip=0.5).exploding.threshold == 10.0 * 0.5


def test_vanishing_compares_each_group_with_the_largest_and_rearms_when_it_recovers():
    watch = VanishingWatch(ratio=1e-3)
    # the largest norm is block_0's 1.0; the threshold 1e-3: block_2's 2e-4 is below it, the final norm's 0.02 not
    norms = {"block_0": 1.0, "block_1": 0.5, "block_2": 2e-4, "final_norm": 0.02}
    [w] = watch.observe(7, norms)
    assert (w.kind, w.step) == ("vanishing", 7)
    assert w.message == "grad_norm/block_2 is 0.0002, below 0.001 x the largest group's, grad_norm/block_0 (1)"
    assert watch.observe(8, norms) == []  # the same episode
    assert watch.observe(9, {**norms, "block_2": 0.01}) == []  # recovered: re-armed
    assert [w.step for w in watch.observe(10, norms)] == [10]
    # exactly at the threshold is healthy: the largest 2, threshold 0.5 x 2 = 1
    assert VanishingWatch(0.5).observe(1, {"a": 2.0, "b": 1.0, "c": 1.0}) == []
    assert VanishingWatch(0.0).observe(1, {"a": 1.0, "b": 0.0, "c": 1.0}) == []  # 0 = off


def test_vanishing_fires_when_most_groups_collapse_together():
    """The classic vanishing gradient: the embedding and the lower blocks (3 groups of 5) collapse at once. Their
    median is one of them (5e-6), which would hide all three; against the largest (block_3's 0.4, threshold 4e-4)
    each is named, the two live blocks not."""
    norms = {"embedding": 1e-6, "block_0": 2e-6, "block_1": 5e-6, "block_2": 0.3, "block_3": 0.4}
    warnings = VanishingWatch(1e-3).observe(3, norms)
    assert [w.message.split(" is ")[0] for w in warnings] == ["grad_norm/embedding", "grad_norm/block_0",
                                                              "grad_norm/block_1"]
    assert warnings[2].message == "grad_norm/block_1 is 5e-06, below 0.001 x the largest group's, grad_norm/block_3 (0.4)"


def test_update_ratio_band_follows_the_learning_rate_schedule():
    watch = UpdateRatioWatch(low=1e-6, high=0.3)  # a floor set high on purpose; the default's is 1e-8
    # warmup at lr/peak 0.02: the band is [2e-8, 6e-3]. AdamW's first step moves each weight by about its lr: the
    # default peak lr 3e-3 x 0.02 = 6e-5 moves std-0.02 weights by 6e-5 / 0.02 = 3e-3 of their norm: inside
    assert watch.observe(1, {"matrices": 3e-3}, {"matrices": 0.02}) == []
    # the same ratio at the peak lr is inside too; 0.31 at the peak is above
    assert watch.observe(2, {"matrices": 3e-3}, {"matrices": 1.0}) == []
    [w] = watch.observe(3, {"matrices": 0.31}, {"matrices": 1.0})
    assert w.kind == "update_ratio" and w.message.startswith("update_ratio/matrices is 0.31, above the healthy "
                                                             "band [1e-06, 0.3]")
    assert watch.observe(4, {"matrices": 0.5}, {"matrices": 1.0}) == []  # still above: the same episode
    # decay to lr/peak 0.5: 0.15 is the band's top exactly (inside, re-armed); 0.151 is above it
    assert watch.observe(5, {"matrices": 0.15}, {"matrices": 0.5}) == []
    assert [w.step for w in watch.observe(6, {"matrices": 0.151}, {"matrices": 0.5})] == [6]
    # straight from above to below is a new episode; below twice is one
    [w] = watch.observe(7, {"matrices": 9e-8}, {"matrices": 0.1})
    assert "below the healthy band [1e-07, 0.03]" in w.message and "train.lr is too low" in w.message
    assert watch.observe(8, {"matrices": 9e-8}, {"matrices": 0.1}) == []
    # a group at lr 0 (the end of a schedule with min_lr_ratio 0) does not move and is not checked
    assert watch.observe(9, {"matrices": 0.0, "vectors": 0.0}, {"matrices": 0.0, "vectors": 0.0}) == []
    # groups are watched separately; 0 switches a side off
    free = UpdateRatioWatch(low=0.0, high=0.0)
    assert free.observe(1, {"a": 0.0, "b": 1e9}, {"a": 1.0, "b": 1.0}) == []


def test_the_band_scale_is_each_groups_scheduled_lr_over_its_peak():
    """lr_scales names the groups as update_ratios does and reads the schedule's factor off each group (Muon's
    peak 0.01, AdamW's 3e-3: one factor)."""
    from model import GPT, GPTConfig
    from training.optim import build_optimizer, set_lr

    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = build_optimizer(model, parse_args([]).train, "cpu")  # the default recipe: muon
    set_lr(opt, 0.25)
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    assert lr_scales(opt) == {"muon": 0.25, "matrices": 0.25, "vectors": 0.25}
    assert set(update_ratios(opt, before)) == set(lr_scales(opt))


def overfit_run(watch: OverfittingWatch, evaluations) -> list[int]:
    """Feed (train losses of the steps since the last evaluation, val loss) pairs, the i-th evaluation at step
    10 i; the steps of the evaluations that warned."""
    fired = []
    for i, (train_losses, val) in enumerate(evaluations):
        for loss in train_losses:
            watch.observe_train(loss)
        if watch.observe_val(10 * i, val):
            fired.append(10 * i)
    return fired


def test_overfitting_needs_rising_val_loss_while_the_mean_train_loss_falls():
    watch = OverfittingWatch(evals=3)
    evaluations = [([], 6.0),  # the evaluation before training: a baseline only
                   ([5.0, 4.0], 5.0), ([3.0, 3.0], 4.5),  # both fall
                   ([2.8, 2.6], 4.6), ([2.4, 2.2], 4.7), ([2.0, 1.8], 4.8),  # 3 rises, train 3.0 -> 1.9: fires
                   ([1.6, 1.4], 4.9),  # the same episode
                   ([1.2, 1.0], 4.0),  # val falls: re-armed
                   ([0.9, 0.9], 4.1), ([0.8, 0.8], 4.2), ([0.7, 0.7], 4.3)]  # fires again
    assert overfit_run(watch, evaluations) == [50, 100]
    w = OverfittingWatch(2)
    assert overfit_run(w, [([3.0], 5.0), ([2.0], 5.5)]) == []
    w.observe_train(1.0)
    w.observe_train(0.5)
    warning = w.observe_val(20, 6.0)
    assert (warning.kind, warning.step) == ("overfitting", 20)
    assert warning.message.startswith("val/loss has risen 2 evaluations in a row, from 5.0000 at step 0 to "
                                      "6.0000, while the mean train/loss fell from 3.0000 to 0.7500")


def test_a_rise_from_the_step_0_evaluation_counts_its_train_reference_the_first_mean_after_it():
    """Step 0's evaluation has no training before it: a rise may start from it, its training reference the mean
    over the steps up to the next evaluation ((4 + 3) / 2 = 3.5), the latest mean (1.5) compared with that."""
    watch = OverfittingWatch(evals=2)
    assert overfit_run(watch, [([], 5.0), ([4.0, 3.0], 5.2), ([2.0, 1.0], 5.4)]) == [20]
    watch = OverfittingWatch(evals=2)
    for loss, val, step in (([], 5.0, 0), ([4.0, 3.0], 5.2, 10)):
        for x in loss:
            watch.observe_train(x)
        assert watch.observe_val(step, val) is None
    watch.observe_train(2.0)
    watch.observe_train(1.0)
    assert watch.observe_val(20, 5.4).message.startswith(
        "val/loss has risen 2 evaluations in a row, from 5.0000 at step 0 to 5.4000, while the mean train/loss fell "
        "from 3.5000 to 1.5000")
    # the training mean not below the first one (3.5): not overfitting; a fall after step 0 starts afresh
    assert overfit_run(OverfittingWatch(2), [([], 5.0), ([4.0, 3.0], 5.2), ([3.0, 4.0], 5.4)]) == []
    assert overfit_run(OverfittingWatch(2), [([], 5.0), ([4.0, 3.0], 4.0), ([2.0], 4.1), ([1.0], 4.2)]) == [30]


def test_rising_val_loss_with_rising_train_loss_is_not_overfitting():
    watch = OverfittingWatch(evals=2)
    # the rise starts from the evaluation at step 0 (train 3.0); at steps 20 and 30 the train loss has risen too (a
    # diverging run, not overfitting); at step 40 it is below the rise's start, the val loss still rising: it fires
    assert overfit_run(watch, [([3.0], 5.0), ([3.5], 5.5), ([4.0], 6.0), ([4.5], 6.5), ([2.9], 7.0)]) == [40]
    assert overfit_run(OverfittingWatch(0), [([3.0 - i / 10], 5.0 + i) for i in range(10)]) == []


def test_health_options_are_checked_and_named():
    h = parse_args(["--health.explode_factor=4", "--health.vanish_ratio=0.01"]).health
    assert (h.explode_factor, h.explode_steps, h.vanish_ratio, h.overfit_evals, h.ratio_low, h.ratio_high) == (
        4.0, 20, 0.01, 2, 1e-8, 0.3)
    with pytest.raises(ValueError, match=r"health\.ratio_high=1e-09 must exceed health\.ratio_low=1e-08"):
        parse_args(["--health.ratio_high=1e-9"])
    with pytest.raises(ValueError, match=r"health\.vanish_ratio=-1\.0 must be >= 0"):
        parse_args(["--health.vanish_ratio=-1"])
    with pytest.raises(ValueError, match=r"unknown option --health\.explode_step \(did you mean 'health\.explode_steps'"):
        parse_args(["--health.explode_step=3"])


# ----------------------------------------------------------------------------------------------- real runs
def health_texts(run: Path) -> dict[str, list[tuple[int, str]]]:
    """TensorBoard text entries under health/ in the run's event files: tag -> [(step, text)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if tag.startswith("health/")}


def warning_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("health warning")]


def counts(**nonzero) -> dict[str, int]:
    return {kind: nonzero.get(kind, 0) for kind in KINDS}


def assert_said_everywhere(run: Path, summary: dict, out: str, kind: str, n: int) -> list[str]:
    """n warnings of `kind`, and only those: console lines, TensorBoard text (same lines), the run summary."""
    lines = warning_lines(out)
    assert len(lines) == n and all(f"health warning ({kind})" in line for line in lines), lines
    assert summary["health_warnings"] == counts(**{kind: n})
    assert f"health: {n} warning(s): {kind} {n}" in out
    texts = health_texts(run)
    assert list(texts) == [f"health/{kind}/text_summary"], texts
    assert sorted(texts[f"health/{kind}/text_summary"]) == sorted(
        (int(line.split(" at step ")[1].split(":")[0]), f"```\n{line}\n```") for line in lines)
    return lines


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_huge_init_std_explodes(tmp_path, corpus_dir, capsys, one_thread):
    """init std 3 instead of 0.02: pre-clip norms of 40-240 against a clip of 1 (threshold 10) from the first step;
    the warning comes once, at the 20th step in a row, though every one of the 25 is above. The plain model: QK-norm
    (the tiny preset's) bounds the attention logits such an init blows up, and its norms dip below 10 (9.5)."""
    out = tmp_path / "explode"
    summary = main(["--data", str(corpus_dir), "--out", str(out), *TINY_ARGS, "--train.max_steps=25",
                    "--model.init_std=3.0", "--model.qk_norm=false", "--eval.interval=0", "--log.interval=1"])
    norms = [r["train/grad_norm"] for r in metrics(out) if "train/grad_norm" in r]
    assert len(norms) == 25 and min(norms) > 10.0
    [line] = assert_said_everywhere(out, summary, capsys.readouterr().out, "exploding", 1)
    assert line.startswith(f"health warning (exploding) at step 20: the pre-clip gradient norm has stayed above 10 "
                           f"for 20 steps in a row (now {norms[19]:.4g})")


def train_means(rows: list[dict], evals: list[int]) -> dict[int, float]:
    """Each evaluation after the first -> the mean logged train/loss of the steps since the one before (log.interval
    1: every step is logged)."""
    train = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    return {e: statistics.fmean(train[t] for t in range(a + 1, e + 1)) for a, e in itertools.pairwise(evals)}


def test_one_small_file_over_many_epochs_overfits_from_the_step_0_evaluation(tmp_path, tiny_run, corpus_dir, capsys,
                                                                                one_thread):
    """The tiny run trained on for 30 steps on one 4 KB file (colorsys, ~2,200 tokens: two steps an epoch), validated
    every 10 on the usual validation files: val loss rises from the step-0 evaluation on (measured: 4.04, 4.22, 4.46),
    the train loss falls. With the default 2 rises the warning comes at step 20, the rise starting at step 0, its
    train reference the mean loss of steps 1-10 (no training precedes step 0); step 30's final validation does not
    count."""
    corpus = tmp_path / "small"
    (corpus / "train").mkdir(parents=True)
    shutil.copy(corpus_dir / "train" / "colorsys.txt", corpus / "train")
    shutil.copytree(corpus_dir / "val", corpus / "val")
    out = tmp_path / "overfit"
    summary = main(["--init-from", str(tiny_run), "--data", str(corpus), "--out", str(out), *TINY_ARGS,
                    "--train.max_steps=30", "--eval.interval=10", "--log.interval=1", "--log.health_interval=0"])
    rows = metrics(out)
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    means = train_means(rows, [0, 10, 20])
    assert val[0] < val[10] < val[20] and means[20] < means[10]
    [line] = assert_said_everywhere(out, summary, capsys.readouterr().out, "overfitting", 1)
    assert line == (f"health warning (overfitting) at step 20: val/loss has risen 2 evaluations in a row, from "
                    f"{val[0]:.4f} at step 0 to {val[20]:.4f}, while the mean train/loss fell from {means[10]:.4f} "
                    f"to {means[20]:.4f}: the model memorises its training data (more data, fewer steps or dropout)")


def test_sft_on_four_conversations_over_many_epochs_overfits(tmp_path, tiny_run, capsys, one_thread):
    """SFT of the tiny run on 4 conversations (a made-up code word for each number: nothing to generalise), one step an
    epoch for 50 steps, validated every 10 on 16 others: val loss falls while the chat format is learnt, then rises
    as the answers are memorised (measured: 5.05, 3.67, 3.48, 3.99, 4.42, then the final 4.51). The warning comes at
    the first periodic evaluation ending 2 rises in a row with the mean train loss below the rise's start."""
    rng = random.Random(0)
    words = "red blue green apple river stone cloud tiger lamp seven ocean paper".split()

    def conversation(i: int) -> str:
        return json.dumps({"messages": [{"role": "user", "content": f"Code word {i}?"},
                                        {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(4))}]}) + "\n"

    data = tmp_path / "chat"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(conversation(i) for i in range(4)))
    (data / "validation.jsonl").write_text("".join(conversation(i) for i in range(100, 116)))
    out = tmp_path / "sft"
    summary = main(["--stage", "sft", "--init-from", str(tiny_run), "--data", str(data), "--out", str(out),
                    *TINY_ARGS, "--train.batch_size=4", "--train.max_steps=50", "--eval.interval=10",
                    "--log.interval=1", "--log.health_interval=0", "--eval.sample_interval=0"])
    rows = metrics(out)
    evals = [0, 10, 20, 30, 40]  # the periodic evaluations (50's is the final one)
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    means = train_means(rows, evals)
    means[0] = means[10]  # step 0's train reference: the first mean after it
    rise = [i for i in range(2, len(evals)) if val[evals[i - 2]] < val[evals[i - 1]] < val[evals[i]]
            and means[evals[i]] < means[evals[i - 2]]]
    assert rise, val
    at, start = evals[rise[0]], evals[rise[0] - 2]
    [line] = assert_said_everywhere(out, summary, capsys.readouterr().out, "overfitting", 1)
    assert line.startswith(f"health warning (overfitting) at step {at}: val/loss has risen 2 evaluations in a row, from "
                           f"{val[start]:.4f} at step {start} to {val[at]:.4f}, while the mean train/loss fell from "
                           f"{means[start]:.4f} to {means[at]:.4f}")


@pytest.mark.parametrize("lr, side", [(1e-10, "below"), (1.0, "above")])
def test_a_learning_rate_far_off_leaves_the_update_ratio_band(tmp_path, corpus_dir, capsys, one_thread, lr, side):
    """AdamW's first steps move each weight by about lr: at lr 1e-10 the std-0.02 matrices by ~5e-9 of their norm
    (x lr / peak), below the default band [1e-8, 0.3] x lr / peak, the norms (weights of 1) by ~1e-10 (fp32 rounds
    most such changes away: the weights do not move); at lr 1 by ~50 and ~1, above it. Each group warns once in 5
    steps measured every step, naming the logged ratio."""
    out = tmp_path / side
    summary = main(["--data", str(corpus_dir), "--out", str(out), *TINY_ARGS, "--train.max_steps=5",
                    f"--train.lr={lr}", "--log.health_interval=1", "--eval.interval=0", "--log.interval=1"])
    lines = assert_said_everywhere(out, summary, capsys.readouterr().out, "update_ratio", 2)
    first = next(r for r in metrics(out) if "update_ratio/matrices" in r)
    assert first["step"] == 1
    assert sorted(line.split(": ")[1].split(",")[0] for line in lines) == [
        f"update_ratio/{g} is {first[f'update_ratio/{g}']:.3g}" for g in ("matrices", "vectors")]
    assert all(f", {side} the healthy band [" in line for line in lines)
    assert all("x lr / peak lr 0.25)" in line for line in lines)  # step 1 of warmup over 4 (max_steps - 1) steps


def test_a_small_fine_tuning_lr_is_not_called_too_low(tmp_path, corpus_dir, capsys, one_thread):
    """lr 1e-6 (a usual DPO lr on a bigger model) is legitimate: the norms' weights (of 1) move by ~lr x lr / peak a
    step, a ratio / (lr / peak) under 1e-6 (so a floor of 1e-6 would call it too low) but far above the default
    1e-8. 5 steps measured every step: no warning."""
    out = tmp_path / "small_lr"
    summary = main(["--data", str(corpus_dir), "--out", str(out), *TINY_ARGS, "--train.max_steps=5", "--train.lr=1e-6",
                    "--log.health_interval=1", "--eval.interval=0", "--log.interval=1"])
    rows = metrics(out)
    lr = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    scaled = [r["update_ratio/vectors"] / (lr[r["step"]] / 1e-6) for r in rows if "update_ratio/vectors" in r]
    assert len(scaled) == 5 and 1e-8 < min(scaled) < 1e-6, scaled
    assert summary["health_warnings"] == counts() and warning_lines(capsys.readouterr().out) == []


def test_a_dead_block_is_said_to_vanish(tmp_path, tiny_run, corpus_dir, capsys, one_thread):
    """A copy of the tiny run with every weight of block 1 set to zero (a dead block: its output is 0 whatever its
    input, so no gradient reaches any of its weights, and none ever will), trained on for 3 steps: grad_norm/block_1
    is exactly 0, and the warning names it once."""
    start = tmp_path / "dead"
    shutil.copytree(tiny_run, start, ignore=shutil.ignore_patterns("events.out.tfevents.*"))
    path = checkpoint.latest(start)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, tensor in state["model"].items():
        if name.startswith("blocks.1."):
            tensor.zero_()
    torch.save(state, path)
    out = tmp_path / "vanish"
    summary = main(["--init-from", str(start), "--data", str(corpus_dir), "--out", str(out), *TINY_ARGS,
                    "--train.max_steps=3",
                    "--log.health_interval=1", "--eval.interval=0", "--log.interval=1"])
    logged = [r for r in metrics(out) if "grad_norm/block_1" in r]
    assert [r["grad_norm/block_1"] for r in logged] == [0.0, 0.0, 0.0] and min(r["grad_norm/block_0"] for r in logged) > 0
    [line] = assert_said_everywhere(out, summary, capsys.readouterr().out, "vanishing", 1)
    assert line.startswith("health warning (vanishing) at step 1: grad_norm/block_1 is 0, below 0.001 x the largest "
                           "group's, grad_norm/")


def test_a_healthy_default_recipe_run_raises_no_warning(tmp_path, corpus_dir, capsys, one_thread):
    """The default pre-training recipe (Muon at 0.01 for the blocks' matrices, AdamW at 3e-3, batch 8, warmup 50,
    warmup-stable-decay, clip 1) on the tiny shape for 100 steps -- warmup, stable and decay -- with every step's
    health measured and validation every 20: no warning, the summary counts none, no health text in TensorBoard."""
    out = tmp_path / "healthy"
    summary = main(["--data", str(corpus_dir), "--out", str(out), *TINY_SHAPE, "--train.max_steps=100",
                    "--log.health_interval=1", "--eval.interval=20", "--eval.max_tokens=4096"])
    text = capsys.readouterr().out
    t = tomllib.loads((out / "config.toml").read_text())["train"]  # the run's own resolved config
    assert (t["optimizer"], t["lr"], t["muon_lr"], t["batch_size"], t["warmup_steps"]) == ("muon", 3e-3, 0.01, 8, 50)
    rows = metrics(out)
    assert sum("update_ratio/muon" in r for r in rows) == 100 and sum("val/loss" in r for r in rows) == 6
    assert warning_lines(text) == [] and "health: no warnings" in text
    assert summary["health_warnings"] == counts()
    assert health_texts(out) == {}
