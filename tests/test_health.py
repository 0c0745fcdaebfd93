"""Training health said in words (training/health.py): each watch fed sequences of numbers by hand (when it fires,
how it re-arms) and the `[health]` options."""

from __future__ import annotations

import math

import pytest

from training.config import parse_args
from training.health import ExplodingWatch, HealthWatch, OverfittingWatch, UpdateRatioWatch, VanishingWatch


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


def test_vanishing_compares_each_group_with_the_median_and_rearms_when_it_recovers():
    watch = VanishingWatch(ratio=1e-3)
    # median of (1, 0.5, 0.02, 2e-4) = (0.5 + 0.02) / 2 = 0.26; the threshold 2.6e-4: block_2's 2e-4 is below it
    norms = {"block_0": 1.0, "block_1": 0.5, "block_2": 2e-4, "final_norm": 0.02}
    [w] = watch.observe(7, norms)
    assert (w.kind, w.step) == ("vanishing", 7)
    assert w.message == "grad_norm/block_2 is 0.0002, below 0.001 x the median of the groups' norms (0.26)"
    assert watch.observe(8, norms) == []  # the same episode
    assert watch.observe(9, {**norms, "block_2": 0.01}) == []  # recovered: re-armed
    assert [w.step for w in watch.observe(10, norms)] == [10]
    # exactly at the threshold is healthy: median of (0.5, 1, 1, 2) = 1, threshold 0.5 x 1
    assert VanishingWatch(0.5).observe(1, {"a": 2.0, "b": 1.0, "c": 1.0, "d": 0.5}) == []
    assert VanishingWatch(0.0).observe(1, {"a": 1.0, "b": 0.0, "c": 1.0}) == []  # 0 = off


def test_update_ratio_band_follows_the_learning_rate_schedule():
    watch = UpdateRatioWatch(low=1e-6, high=0.3)
    # warmup at lr/peak 0.02: the band is [2e-8, 6e-3]; AdamW's first step on std-0.02 weights at the default
    # lr 3e-3 is 3e-3 / 0.02 x 0.02 = 3e-3 per step: inside, though 0.15 of the peak-lr band's reach
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


def test_rising_val_loss_with_rising_train_loss_is_not_overfitting():
    watch = OverfittingWatch(evals=2)
    # the rise starts from the evaluation at step 0 (train 3.0); at steps 20 and 30 the train loss has risen too (a
    # diverging run, not overfitting); at step 40 it is below the rise's start, the val loss still rising: it fires
    assert overfit_run(watch, [([3.0], 5.0), ([3.5], 5.5), ([4.0], 6.0), ([4.5], 6.5), ([2.9], 7.0)]) == [40]
    assert overfit_run(OverfittingWatch(0), [([3.0 - i / 10], 5.0 + i) for i in range(10)]) == []


def test_health_options_are_checked_and_named():
    h = parse_args(["--health.explode_factor=4", "--health.overfit_evals=5"]).health
    assert (h.explode_factor, h.explode_steps, h.overfit_evals, h.ratio_low, h.ratio_high) == (4.0, 20, 5, 1e-6, 0.3)
    with pytest.raises(ValueError, match=r"health\.ratio_high=1e-07 must exceed health\.ratio_low=1e-06"):
        parse_args(["--health.ratio_high=1e-7"])
    with pytest.raises(ValueError, match=r"health\.vanish_ratio=-1\.0 must be >= 0"):
        parse_args(["--health.vanish_ratio=-1"])
    with pytest.raises(ValueError, match=r"unknown option --health\.explode_step \(did you mean 'health\.explode_steps'"):
        parse_args(["--health.explode_step=3"])
