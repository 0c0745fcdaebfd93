"""The one training loop, shared by pre-training, SFT and DPO.

run(cfg) reads top to bottom: set up processes -> tokenizer and data -> model (fresh, --init-from or --resume)
-> precision, wrapping, compilation -> optimizer -> the loop -> final validation, sample and checkpoint.
Stages differ only in their data (training/inputs.py) and their objective (training/objectives.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model.gpt import GPT, GPTConfig
from training import checkpoint, distributed
from training.config import Config, check_resume_compatible, from_dict, to_dict, to_toml
from training.distributed import DistInfo, all_reduce, maybe_no_sync
from training.health import activation_hooks, block_grad_norms, update_ratios
from training.inputs import build_stage_data, resolve_tokenizer
from training.monitor import Monitor, Throughput, fmt_duration, print0, step_flops
from training.optim import build_optimizer, lr_at, replan_budget_steps, set_lr, wsd_decay_start
from training.runinfo import environment_info, measure_peak_flops

# Under fp16, this many GradScaler-skipped steps in a row mean the run has diverged.
MAX_CONSECUTIVE_SKIPS = 20
# Steps timed before a wall-clock budget is turned into a step count (after one untimed warm-up step); long
# enough to average out some of the machine-speed noise of a shared CPU.
BUDGET_TIMING_STEPS = 30
# Model fields that --init-from never lets the command line change (the weights fix them).
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio", "arch",
                "tie_embeddings", "bias", "rope_theta")


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, diverged fp16 run); the last good checkpoint stays intact."""


# ----------------------------------------------------------------------------------------------- set-up helpers
def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            print0("warning: fp16 on CPU is emulated and slow; it is meant for tests")
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"  # a CPU without bf16 matrix units runs bf16 matmuls ~100x slower than fp32


def autocast_ctx(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return nullcontext()


def model_config(cfg: Config, base: dict | None, vocab_size: int) -> GPTConfig:
    """The model's shape: the preset plus explicit overrides, or (fine-tuning) the starting checkpoint's shape."""
    overrides = {k: v for k, v in to_dict(cfg)["model"].items() if k != "preset" and v is not None}
    if base is not None:
        for k, v in overrides.items():
            if k in SHAPE_FIELDS and v != base[k]:
                raise ValueError(f"--model.{k}={v!r}: the starting checkpoint has {k}={base[k]!r}; a model's shape "
                                 "cannot change when fine-tuning (only model.dropout can)")
        return GPTConfig.from_dict({**base, **{k: v for k, v in overrides.items() if k not in SHAPE_FIELDS}})
    overrides.setdefault("vocab_size", vocab_size)
    return GPTConfig.from_preset(cfg.model.preset, **overrides)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Each step's random state (dropout) derives from (seed, step, rank), so a resumed run draws the same dropout
    masks as an uninterrupted one on the same world size. On another world size a rank's rows move to another rank
    and get other masks: with dropout > 0 such a resume is a different (equally valid) run, not the same one."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def rng_state() -> dict:
    """The torch generator states of this process: CPU, and the current CUDA device's if there is one (tensors).

    Nothing else: Python's and NumPy's global generators are unused by training (every step reseeds torch from
    step_seed), and a checkpoint holds only what the restricted unpickler loads."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: another machine may have fewer GPUs
    return state


def set_rng_state(state: dict) -> None:
    """Restore rng_state()'s states as far as this machine has them: a checkpoint from a machine with more, fewer or
    no GPUs resumes (the next step reseeds every generator anyway)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # an older gptrain saved every device's state: take this device's, if any
        index = torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)  # the current device


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU, keyed by parameter name, from any wrapper (plain, DDP,
    FSDP2, compiled). Under FSDP every rank must call this: it gathers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return checkpoint.clean_state_dict(msd), osd


def load_full_state(model, optimizer, msd: dict, osd: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd or {}, options=opts)


