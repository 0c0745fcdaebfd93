"""The one training loop, shared by every stage: set-up, the step, the loop.

    run(cfg)            prepare_inputs() -> processes up -> setup() -> train() -> processes down
    prepare_inputs(cfg) before any process group (no collective, so no timeout): run folder, starting checkpoints,
                        tokenizer, the stage's data on disk (pre-training: token shards)
    setup(cfg, info)    the stage (training/stages/), the ranks' agreement on data and tokenizer, model (fresh,
                        --init-from or --resume), the stage's frozen models, precision, wrapping, compilation,
                        optimizer, resumed state
    train_step(...)     one optimizer step: gradients of every micro-batch, clipping, the update
    train(run)          the loop: batches from the stage, lr, train_step, time budget, logging, validation, saves

The run's mutable state is training/run_state.py:RunState; the time budget is training/budget.py:TimeBudget. A stage
differs only in what training/stages/base.py:Stage lists (its data, objective and count, validation, sample, FLOPs,
frozen models, loader state).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.shards import cut_rows
from model.gpt import GPT, GPTConfig
from model.reward import RewardModel, is_reward_state
from training import checkpoint, distributed
from training.budget import TimeBudget
from training.config import Config, as_typed, check_resume_compatible, from_dict, to_dict, to_toml
from training.distributed import DistInfo, all_reduce, maybe_no_sync
from training.faults import FaultInjection, StopSignal
from training.health import HealthWarning, HealthWatch, activation_hooks, block_grad_norms, lr_scales, update_ratios
from training.monitor import Monitor, Throughput, fmt_duration, print0
from training.optim import accum_steps, build_optimizer, lr_factor, row_length, set_lr, weight_decay_factor
from training.precision import autocast_ctx, resolve_precision
from training.run_folder import check_global_batch, check_run_dir, config_summary, write_run_files
from training.run_state import RunState, build_checkpoint
from training.runinfo import measure_peak_flops
from training.stages import STAGES, Stage, StageEnv
from training.tokenizer_cache import resolve_tokenizer
from training.weights import full_state, load_full_state, load_weights

# Under fp16, this many GradScaler-skipped steps in a row mean the run has diverged.
MAX_CONSECUTIVE_SKIPS = 20
# Model fields that --init-from never lets the command line change (the weights fix them).
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio", "arch",
                "tie_embeddings", "bias", "rope_theta", "qk_norm", "relu_squared", "logit_softcap", "residual_scalars",
                "value_embeds", "bigram_buckets")


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, diverged fp16 run); the last good checkpoint stays intact."""


@dataclass
class Run:
    """What setup() builds and the loop uses; it does not change while the loop runs (RunState does)."""

    cfg: Config
    info: DistInfo
    stage: Stage
    raw: GPT  # the unwrapped policy
    model: torch.nn.Module  # the policy as trained: wrapped (DDP / FSDP2), maybe compiled
    eval_model: torch.nn.Module  # validation, sampling, generation: the plain module, or FSDP's (a collective)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    precision: str  # resolved: fp32 | bf16 | fp16
    tok: object
    gcfg: GPTConfig
    init_ckpt: str | None  # the exact checkpoint file the run started from
    params: list[torch.Tensor] | None = None  # the trained parameters (FSDP2: the sharded ones), collected once
    monitor: Monitor | None = None
    health: HealthWatch | None = None  # the warnings in words (training/health.py)
    fault: FaultInjection | None = None
    stop: StopSignal | None = None


