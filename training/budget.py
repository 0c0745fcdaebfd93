"""The wall-clock budget (train.time_budget_min): turn minutes into a step count, and re-plan it as the run goes.

The loop feeds the object the measured times: after every step `after_step(...)` (which may return a new
max_steps), after every validation `validation_took(seconds)`. The rules:
  - the first step of a process (compilation, warm-up) is not timed; the next BUDGET_TIMING_STEPS are, then the
    count is planned: the steps that fit the time left (the first plan adds the periodic validations' share);
  - every BUDGET_TIMING_STEPS steps after that, while warmup-stable-decay's learning rate is still flat, the count is
    re-planned (a machine that slows down mid-run moves the end, and so the start of the decay, to fit the budget).
The count is of applied updates, as train.max_steps is.
"""

from __future__ import annotations

from training import distributed
from training.config import TrainSection
from training.monitor import print0
from training.optim import wsd_decay_start

# Steps timed before a wall-clock budget is turned into a step count (after one untimed warm-up step); long
# enough to average out some of the machine-speed noise of a shared CPU.
BUDGET_TIMING_STEPS = 30


def replan_budget_steps(sched_step: int, seconds_left: float, seconds_per_step: float, t: TrainSection) -> int:
    """A wall-clock budget's step count under warmup-stable-decay, planned while the learning rate is not decaying.

    The count is of applied updates, as train.max_steps is (the loop ends when the schedule's step reaches it; an
    fp16-skipped step is attempted again). `sched_step` updates are applied, `seconds_left` remain and steps take
    `seconds_per_step`: the count that fills the budget is sched_step + seconds_left / seconds_per_step. Before the
    decay, moving the end only moves where the decay starts, so the schedule keeps its shape; the count is never set
    so low that the decay would already have begun (the next step would jump down the ramp): then the decay starts
    at the next step.
    """
    planned = sched_step + max(int(seconds_left / seconds_per_step), 0)
    if t.decay_frac >= 1:  # the decay spans every step after the warmup: there is no flat part to move
        return planned
    while wsd_decay_start(planned, t) < sched_step:  # it grows with the count, by ~(1 - decay_frac) per step
        planned += 1
    return planned


class TimeBudget:
    """train.time_budget_min as a step count, planned and re-planned from the measured step times."""

    def __init__(self, t: TrainSection, eval_interval: int) -> None:
        self.t, self.eval_interval = t, eval_interval
        self.seconds = t.time_budget_min * 60
        self.window_start: float | None = None  # when the timed window began (after this process's first step)
        self.window_step = 0
        self.val_seconds = 0.0  # the last validation's duration

    def validation_took(self, seconds: float) -> None:
        self.val_seconds = seconds

    def due(self, step: int, sched_step: int, max_steps: int | None) -> bool:
        """Whether to (re-)plan after `step`: every BUDGET_TIMING_STEPS timed steps, until the count is planned,
        and after that while warmup-stable-decay's learning rate is still flat."""
        if (step - self.window_step) % BUDGET_TIMING_STEPS:
            return False
        return max_steps is None or (self.t.schedule == "wsd" and sched_step < wsd_decay_start(max_steps, self.t))

    def plan(self, sched_step: int, max_steps: int | None, seconds_left: float, per_step: float) -> int:
        """The count of applied updates that fills seconds_left at per_step seconds a step (steps, validations
        and saves of the window included; the first plan adds the periodic validations, none ran in the window)."""
        per_step_all = per_step
        if max_steps is None and self.eval_interval:
            per_step_all += self.val_seconds / self.eval_interval
        if self.t.schedule == "wsd":  # the machine's drift moves the end (and so the decay's start) to fit the budget
            return replan_budget_steps(sched_step, seconds_left, per_step_all, self.t)
        return sched_step + max(int(seconds_left / per_step_all), 0)

    def after_step(self, step: int, sched_step: int, max_steps: int | None, now: float, elapsed: float) -> int | None:
        """max_steps after `step` (1-based) ended at `now` (perf_counter), the run having spent `elapsed` seconds
        (earlier processes included): planned, re-planned, or as it was."""
        if self.window_start is None:  # the first step of this process (compilation, warm-up) is not timed
            self.window_start, self.window_step = now, step
            return max_steps
        if not self.due(step, sched_step, max_steps):
            return max_steps
        per_step = (now - self.window_start) / (step - self.window_step)  # validations and saves included
        planned = self.plan(sched_step, max_steps, self.seconds - elapsed, per_step)
        planned = distributed.broadcast_object(planned)  # rank 0's count: every rank stops together
        t = self.t
        if max_steps is None:
            print0(f"time budget {t.time_budget_min:g} min: {per_step * 1000:.1f} ms/step -> max_steps={planned}")
        elif abs(planned - max_steps) > 0.02 * max_steps or sched_step + BUDGET_TIMING_STEPS >= \
                wsd_decay_start(planned, t):
            print0(f"time budget: {per_step * 1000:.1f} ms/step so far -> max_steps={planned} (was "
                   f"{max_steps}; the decay starts at step {wsd_decay_start(planned, t)})")
        return planned