def load_weights(model: GPT, msd: dict) -> None:
    """Load a checkpoint's weights into an unwrapped model; a tied head may be absent from the dict."""
    msd = checkpoint.clean_state_dict(msd)
    missing, unexpected = model.load_state_dict(msd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")


class StopSignal:
    """SIGTERM / SIGINT request a checkpoint and a clean exit at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print0(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step")

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------- one step's parts
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


class FaultInjection:
    """Test hook: GPTRAIN_FAULT="nan_loss@STEP" or "inf_grad@STEP", optionally ":RANK" (default every rank), makes
    that step's loss NaN or one gradient inf, to exercise the non-finite paths with real processes;
    "slow@STEP" makes every step from STEP on SLOW_FAULT_SECONDS longer (a machine slowing down mid-run).
    Kill -9 at a deterministic moment: "kill@STEP" in the middle of step STEP (after its backward, before its update),
    "kill_after_tmp@STEP" once the save at STEP has written and fsynced its temporary file, "kill_after_rename@STEP"
    once that file is renamed into place but before the `latest` pointer is rewritten."""

    KINDS = ("nan_loss", "inf_grad", "slow", "kill", "kill_after_tmp", "kill_after_rename")
    SAVE_EVENTS = {"kill_after_tmp": "tmp_written", "kill_after_rename": "renamed"}  # checkpoint.save's hook events
    SLOW_FAULT_SECONDS = 0.1

    def __init__(self, spec: str) -> None:
        kind, _, where = spec.partition("@")
        step, _, rank = where.partition(":")
        if kind not in self.KINDS or not step.isdigit():
            raise ValueError(f"GPTRAIN_FAULT={spec!r}: expected KIND@STEP[:RANK], KIND one of {self.KINDS}")
        self.kind, self.step, self.rank = kind, int(step), int(rank) if rank else None

    def due(self, step: int, rank: int) -> bool:
        """Whether the mid-step fault fires in step `step` (1-based) on `rank`."""
        if self.kind in self.SAVE_EVENTS:
            return False
        return (step >= self.step if self.kind == "slow" else step == self.step) and self.rank in (None, rank)

    def apply(self, loss_sum: torch.Tensor, params: list[torch.Tensor]) -> None:
        if self.kind == "nan_loss":
            loss_sum.fill_(float("nan"))
        elif self.kind == "inf_grad":
            params[0].grad.view(-1)[0] = float("inf")
        elif self.kind == "kill":
            self.kill()
        else:
            time.sleep(self.SLOW_FAULT_SECONDS)

    def save_hook(self, step: int, rank: int):
        """checkpoint.save's hook for the save at `step`: kills the process at this fault's event, if it is due."""
        def hook(event: str) -> None:
            if self.SAVE_EVENTS.get(self.kind) == event and step == self.step and self.rank in (None, rank):
                self.kill()
        return hook

    @staticmethod
    def kill() -> None:
        print0("GPTRAIN_FAULT: SIGKILL")
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------- run folder
def check_global_batch(resumed: dict, batch_size: int, world_size: int) -> None:
    """A run resumes on any number of processes when batch_size x world size (the sequences of one micro-step) is
    kept: the data order and the step size then continue unchanged. Anything else is refused."""
    old_b, old_w = resumed["config"]["train"]["batch_size"], resumed.get("world_size", 1)
    if old_b * old_w != batch_size * world_size:
        hint = f"; use --train.batch_size={old_b * old_w // world_size}" if old_b * old_w % world_size == 0 else ""
        raise ValueError(f"--resume: the checkpoint was trained with {old_w} process(es) x train.batch_size={old_b}; "
                         f"this run has {world_size} x {batch_size}. The global batch must stay {old_b * old_w} "
                         f"sequences per micro-step to continue the same data order and schedule{hint}")


def check_run_dir(cfg: Config) -> None:
    out = Path(cfg.out)
    holds_run = (out / "config.toml").exists() or (out / checkpoint.CKPT_DIR).exists()
    if cfg.resume:
        if checkpoint.latest(out) is None:
            if not distributed.elastic_restarts():
                raise ValueError(f"--resume: {out} holds no complete checkpoint to resume from")
            # torchrun --max-restarts: one command line starts the run and resumes it after each restart
            print0(f"--resume: {out} holds no checkpoint yet; starting the run")
    elif holds_run:
        raise ValueError(f"{out} already holds a run; use --resume to continue it or choose another --out")


def write_run_files(cfg: Config, tok, info: DistInfo) -> None:
    if not info.is_main:
        return
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_bytes(out / "config.toml", to_toml(cfg).encode())
    tok.save(out / "tokenizer.json")
    env = environment_info()
    env["world_size"] = info.world_size
    checkpoint.atomic_write_bytes(out / ("env.json" if not cfg.resume else "env.resume.json"),
                                  json.dumps(env, indent=2).encode())


# ----------------------------------------------------------------------------------------------- the run
def run(cfg: Config) -> dict:
    """Train according to cfg; returns a summary (final validation figures, steps, run folder)."""
    info = distributed.init(cfg.dist, cfg.train.device)
    stop = StopSignal()
    try:
        return _run(cfg, info, stop)
    finally:
        stop.restore()
        distributed.teardown()


def _run(cfg: Config, info: DistInfo, stop: StopSignal) -> dict:
    t = cfg.train
    check_run_dir(cfg)
    distributed.barrier()  # every rank has looked at the run folder before rank 0 writes to it
    device = info.device
    precision = resolve_precision(t.precision, device)
    if precision == "fp16" and cfg.dist.strategy == "fsdp":
        raise ValueError("--train.precision=fp16 is not supported with --dist.strategy=fsdp (use bf16)")
    if t.optimizer == "muon" and cfg.dist.strategy == "fsdp" and info.distributed:
        raise ValueError("--train.optimizer=muon needs whole gradient matrices; it is not supported with "
                         "--dist.strategy=fsdp: pass --train.optimizer=adamw (muon is the pre-training default, the "
                         "CPU speedrun's optimizer) or use --dist.strategy=ddp")

    # ---- where the weights come from: a resumed checkpoint, a starting run (--init-from), or nothing
    resumed = checkpoint.load(cfg.out) if cfg.resume and checkpoint.latest(cfg.out) is not None else None
    start = checkpoint.load(cfg.init_from) if cfg.init_from and not cfg.resume else None
    if resumed is not None:
        check_resume_compatible(from_dict(resumed["config"]), cfg)
        check_global_batch(resumed, t.batch_size, info.world_size)
    base_model_cfg = (resumed or start or {}).get("model_config")

    # ---- tokenizer, model shape, data
    tok = resolve_tokenizer(cfg, info, resumed or start)
    gcfg = model_config(cfg, base_model_cfg, tok.vocab_size)
    if gcfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={gcfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    data = build_stage_data(cfg, tok, gcfg, info)

    print0(f"gptrain | stage {cfg.stage} | out {cfg.out} | device {device} | precision {precision}")
    print0(to_toml(cfg))
    # ---- model
    torch.manual_seed(t.seed)
    raw = GPT(gcfg).to(device)
    if resumed is not None:
        load_weights(raw, resumed["model"])
    elif start is not None:
        load_weights(raw, start["model"])
    # The exact checkpoint file this run started from: recorded in every checkpoint, and where a resumed DPO run
    # finds its reference (the run folder named by init_from may have moved on since).
    init_ckpt = str(Path(start["path"]).resolve()) if start is not None else (resumed or {}).get("init_from_checkpoint")
    reference = None
    if cfg.stage == "dpo":  # a frozen copy of the starting weights: eval mode, no gradients
        reference = copy.deepcopy(raw).eval().requires_grad_(False)
        if resumed is not None:  # raw now holds the trained policy; the reference is the run's starting point
            if not init_ckpt or not Path(init_ckpt).is_file():
                raise ValueError(f"--resume of a DPO run needs its reference, the starting checkpoint "
                                 f"{init_ckpt or cfg.init_from!r}, which is gone")
            load_weights(reference, checkpoint.load(init_ckpt)["model"])
    flops_per_token = raw.flops_per_token()
    print0(f"model: {gcfg.arch}, {raw.num_params() / 1e6:.2f}M parameters "
           f"({raw.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), {flops_per_token / 1e6:.1f} MFLOP/token "
           f"at T={gcfg.block_size} (6N + 12LdT, as train/mfu counts)")

    param_dtype = torch.bfloat16 if precision == "bf16" else None
    model = distributed.wrap_model(raw, cfg.dist.strategy, info, param_dtype)
    if t.compile:
        model = torch.compile(model)
    # FSDP2 applies its own mixed precision; autocast is for the unsharded model.
    autocast = autocast_ctx(precision if cfg.dist.strategy != "fsdp" or not info.distributed else "fp32", device)
    if reference is not None:  # on the policy's numeric path: at step 0 (dropout 0) its log-probs equal the policy's
        reference = distributed.wrap_reference(reference, cfg.dist.strategy, info, param_dtype)
    objective = data.make_objective(reference, autocast, precision)
    if cfg.stage == "dpo" and cfg.dpo.ref_cache:
        reference = None  # the objective holds cached log-probs; the copy can go
    # Validation and sampling use the plain module (no DDP hooks, no recompilation for odd shapes), except under
    # FSDP, where the forward itself gathers the shards and every rank runs it.
    eval_model = model if cfg.dist.strategy == "fsdp" and info.distributed else raw
    optimizer = build_optimizer(model, t, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))

    # ---- state: fresh or resumed
    step, sched_step, skipped, consecutive_skips, tokens_seen, elapsed_before = 0, 0, 0, 0, 0, 0.0
    max_steps = t.max_steps if t.time_budget_min <= 0 else None
    if resumed is not None:
        load_full_state(model, optimizer, resumed["model"], resumed["optimizer"])
        if resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        data.train.load_state_dict(resumed["loader"])
        set_rng_state(resumed["rng"])
        step, sched_step = resumed["step"], resumed["sched_step"]
        skipped, tokens_seen = resumed["skipped_steps"], resumed["tokens_seen"]
        elapsed_before = resumed["elapsed"]
        # A time budget's step count is saved: the resumed run follows it (re-planned, as any budget run, while
        # warmup-stable-decay's learning rate is still flat).
        max_steps = resumed["max_steps"] if t.time_budget_min > 0 or cfg.train.max_steps == \
            from_dict(resumed["config"]).train.max_steps else t.max_steps
        print0(f"resumed from {resumed['path']} at step {step}")
    write_run_files(cfg, tok, info)
    del resumed, start

    monitor = Monitor(cfg.out, enabled=info.is_main, tensorboard=cfg.log.tensorboard)
    monitor.text("config", to_toml(cfg), step)
    peak = t.peak_flops or measure_peak_flops(device, precision)
    tokens_per_step = data.tokens_per_micro_batch * t.grad_accum * info.world_size
    print0(f"world size {info.world_size} ({info.backend or 'single process'}), per-device batch {t.batch_size} x "
           f"{gcfg.block_size} tokens, accumulation {t.grad_accum}, global batch {tokens_per_step} tokens/step")
    params = [p for p in model.parameters() if p.requires_grad]
    fault = FaultInjection(os.environ["GPTRAIN_FAULT"]) if os.environ.get("GPTRAIN_FAULT") else None

    def save(reason: str) -> None:
        msd, osd = full_state(model, optimizer)  # every rank takes part (FSDP gathers)
        if info.is_main:
            state = {
                "model": msd, "optimizer": osd, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "step": step, "sched_step": sched_step, "max_steps": max_steps, "skipped_steps": skipped,
                "tokens_seen": tokens_seen, "elapsed": elapsed_before + (time.perf_counter() - t_start),
                "config": to_dict(cfg), "model_config": gcfg.to_dict(), "tokenizer": tok.backend.to_str(),
                "tokenizer_hash": tok.hash, "loader": data.train.state_dict(), "rng": rng_state(),
                "world_size": info.world_size, "init_from": cfg.init_from, "stage": cfg.stage,
                "init_from_checkpoint": init_ckpt,
            }
            hook = fault.save_hook(step, info.rank) if fault is not None else None
            path = checkpoint.save(cfg.out, step, state, keep=cfg.ckpt.keep, hook=hook)
            print0(f"saved {path} ({reason})")
        distributed.barrier()

    def run_validation(final: bool = False) -> dict[str, float]:
        # The final validation scores the whole held-out split; periodic ones may score a fixed prefix.
        figures = data.validate(eval_model, autocast, info, full=final)
        monitor.scalars(step, {f"val/{k}": v for k, v in figures.items()})
        print0("val " + " | ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        return figures

    def sample() -> None:
        text = data.sample(eval_model, autocast)
        print0(f"--- sample at step {step} ---\n{text}\n---")
        monitor.text("sample", text, step)

    # ---- the loop
    t_start, start_step = time.perf_counter(), step
    val_figures = run_validation() if step == 0 and cfg.eval.interval > 0 else {}
    first_val = dict(val_figures)
    throughput = Throughput(peak * info.world_size)
    live_reference = cfg.stage == "dpo" and not cfg.dpo.ref_cache  # its forward passes count as model FLOPs
    budget_window_start, window_step = None, 0
    health_due = False
    # max_steps counts applied updates (sched_step == step - skipped): an fp16-skipped step is attempted again, so
    # the schedule's last steps, down to its floor, all run.
    while max_steps is None or sched_step < max_steps:
        if t.stop_after_steps and step >= t.stop_after_steps:
            save("stop_after_steps")
            break
        torch.manual_seed(step_seed(t.seed, step, info.rank))
        # All micro-batches of the step first: their supervised-token count, summed over ranks, is the divisor.
        batches = [data.train_batch() for _ in range(t.grad_accum)]
        count = sum(objective.count(b) for b in batches).to(device=device, dtype=torch.float32)
        all_reduce(count)
        # Until a time budget has been turned into max_steps, the schedule is in its warmup/stable part.
        lr = lr_at(sched_step, max_steps if max_steps is not None else 10**9, t)
        set_lr(optimizer, lr / t.lr)
        health_due = cfg.log.health_interval > 0 and (step + 1) % cfg.log.health_interval == 0
        hist_due = cfg.log.hist_interval > 0 and (step + 1) % cfg.log.hist_interval == 0
        hooks = activation_hooks(raw, monitor, step + 1) if hist_due and info.is_main else []

        loss_sum, metric_sums = accumulate_gradients(model, objective, batches, count, info.world_size, autocast,
                                                     scaler, cfg.dist.strategy)
        for h in hooks:
            h.remove()
        if fault is not None and fault.due(step + 1, info.rank):
            fault.apply(loss_sum, params)
        unscale_gradients(optimizer, scaler)
        # Before clipping, as train/grad_norm: every rank (under FSDP this gathers)
        block_norms = block_grad_norms(raw) if health_due else None
        grad_norm = clip_gradients(params, t.grad_clip)
        before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]] if health_due else None

        # One host sync per step: the reduced loss and metrics, the stop request of any rank.
        flags = torch.tensor([float(stop.requested)], device=device)
        all_reduce(loss_sum)
        all_reduce(flags, op="max")
        for v in metric_sums.values():
            all_reduce(v)
        loss_value, grad_norm_value, stop_any = loss_sum.item() / max(count.item(), 1), grad_norm.item(), flags.item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"non-finite loss ({loss_value}) at step {step + 1}: stopping before the optimizer "
                                f"step; the last good checkpoint in {cfg.out} is intact")
        if not scaler.is_enabled() and not math.isfinite(grad_norm_value):
            raise TrainingError(f"non-finite gradient norm ({grad_norm_value}) at step {step + 1}: stopping before "
                                f"the optimizer step; the last good checkpoint in {cfg.out} is intact")
        skipped_now = apply_update(optimizer, scaler)
        optimizer.zero_grad(set_to_none=True)
        if skipped_now:
            skipped += 1
            consecutive_skips += 1
            print0(f"step {step + 1}: fp16 gradients overflowed, update skipped (scale now {scaler.get_scale():g})")
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise TrainingError(f"{consecutive_skips} fp16 steps in a row were skipped (inf/NaN gradients): "
                                    f"the run has diverged; the last good checkpoint in {cfg.out} is intact")
        else:
            consecutive_skips = 0
            sched_step += 1  # a skipped step does not advance the LR schedule
        step += 1
        # Tokens and model FLOPs actually processed: SFT/DPO rows are padded to the global batch's longest example,
        # not block_size (every rank pads to the same length, so this rank's count times the world size is global).
        step_tokens = sum(data.batch_tokens(b) for b in batches) * info.world_size
        tokens_seen += step_tokens
        throughput.add(step_tokens, step_flops(raw, batches, live_reference) * info.world_size)

        # ---- a wall-clock budget becomes a step count after a short timing window, re-planned while the lr is flat
        if t.time_budget_min > 0:
            if budget_window_start is None:  # the first step of this process (compilation, warm-up) is not timed
                budget_window_start, window_step = time.perf_counter(), step
            elif (step - window_step) % BUDGET_TIMING_STEPS == 0 and (max_steps is None or (
                    t.schedule == "wsd" and sched_step < wsd_decay_start(max_steps, t))):
                now = time.perf_counter()
                # The budget covers the steps and the periodic validations, including the time an interrupted run
                # had already spent.
                remaining = t.time_budget_min * 60 - elapsed_before - (now - t_start)
                per_step = (now - budget_window_start) / (step - window_step)  # validations and saves included
                per_step_all = per_step  # the first plan: no periodic validation in the window yet (one at step 0)
                if max_steps is None and cfg.eval.interval:
                    per_step_all += data.last_val_seconds / cfg.eval.interval
                # Under wsd the machine's drift moves the end (and so the decay's start) to fit the budget
                planned = replan_budget_steps(sched_step, remaining, per_step_all, t) if t.schedule == "wsd" \
                    else sched_step + max(int(remaining / per_step_all), 0)
                planned = distributed.broadcast_object(planned)  # rank 0's count: every rank stops together
                if max_steps is None:
                    print0(f"time budget {t.time_budget_min:g} min: {per_step * 1000:.1f} ms/step -> "
                           f"max_steps={planned}")
                elif abs(planned - max_steps) > 0.02 * max_steps or sched_step + BUDGET_TIMING_STEPS >= \
                        wsd_decay_start(planned, t):
                    print0(f"time budget: {per_step * 1000:.1f} ms/step so far -> max_steps={planned} (was "
                           f"{max_steps}; the decay starts at step {wsd_decay_start(planned, t)})")
                max_steps = planned

        # ---- logging
        if health_due:
            ratios = update_ratios(optimizer, before)
            if info.is_main:
                monitor.scalars(step, {**{f"grad_norm/{k}": v for k, v in block_norms.items()},
                                       **{f"update_ratio/{k}": v for k, v in ratios.items()}})
        if hist_due:  # every rank: under FSDP each full weight is gathered (a collective); rank 0 writes it
            for name, p in raw.named_parameters():
                monitor.histogram(f"weights/{name}", p.full_tensor() if hasattr(p, "full_tensor") else p, step)
        if step % cfg.log.interval == 0 or sched_step == max_steps:
            tps, mfu = throughput.report()
            elapsed = elapsed_before + time.perf_counter() - t_start
            eta = (max_steps - sched_step) * (time.perf_counter() - t_start) / max(step - start_step, 1) \
                if max_steps else float("nan")
            scal = {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm_value,
                    "train/tokens_per_sec": tps, "train/mfu": mfu, "train/tokens_seen": tokens_seen}
            if scaler.is_enabled():
                scal["train/grad_scale"] = scaler.get_scale()
                scal["train/skipped_steps"] = skipped
            units = count.item()
            scal.update({f"train/{k}": v.item() / max(units, 1) for k, v in metric_sums.items()})
            monitor.scalars(step, scal)
            extra = "".join(f" | {k} {v.item() / max(units, 1):.3f}" for k, v in metric_sums.items()
                            if k in ("rewards/accuracies", "rewards/margins"))
            last = max_steps + skipped if max_steps else "?"  # the step the run ends at if no more are skipped
            print0(f"step {step:5d}/{last} | loss {loss_value:.4f} | lr {lr:.2e} | gnorm "
                   f"{grad_norm_value:.3f} | {tps:,.0f} tok/s | mfu {100 * mfu:.1f}%{extra} | "
                   f"{fmt_duration(elapsed)} elapsed | eta {fmt_duration(eta) if math.isfinite(eta) else '?'}")

        done = max_steps is not None and sched_step >= max_steps
        if cfg.eval.interval and step % cfg.eval.interval == 0 and not done:
            val_figures = run_validation()
            throughput.reset()
        if cfg.eval.sample_interval and step % cfg.eval.sample_interval == 0 and not done:
            sample()
            throughput.reset()
        if stop_any:
            save("signal")
            break
        if step % cfg.ckpt.interval == 0 and not done:
            save("interval")
            throughput.reset()
    else:
        # ---- the end of the schedule: final validation, a sample, the last checkpoint
        val_figures = run_validation(final=True)
        sample()
        save("end")
        monitor.hparams({f"{k}": v for k, v in {"stage": cfg.stage, "preset": cfg.model.preset, "lr": t.lr,
                                                "batch_size": t.batch_size, "max_steps": max_steps}.items()},
                        {f"hparam/val_{k}": v for k, v in val_figures.items()})
    monitor.close()
    return {"out": cfg.out, "step": step, "max_steps": max_steps, "val": val_figures, "first_val": first_val,
            "skipped_steps": skipped}