# ----------------------------------------------------------------------------------------------- set-up
def model_config(cfg: Config, base: dict | None, vocab_size: int) -> GPTConfig:
    """The model's shape: the preset plus explicit overrides, or (fine-tuning) the starting checkpoint's shape."""
    overrides = {k: v for k, v in to_dict(cfg)["model"].items() if k != "preset" and v is not None}
    if base is not None:
        base = GPTConfig.from_dict(base).to_dict()  # a checkpoint older than a model option has its default
        for k, v in overrides.items():
            if k in SHAPE_FIELDS and v != base[k]:
                raise ValueError(f"--model.{k}={as_typed(v)}: the starting checkpoint has {k}={as_typed(base[k])}; "
                                 "a model's shape cannot change when fine-tuning (only model.dropout can)")
        return GPTConfig.from_dict({**base, **{k: v for k, v in overrides.items() if k not in SHAPE_FIELDS}})
    overrides.setdefault("vocab_size", vocab_size)
    return GPTConfig.from_preset(cfg.model.preset, **overrides)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Each step's random state (dropout) derives from (seed, step, rank), so a resumed run draws the same dropout
    masks as an uninterrupted one on the same world size. On another world size a rank's rows move to another rank
    and get other masks: with dropout > 0 such a resume is a different (equally valid) run, not the same one."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def check_settings(cfg: Config, info: DistInfo, precision: str) -> None:
    if precision == "fp16" and cfg.dist.strategy == "fsdp":
        raise ValueError("--train.precision=fp16 is not supported with --dist.strategy=fsdp (use bf16)")
    if cfg.train.optimizer == "muon" and cfg.dist.strategy == "fsdp" and info.distributed:
        # NorMuon exists only on top of Muon (config refuses train.normuon with adamw): this is its refusal too
        normuon = " (and --train.normuon=true whole rows for its statistics)" if cfg.train.normuon else ""
        raise ValueError(f"--train.optimizer=muon needs whole gradient matrices{normuon}; it is not supported with "
                         "--dist.strategy=fsdp: pass --train.optimizer=adamw (muon is the pre-training default, the "
                         "CPU speedrun's optimizer) or use --dist.strategy=ddp")
    if cfg.train.cautious_decay and cfg.dist.strategy == "fsdp" and info.distributed:
        raise ValueError("--train.cautious_decay=true is not supported with --dist.strategy=fsdp (its "
                         "optimizer has not been checked on sharded parameters): use --dist.strategy=ddp")


def starting_points(cfg: Config, info: DistInfo) -> tuple[dict | None, dict | None]:
    """Where the weights come from: a resumed checkpoint, a starting run (--init-from), or nothing."""
    resumed = checkpoint.load(cfg.out) if cfg.resume and checkpoint.latest(cfg.out) is not None else None
    start = checkpoint.load(cfg.init_from) if cfg.init_from and not cfg.resume else None
    if resumed is not None:
        check_resume_compatible(from_dict(resumed["config"]), cfg)
        check_global_batch(resumed, cfg.train.batch_size, info.world_size)
    return resumed, start


def build_policy(cfg: Config, gcfg: GPTConfig, device, resumed: dict | None, start: dict | None) -> GPT:
    torch.manual_seed(cfg.train.seed)
    stage_cls = STAGES[cfg.stage]
    raw = stage_cls.model_class(gcfg).to(device)
    if resumed is not None:
        load_weights(raw, resumed["model"])
    elif start is not None:
        load_weights(raw, start["model"], may_lack=stage_cls.new_weights)
    return raw


def check_start_kind(cfg: Config, start: dict | None) -> None:
    """A reward-model run (its weights hold a score head) cannot start a stage that trains a policy."""
    if start is not None and is_reward_state(start["model"]) and STAGES[cfg.stage].model_class is not RewardModel:
        raise ValueError(f"--init-from {cfg.init_from}: {start['path']} is a reward model (stage "
                         f"{start.get('stage')!r}, with a score head); --stage {cfg.stage} trains a policy: start it "
                         "from a pre-training, SFT or DPO run")


def resume_state(run: Run, state: RunState, resumed: dict) -> None:
    """Weights, optimizer, scaler, loader, RNG and counters of a resumed checkpoint."""
    t = run.cfg.train
    load_full_state(run.model, run.optimizer, resumed["model"], resumed["optimizer"])
    if resumed.get("scaler"):
        run.scaler.load_state_dict(resumed["scaler"])
    state.load_state_dict(resumed)
    # A time budget's step count is saved: the resumed run follows it (re-planned, as any budget run, while
    # warmup-stable-decay's learning rate is still flat).
    if not (t.time_budget_min > 0 or t.max_steps == from_dict(resumed["config"]).train.max_steps):
        state.max_steps = t.max_steps
    print0(f"resumed from {resumed['path']} at step {state.step}")


