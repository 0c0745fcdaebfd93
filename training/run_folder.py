"""The run folder: may this run write into it (check_run_dir), may a checkpoint resume here (check_global_batch),
the files every run writes beside its checkpoints (config.toml, tokenizer.json, env.json), and the few lines of its
config the console shows at start-up (config_summary; the whole of it is in config.toml)."""

from __future__ import annotations

import json
from pathlib import Path

from training import checkpoint, distributed
from training.config import Config, set_key, stage_defaults, to_dict, to_toml
from training.distributed import DistInfo
from training.monitor import print0
from training.runinfo import environment_info


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


# Shown on their own lines of the summary, so left out of its list of changed settings.
SUMMARY_OWN_KEYS = ("out", "resume", "init_from", "data.source")


def config_summary(cfg: Config, gcfg, device, precision: str) -> str:
    """What the run trains, on what, how and for how long, and where it writes: a few lines for the console at
    start-up. Every resolved setting is in OUT/config.toml (and TensorBoard's text 'config'), not on the console."""
    lines = [f"gptrain | stage {cfg.stage} | data {cfg.data.source} | out {cfg.out} | device {device} | precision "
             f"{precision}",
             f"shape: {_shape_line(cfg, gcfg)}",
             f"optimizer: {_optimizer_line(cfg.train)}",
             f"schedule: {_schedule_line(cfg.train)}",
             f"budget: {_budget_line(cfg)}"]
    if cfg.stage in ("dpo", "rm", "rl"):  # the stage's own section, compactly
        lines.append(f"{cfg.stage}: " + ", ".join(f"{k} {_shown(v)}" for k, v in to_dict(cfg)[cfg.stage].items()))
    changed = _changed_settings(cfg)
    lines.append(f"changed from the {cfg.stage} defaults: " + (", ".join(changed) if changed else "nothing"))
    board = " (and TensorBoard's text 'config')" if cfg.log.tensorboard else ""
    lines.append(f"every setting: {Path(cfg.out) / 'config.toml'}{board}")
    return "\n".join(lines)


def _shape_line(cfg: Config, gcfg) -> str:
    kv = f" ({gcfg.n_kv_head} key/value)" if gcfg.n_kv_head != gcfg.n_head else ""
    origin = ("the resumed checkpoint's" if cfg.resume else f"from {cfg.init_from}, whose weights it starts from"
              if cfg.init_from else f"preset {cfg.model.preset}")
    options = "".join(f", {text}" for text in _model_options(gcfg))
    return (f"{gcfg.arch}, {gcfg.n_layer} layers x {gcfg.n_embd} wide, {gcfg.n_head} heads{kv}, context "
            f"{gcfg.block_size}, vocab {gcfg.vocab_size}{options} ({origin})")


def _model_options(gcfg) -> list[str]:
    """The speedrun options the model has on (model/gpt.py), in words."""
    named = [("QK-norm", gcfg.qk_norm), ("ReLU-squared MLP", gcfg.relu_squared),
             (f"logits soft-capped at {gcfg.logit_softcap:g}", gcfg.logit_softcap),
             ("residual and x0 scalars", gcfg.residual_scalars),
             (f"{gcfg.value_embeds} value-embedding table(s)", gcfg.value_embeds),
             (f"a {gcfg.bigram_buckets}-row bigram embedding", gcfg.bigram_buckets)]
    return [text for text, on in named if on]


def _optimizer_line(t) -> str:
    adamw = f"adamw lr {t.lr:g} (betas {t.beta1:g}, {t.beta2:g}), weight decay {t.weight_decay:g}"
    muon = f"{'normuon' if t.normuon else 'muon'} lr {t.muon_lr:g} (momentum {t.muon_momentum:g})" + \
        (f", weight decay {t.muon_weight_decay:g}" if t.muon_weight_decay else "")
    opt = f"{muon} on the blocks' matrices, {adamw} on the rest" if t.optimizer == "muon" else adamw
    decay = [word for word, on in (("cautious", t.cautious_decay), ("falling linearly to 0", t.wd_schedule == "linear"))
             if on]
    opt += f" (weight decay {', '.join(decay)})" if decay else ""
    clip = f"gradient norm clipped at {t.grad_clip:g}" if t.grad_clip > 0 else "no gradient clipping"
    return f"{opt}; {clip}"


def _schedule_line(t) -> str:
    if t.schedule == "cosine":
        return f"cosine: {t.warmup_steps} warmup steps, then down to {t.min_lr_ratio:g} x the peak lr at the last step"
    return (f"wsd: {t.warmup_steps} warmup steps, flat, then the last {t.decay_frac:.0%} of the steps decay linearly "
            f"to {t.min_lr_ratio:g} x the peak lr")


def _budget_line(cfg: Config) -> str:
    t, e, c = cfg.train, cfg.eval, cfg.ckpt
    length = (f"{t.time_budget_min:g} min of training (max_steps planned from the measured step time)"
              if t.time_budget_min > 0 else f"{t.max_steps} steps")
    if t.stop_after_steps:
        length += f", stopping after step {t.stop_after_steps}"
    every = f"validation every {e.interval} steps" if e.interval > 0 else "validation at the end"
    return f"{length}; {every}, a checkpoint every {c.interval} steps (newest {c.keep} kept)"


def _changed_settings(cfg: Config) -> list[str]:
    """key=value for every setting that differs from the stage's defaults (what the config file and flags set)."""
    base = Config(stage=cfg.stage)
    for key, value in stage_defaults(cfg.stage).items():
        set_key(base, key, value)
    ours, theirs = _flat(to_dict(cfg)), _flat(to_dict(base))
    return [f"{k}={_shown(v)}" for k, v in ours.items() if v != theirs.get(k) and k not in SUMMARY_OWN_KEYS]


def _shown(value) -> str:
    """A value as it is typed on the command line (true/false, not Python's True/False)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