@dataclass
class Inputs:
    """What prepare_inputs() reads and makes before the process group starts."""

    resumed: dict | None  # the checkpoint a --resume continues
    start: dict | None  # the checkpoint --init-from starts from
    tok: object
    gcfg: GPTConfig


def prepare_inputs(cfg: Config) -> Inputs:
    """Checks, starting checkpoints, tokenizer and the stage's data, before any process group exists: preparing
    data can take longer than a collective's timeout (dist.timeout_min), and nothing here is a collective. The
    processes of one machine serialise on file locks (the first trains the tokenizer and prepares, the others
    reuse); under a multi-node torchrun the stage accepts only prepared data (scripts/prepare_data.py)."""
    launch = distributed.launch_info()
    stage_cls = STAGES[cfg.stage]
    stage_cls.check_launch(cfg, launch)
    check_run_dir(cfg)
    resumed, start = starting_points(cfg, launch)
    check_start_kind(cfg, start)
    ckpt = resumed or start
    tok = resolve_tokenizer(cfg, ckpt, may_train=stage_cls.trains_tokenizer, verbose=launch.is_main)
    gcfg = model_config(cfg, (ckpt or {}).get("model_config"), tok.vocab_size)
    if gcfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={gcfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    stage_cls.prepare(cfg, tok, gcfg, launch)
    return Inputs(resumed, start, tok, gcfg)


def setup(cfg: Config, info: DistInfo, stop: StopSignal, inputs: Inputs) -> tuple[Run, RunState]:
    """Everything the loop needs, in order: data, agreement across ranks, model, frozen models, wrapping,
    optimizer, state."""
    t, device = cfg.train, info.device
    distributed.barrier()  # every rank has looked at the run folder before rank 0 writes to it
    precision = resolve_precision(t.precision, device)
    check_settings(cfg, info, precision)
    resumed, start, tok, gcfg = inputs.resumed, inputs.start, inputs.tok, inputs.gcfg
    stage_cls = STAGES[cfg.stage]
    try:  # a rank-local failure (its copy of the data incomplete, too small) must stop every rank, not hang them
        stage = stage_cls(cfg, tok, gcfg, info)
        identity, failure = {"tokenizer": tok.hash, **stage.identity()}, None
    except (ValueError, FileNotFoundError) as e:
        identity, failure = {}, e
    distributed.check_same_everywhere(identity, failure)
    print0(config_summary(cfg, gcfg, device, precision))
    raw = build_policy(cfg, gcfg, device, resumed, start)
    # The exact checkpoint file this run started from: recorded in every checkpoint, and where a resumed run finds
    # its starting weights (a reference; the run folder named by init_from may have moved on since).
    init_ckpt = str(Path(start["path"]).resolve()) if start is not None else (resumed or {}).get("init_from_checkpoint")
    param_dtype = torch.bfloat16 if precision == "bf16" else None
    # FSDP2 applies its own mixed precision; autocast is for the unsharded model.
    autocast = autocast_ctx(precision if cfg.dist.strategy != "fsdp" or not info.distributed else "fp32", device)
    # Frozen models copy the policy before it is wrapped (FSDP2 shards the module in place).
    stage.setup_frozen(raw, StageEnv(init_ckpt, resumed is not None, autocast=autocast, precision=precision,
                                     wrap=lambda m: distributed.wrap_reference(m, cfg.dist.strategy, info,
                                                                               param_dtype)))
    print0(f"model: {gcfg.arch}, {raw.num_params() / 1e6:.2f}M parameters "
           f"({raw.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), {raw.flops_per_token() / 1e6:.1f} "
           f"MFLOP/token at T={gcfg.block_size} (6N + 12LdT, as train/mfu counts)")
    model = distributed.wrap_model(raw, cfg.dist.strategy, info, param_dtype)
    if t.compile:
        model = torch.compile(model)
    # Validation and sampling use the plain module (no DDP hooks, no recompilation for odd shapes), except under
    # FSDP, where the forward itself gathers the shards and every rank runs it.
    eval_model = model if cfg.dist.strategy == "fsdp" and info.distributed else raw
    run = Run(cfg, info, stage, raw, model, eval_model, build_optimizer(model, t, device.type),
              torch.amp.GradScaler(device.type, enabled=(precision == "fp16")), autocast, precision, tok, gcfg,
              init_ckpt,
              stop=stop, fault=FaultInjection(os.environ["GPTRAIN_FAULT"]) if os.environ.get("GPTRAIN_FAULT") else None)
    # Collected before any forward: after one, FSDP2 may leave the root's unsharded tensors registered instead.
    run.params = [p for p in model.parameters() if p.requires_grad]
    state = RunState(max_steps=t.max_steps if t.time_budget_min <= 0 else None, loader=stage)
    if resumed is not None:
        resume_state(run, state, resumed)
    write_run_files(cfg, tok, info)
    run.monitor = Monitor(cfg.out, enabled=info.is_main, tensorboard=cfg.log.tensorboard)
    run.monitor.text("config", to_toml(cfg), state.step)
    run.health = HealthWatch.from_config(cfg.health, t.grad_clip)
    return run, state


# ----------------------------------------------------------------------------------------------- one step
def accumulate_gradients(model, objective, batches: list[dict], count: torch.Tensor, world_size: int, autocast,
                         scaler: torch.amp.GradScaler, strategy: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward every micro-batch of a step; gradients end up as d(sum of losses)/d(params) / count.

    count is the step's global number of normalisation units (all micro-batches, all ranks). Gradient
    synchronisation runs only on the last micro-batch: the backward runs inside the no-sync region, because FSDP2
    reads its sync flag in the post-backward hook (DDP reads it in the forward). Autocast covers the forward and
    the loss only. Returns the local loss sum and metric sums (detached).
    """
    loss_sum = torch.zeros((), device=count.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        with maybe_no_sync(model, strategy, sync=(i == len(batches) - 1)):
            with autocast:
                part, metrics = objective(model, batch)
                # DDP and FSDP average gradients over ranks; multiplying by world size undoes that division, so the
                # update is d(sum of losses)/d(params) / (global count), exactly as one large batch.
                loss = part / count.clamp(min=1) * world_size
            scaler.scale(loss).backward()
        loss_sum += part.detach()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.detach()
    return loss_sum, metric_sums


def unscale_gradients(optimizer, scaler) -> None:
    """fp16: divide the gradients by the loss scale, once per step, before anything reads or clips them."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global norm of the (unscaled) gradients to max_norm (0 = no clipping); returns the norm before."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor


def apply_update(optimizer, scaler) -> bool:
    """The optimizer step; under fp16 the GradScaler skips it when the gradients hold inf/NaN. Returns skipped."""
    if not scaler.is_enabled():
        optimizer.step()
        return False
    old_scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < old_scale  # the scale backs off exactly when the step was skipped


@dataclass
class StepResult:
    loss: float  # the step's loss: global loss sum / global count
    grad_norm: float  # before clipping
    metric_sums: dict[str, torch.Tensor]  # reduced over ranks
    stop_requested: bool  # a stop signal reached some rank


def every(interval: int, step: int) -> bool:
    """Whether an every-`interval`-steps action (0 = never) is due at 1-based step `step`."""
    return interval > 0 and step % interval == 0


def train_step(run: Run, state: RunState, batches: list[dict], count: torch.Tensor) -> StepResult:
    """Gradients of every micro-batch, clipping, the update (skipped under fp16 on overflow), its bookkeeping."""
    cfg, info, step = run.cfg, run.info, state.step
    params = run.params
    hist, health = every(cfg.log.hist_interval, step + 1), every(cfg.log.health_interval, step + 1)
    hooks = activation_hooks(run.raw, run.monitor, step + 1) if hist and info.is_main else []
    loss_sum, metric_sums = accumulate_gradients(run.model, run.stage.objective, batches, count, info.world_size,
                                                 run.autocast, run.scaler, cfg.dist.strategy)
    for h in hooks:
        h.remove()
    if run.fault is not None and run.fault.due(step + 1, info.rank):
        run.fault.apply(loss_sum, params)
    unscale_gradients(run.optimizer, run.scaler)
    block_norms = block_grad_norms(run.raw) if health else None  # before clipping, as train/grad_norm (FSDP gathers)
    grad_norm = clip_gradients(params, cfg.train.grad_clip)
    before = [p.detach().clone() for g in run.optimizer.param_groups for p in g["params"]] if health else None

    # One host sync per step: the reduced loss and metrics, the stop request of any rank.
    flags = torch.tensor([float(run.stop.requested)], device=info.device)
    all_reduce(loss_sum)
    all_reduce(flags, op="max")
    for v in metric_sums.values():
        all_reduce(v)
    result = StepResult(loss_sum.item() / max(count.item(), 1), grad_norm.item(), metric_sums, bool(flags.item()))
    check_finite(result, run.scaler, step, cfg.out)
    skipped_now = apply_update(run.optimizer, run.scaler)
    run.optimizer.zero_grad(set_to_none=True)
    count_skip(state, skipped_now, run.scaler, cfg.out)
    state.step += 1
    if health:
        log_health(run, state.step, block_norms, update_ratios(run.optimizer, before), skipped_now)
    return result


def check_finite(result: StepResult, scaler, step: int, out: str) -> None:
    if not math.isfinite(result.loss):
        raise TrainingError(f"non-finite loss ({result.loss}) at step {step + 1}: stopping before the optimizer "
                            f"step; the last good checkpoint in {out} is intact")
    if not scaler.is_enabled() and not math.isfinite(result.grad_norm):
        raise TrainingError(f"non-finite gradient norm ({result.grad_norm}) at step {step + 1}: stopping before "
                            f"the optimizer step; the last good checkpoint in {out} is intact")


def count_skip(state: RunState, skipped_now: bool, scaler, out: str) -> None:
    """An fp16-skipped update does not advance the schedule (sched_step = step - skipped); too many in a row stop."""
    if not skipped_now:
        state.consecutive_skips = 0
        return
    state.skipped += 1
    state.consecutive_skips += 1
    print0(f"step {state.step + 1}: fp16 gradients overflowed, update skipped (scale now {scaler.get_scale():g})")
    if state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
        raise TrainingError(f"{state.consecutive_skips} fp16 steps in a row were skipped (inf/NaN gradients): "
                            f"the run has diverged; the last good checkpoint in {out} is intact")


def log_health(run: Run, step: int, block_norms: dict, ratios: dict, skipped: bool) -> None:
    if run.info.is_main:
        run.monitor.scalars(step, {**{f"grad_norm/{k}": v for k, v in block_norms.items()},
                                   **{f"update_ratio/{k}": v for k, v in ratios.items()}})
    # Every rank watches (the figures are synchronised, so the watches agree). An fp16-skipped step overflowed
    # (inf norms) and updated nothing: nothing to judge.
    if not skipped:
        warn(run, [*run.health.vanishing.observe(step, block_norms),
                   *run.health.update_ratio.observe(step, ratios, lr_scales(run.optimizer))])


def warn(run: Run, warnings: list[HealthWarning | None]) -> None:
    """Say each warning on the console and as TensorBoard text health/<kind>, and count it (rank 0 writes)."""
    for w in run.health.count(warnings):
        print0(w.line())
        run.monitor.text(f"health/{w.kind}", w.line(), w.step)


def log_histograms(run: Run, step: int) -> None:
    """Every rank: under FSDP each full weight is gathered (a collective); rank 0 writes it."""
    for name, p in run.raw.named_parameters():
        run.monitor.histogram(f"weights/{name}", p.full_tensor() if hasattr(p, "full_tensor") else p, step)


# ----------------------------------------------------------------------------------------------- the loop's parts
def save(run: Run, state: RunState, reason: str) -> None:
    msd, osd = full_state(run.model, run.optimizer)  # every rank takes part (FSDP gathers)
    run.stage.before_save()  # every rank: a stage may gather per-rank loader state for rank 0 to write
    if run.info.is_main:
        scaler = run.scaler.state_dict() if run.scaler.is_enabled() else None
        ckpt = build_checkpoint(state, msd, osd, scaler, run.cfg, run.gcfg, run.tok, world_size=run.info.world_size,
                                init_from_checkpoint=run.init_ckpt)
        hook = run.fault.save_hook(state.step, run.info.rank) if run.fault is not None else None
        path = checkpoint.save(run.cfg.out, state.step, ckpt, keep=run.cfg.ckpt.keep, hook=hook)
        print0(f"saved {path} ({reason})")
    distributed.barrier()


def validate(run: Run, state: RunState, budget: TimeBudget | None, final: bool = False) -> dict[str, float]:
    """The stage's held-out figures (the final validation scores the whole split), timed for the budget."""
    t0 = time.perf_counter()
    figures = run.stage.validate(run.eval_model, run.autocast, run.info, full=final)
    if budget is not None:
        budget.validation_took(time.perf_counter() - t0)
    run.monitor.scalars(state.step, {f"val/{k}": v for k, v in figures.items()})
    print0("val " + " | ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in figures.items()))
    return figures


def sample(run: Run, state: RunState) -> None:
    text = run.stage.sample(run.eval_model, run.autocast)
    print0(f"--- sample at step {state.step} ---\n{text}\n---")
    run.monitor.text("sample", text, state.step)


def log_step(run: Run, state: RunState, r: StepResult, lr: float, count: float, throughput: Throughput,
             start_step: int) -> None:
    tps, mfu = throughput.report()
    elapsed, max_steps = state.elapsed(), state.max_steps
    eta = (max_steps - state.sched_step) * (time.perf_counter() - state.t_start) / max(state.step - start_step, 1) \
        if max_steps else float("nan")
    scal = {"train/loss": r.loss, "train/lr": lr, "train/grad_norm": r.grad_norm, "train/tokens_per_sec": tps,
            "train/mfu": mfu, "train/tokens_seen": state.tokens_seen}
    if run.scaler.is_enabled():
        scal["train/grad_scale"] = run.scaler.get_scale()
        scal["train/skipped_steps"] = state.skipped
    figures = {k: v.item() / max(count, 1) for k, v in r.metric_sums.items()} | run.stage.step_logs()
    scal.update({f"train/{k}": v for k, v in figures.items()})
    run.monitor.scalars(state.step, scal)
    extra = "".join(f" | {k} {v:.3f}" for k, v in figures.items() if k in run.stage.console_metrics)
    last = max_steps + state.skipped if max_steps else "?"  # the step the run ends at if no more are skipped
    print0(f"step {state.step:5d}/{last} | loss {r.loss:.4f} | lr {lr:.2e} | gnorm "
           f"{r.grad_norm:.3f} | {tps:,.0f} tok/s | mfu {100 * mfu:.1f}%{extra} | "
           f"{fmt_duration(elapsed)} elapsed | eta {fmt_duration(eta) if math.isfinite(eta) else '?'}")


def step_batches(run: Run, state: RunState) -> tuple[list[dict], torch.Tensor]:
    """The step's micro-batches from the stage (given the policy: a stage may generate them), then their
    normalisation count summed over micro-batches and ranks: the step's one divisor."""
    batches = run.stage.train_batches(run.eval_model, accum_steps(state.sched_step, run.cfg.train))
    length = row_length(state.sched_step, run.cfg.train, run.gcfg.block_size)
    if length != run.gcfg.block_size:  # the sequence-length warmup (pre-training only: config.check_seq_warmup)
        batches = [cut_rows(b, length) for b in batches]
    count = sum(run.stage.objective.count(b) for b in batches).to(device=run.info.device, dtype=torch.float32)
    return batches, all_reduce(count)


def end_of_run(run: Run, state: RunState, budget: TimeBudget | None) -> dict[str, float]:
    """The end of the schedule: final validation, a sample, the last checkpoint."""
    cfg, t = run.cfg, run.cfg.train
    val = validate(run, state, budget, final=True)
    sample(run, state)
    save(run, state, "end")
    run.monitor.hparams({"stage": cfg.stage, "preset": cfg.model.preset, "lr": t.lr, "batch_size": t.batch_size,
                         "max_steps": state.max_steps}, {f"hparam/val_{k}": v for k, v in val.items()})
    return val


# ----------------------------------------------------------------------------------------------- the loop
def train(run: Run, state: RunState) -> dict:
    """The loop: until max_steps updates are applied (a time budget plans that count as it goes)."""
    cfg, t, info, stage = run.cfg, run.cfg.train, run.info, run.stage
    peak = t.peak_flops or measure_peak_flops(info.device, run.precision)
    print0(f"world size {info.world_size} ({info.backend or 'single process'}), per-device batch {t.batch_size} x "
           f"{run.gcfg.block_size} tokens, accumulation {t.grad_accum}, global batch "
           f"{stage.tokens_per_micro_batch * t.grad_accum * info.world_size} tokens/step"
           + (f" (from 1 micro-step, ramped over {t.accum_ramp_steps} updates)" if t.accum_ramp_steps else "")
           + (f"; rows of {t.seq_warmup_len} tokens for the first {t.seq_warmup_steps} updates" if t.seq_warmup_len
              else ""))
    budget = TimeBudget(t, cfg.eval.interval) if t.time_budget_min > 0 else None
    state.start_clock()
    start_step = state.step
    val = validate(run, state, budget) if state.step == 0 and cfg.eval.interval > 0 else {}
    first_val = dict(val)
    # step 0's validation is the overfitting watch's baseline: a rise may start from it (training/health.py)
    warn(run, [run.health.overfitting.observe_val(state.step, val["loss"]) if "loss" in val else None])
    throughput = Throughput(peak * info.world_size)
    while state.max_steps is None or state.sched_step < state.max_steps:
        if t.stop_after_steps and state.step >= t.stop_after_steps:
            save(run, state, "stop_after_steps")
            break
        torch.manual_seed(step_seed(t.seed, state.step, info.rank))
        batches, count = step_batches(run, state)
        # Until a time budget has been turned into max_steps, the schedule is in its warmup/stable part.
        max_steps = state.max_steps if state.max_steps is not None else 10**9
        factor = lr_factor(state.sched_step, max_steps, t)
        set_lr(run.optimizer, factor, weight_decay_factor(state.sched_step, max_steps, t))
        result = train_step(run, state, batches, count)
        warn(run, [run.health.exploding.observe(state.step, result.grad_norm)])
        run.health.overfitting.observe_train(result.loss)
        # Tokens and model FLOPs actually processed: SFT/DPO rows are padded to the global batch's longest example,
        # not block_size (every rank pads to the same length, so this rank's count times the world size is global).
        step_tokens = sum(stage.batch_tokens(b) for b in batches) * info.world_size
        state.tokens_seen += step_tokens
        throughput.add(step_tokens, stage.step_flops(run.raw, batches) * info.world_size)
        if budget is not None:
            now = time.perf_counter()
            state.max_steps = budget.after_step(state.step, state.sched_step, state.max_steps, now, state.elapsed(now))
        if every(cfg.log.hist_interval, state.step):
            log_histograms(run, state.step)
        if state.step % cfg.log.interval == 0 or state.sched_step == state.max_steps:
            log_step(run, state, result, t.lr * factor, count.item(), throughput, start_step)
        done = state.max_steps is not None and state.sched_step >= state.max_steps
        if every(cfg.eval.interval, state.step) and not done:
            val = validate(run, state, budget)
            warn(run, [run.health.overfitting.observe_val(state.step, val["loss"]) if "loss" in val else None])
            throughput.reset()
        if every(cfg.eval.sample_interval, state.step) and not done:
            sample(run, state)
            throughput.reset()
        if result.stop_requested:
            save(run, state, "signal")
            break
        if state.step % cfg.ckpt.interval == 0 and not done:
            save(run, state, "interval")
            throughput.reset()
    else:
        val = end_of_run(run, state, budget)
    print0(run.health.summary())
    run.monitor.close()
    return {"out": cfg.out, "step": state.step, "max_steps": state.max_steps, "val": val, "first_val": first_val,
            "skipped_steps": state.skipped, "health_warnings": dict(run.health.counts)}


def run(cfg: Config) -> dict:
    """Train according to cfg; returns a summary (final validation figures, steps, run folder)."""
    inputs = prepare_inputs(cfg)
    info = distributed.init(cfg.dist, cfg.train.device)
    stop = StopSignal()
    try:
        return train(*setup(cfg, info, stop, inputs))
    finally:
        stop.restore()
        distributed.teardown()
