"""Configuration: typed dataclasses, a TOML file, command-line overrides, validation.

Resolution order: dataclass defaults -> the stage's defaults (`defaults` of its class in training/stages/, the
stage names are that table's) ->
`--config FILE.toml` -> `--section.key=value` flags. An unknown key or a value of the wrong type is an error that
names the key and suggests the closest valid one. The resolved config is saved with every checkpoint.

Each field is declared with `option(default, help, choices)`: its one-line description and, for enum-like keys, the
values it accepts live beside it and nowhere else. `--help` (anywhere on the line) prints them, grouped by section,
with the values this command line resolves to; `set_key` and `validate` enforce the same choices (CHOICES).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shlex
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from data.tokenizer import PRETOKENIZERS
from model.gpt import ARCHS, PRESETS, GPTConfig, preset_values
from model.losses import DPO_LOSS_TYPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def option(default, help: str, choices: tuple = ()) -> typing.Any:
    """A config field with its one-line `--help` text and, for enum-like options, the values it accepts.

    The help and the choices live here, beside the field, and nowhere else: `--help` prints them, and `set_key` and
    `validate` enforce the choices (through CHOICES, derived from these fields).
    """
    return field(default=default, metadata={"help": help, "choices": tuple(choices)})


@dataclass
class ModelSection:
    """the network's shape: the preset's (shown), a key set here overrides it; --init-from: the run's shape"""

    preset: str = option("tiny", "named shape (model/gpt.py PRESETS)", tuple(PRESETS))
    vocab_size: int | None = option(None, "tokenizer and embedding size")
    block_size: int | None = option(None, "context length in tokens")
    n_layer: int | None = option(None, "transformer blocks")
    n_head: int | None = option(None, "query heads")
    n_kv_head: int | None = option(None, "key/value heads (grouped-query attention); 0 = n_head")
    n_embd: int | None = option(None, "residual width")
    mlp_ratio: float | None = option(None, "MLP hidden width / n_embd")
    dropout: float | None = option(None, "dropout probability (may change at fine-tuning; DPO defaults to 0)")
    tie_embeddings: bool | None = option(None, "share input embedding and output head")
    arch: str | None = option(None, "modern: RoPE RMSNorm SwiGLU; gpt2: learned positions, LayerNorm, GELU", ARCHS)
    bias: bool | None = option(None, "biases in linear layers and norms")
    rope_theta: float | None = option(None, "rotary base frequency")
    init_std: float | None = option(None, "std of the normal initialisation")
    zero_init_residual: bool | None = option(None, "attention and MLP output projections start at zero")
    # The candidate options of model/gpt.py's docstring, all off by default.
    qk_norm: bool | None = option(None, "RMSNorm on each head's queries and keys before RoPE (modern; Qwen3 export)")
    relu_squared: bool | None = option(None, "MLP down(relu(up(x))^2) instead of SwiGLU (modern; 2/3 the MLP weights)")
    logit_softcap: float | None = option(None, "logits = cap * tanh(logits / cap); 0 = off")
    residual_scalars: bool | None = option(None, "block l reads lambda_l x + mu_l x0 (x0: embedding output; init 1, 0)")
    value_embeds: int | None = option(None, "tables added to the values of the first and last this many layers; 0 = off")
    bigram_buckets: int | None = option(None, "rows of the hashed bigram embedding (prev, token); 0 = off")


@dataclass
class DataSection:
    """the text (pretrain) or the records (sft, dpo), and the tokenizer"""

    source: str = option("stdlib", "stdlib, synthetic, hf:NAME[:CONFIG], a file or folder (txt jsonl json parquet csv)")
    text_column: str = option("text", "column holding the text in tabular sources")
    tokenizer: str = option("", "an existing tokenizer.json to use instead of training one")
    cache_dir: str = option("", "cache of tokenizers and token shards ('' = $GPTRAIN_CACHE or ~/.cache/gptrain)")
    num_proc: int = option(0, "worker processes that tokenize and write the shards (0 = all cores)")
    tokenizer_max_mb: float = option(8.0, "the tokenizer trains on the first this many MB of the training stream")
    pretokenizer: str = option("gpt2", "where a trained tokenizer's merges stop: gpt2 (words), lines, none",
                               PRETOKENIZERS)
    max_tokens: int = option(0, "stop reading once the training split holds this many tokens (0 = no cap)")
    max_docs: int = option(0, "stop reading once the training split holds this many documents (0 = no cap)")
    val_fraction: float = option(0.01, "held-out share of documents (by hash) for a source without a validation split")
    chunk_tokens: int = option(2**27, "tokens per shard file (the last one of a split is shorter)")
    synthetic_train: int = option(4000, "examples in the built-in synthetic fine-tuning task (train split)")
    synthetic_val: int = option(200, "examples in the built-in synthetic fine-tuning task (validation split)")
    pack: bool = option(False, "sft: pack several examples per row (block-diagonal attention, restarted positions)")


@dataclass
class TrainSection:
    """the optimizer, its schedule and the length of the run"""

    # An fp16-skipped step is attempted again; the logged step counts attempts.
    max_steps: int = option(2000, "applied updates; the lr schedule ends here (time_budget_min replaces it when set)")
    stop_after_steps: int = option(0, "stop (with a checkpoint) after this step, the schedule unchanged; 0 = off")
    # Re-planned under wsd while the lr is flat. Pretrain's stage default is 10 (the CPU speedrun); a train.max_steps
    # given without a budget turns the budget off.
    time_budget_min: float = option(0.0, "loop wall-clock minutes, planned into max_steps (re-planned under wsd); 0 = off")
    batch_size: int = option(32, "sequences per process per micro-step")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    # A batch-size schedule: update s (0-based) accumulates 1 + (grad_accum - 1) x s // N micro-steps while s < N.
    # Step-based, so a time budget (which plans from the time a step takes) is refused with it.
    accum_ramp_steps: int = option(0, "micro-steps ramp from 1 to grad_accum over the first N updates (0 = off)")
    # A sequence-length schedule (pre-training): the same tokens in the same order, each block_size window cut into
    # block_size / seq_warmup_len rows for the first seq_warmup_steps updates (attention over a shorter context).
    seq_warmup_len: int = option(0, "pretrain: rows this long (dividing block_size) for the first seq_warmup_steps")
    seq_warmup_steps: int = option(0, "pretrain: updates trained on rows of seq_warmup_len tokens (0 = off)")
    lr: float = option(3e-3, "peak learning rate (with muon: of the parameters AdamW updates)")
    min_lr_ratio: float = option(0.1, "the schedule ends at lr x min_lr_ratio")
    warmup_steps: int = option(50, "linear warmup from 0, in steps")
    schedule: str = option("wsd", "wsd: warmup, stable, linear decay over the last decay_frac of steps",
                           ("cosine", "wsd"))
    decay_frac: float = option(0.3, "wsd: share of steps spent decaying")
    optimizer: str = option("adamw", "muon: Muon for the blocks' matrices, AdamW at train.lr for the rest",
                            ("adamw", "muon"))
    muon_lr: float = option(0.02, "peak learning rate of the Muon matrices")
    muon_momentum: float = option(0.95, "momentum of the Muon matrices")
    # NorMuon (Li et al. 2025): v <- beta2 v + (1 - beta2) mean over a row of O^2, per row (output neuron) of the
    # orthogonalised update O, beta2 being train.beta2; O / (sqrt(v) + eps) is rescaled to O's own Frobenius norm
    # (the paper scales to 0.2 sqrt(rows x cols) lr instead), so train.muon_lr keeps its meaning.
    normuon: bool = option(False, "with muon: NorMuon, each row of the orthogonalised update over its running RMS")
    muon_weight_decay: float = option(0.0, "decoupled weight decay of the Muon matrices (w *= 1 - muon lr x this)")
    # Cautious weight decay (Chen et al. 2025): w -= lr (u + wd 1[u w >= 0] w), u the update's direction (w moves
    # by -lr u): the decay is applied only where it pulls the same way as the update.
    cautious_decay: bool = option(False, "weight decay only where the update and the weight share a sign")
    wd_schedule: str = option("constant", "linear: the weight decays fall linearly to 0 at the last update",
                              ("constant", "linear"))
    # w *= 1 - lr x weight_decay per step, lr being the group's scheduled lr. With adamw: every 2-D weight (the
    # blocks' linear layers, the token embedding = the tied head, gpt2's position embedding, an untied head); with
    # muon: only those embeddings and an untied head (at train.lr) -- the blocks' Muon matrices get
    # train.muon_weight_decay instead (0 by default). Under train.wd_schedule=linear, both are multiplied by
    # 1 - (step + 1) / max_steps (step 0-based): 0 at the last update.
    weight_decay: float = option(0.1, "decoupled, on the 2-D weights AdamW updates (never norms, biases or Muon's matrices)")
    beta1: float = option(0.9, "AdamW's first-moment decay")
    beta2: float = option(0.95, "AdamW's second-moment decay (and NorMuon's per-row one)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off); the pre-clip norm is logged")
    seed: int = option(1337, "seed of the initialisation, data order, dropout and samples")
    precision: str = option("auto", "auto: bf16 on CUDA that supports it, else fp32", PRECISIONS)
    compile: bool = option(False, "torch.compile the model")
    device: str = option("auto", "auto: cuda when available, else cpu", ("auto", "cpu", "cuda"))
    peak_flops: float = option(0.0, "device peak FLOP/s for MFU (0 = known GPU peak, or measured CPU matmul peak)")


@dataclass
class EvalSection:
    """validation and generated samples"""

    interval: int = option(500, "validate every N steps (and at the start and end); 0 = only at the end")
    # The final pre-training validation always scores the whole split.
    max_tokens: int = option(32768, "validation tokens scored per periodic validation (0 = all)")
    sample_interval: int = option(500, "log a generated sample every N steps and at the end (0 = only at the end)")
    sample_prompt: str = option("def ", "prompt of the samples (chat stages use a validation prompt)")
    sample_tokens: int = option(96, "tokens generated per sample")
    temperature: float = option(0.8, "sampling temperature of the samples")
    # 20, not 50: on the default 10-minute run, top-k 50 at 0.8 lets in made-up identifiers and broken syntax, 0.7
    # and below falls into loops ("the name of the name of"); compared by eye on two runs, six seeds (README).
    top_k: int = option(20, "samples draw from the k most likely tokens (0 = all)")


@dataclass
class LogSection:
    """console, TensorBoard and metrics.jsonl"""

    interval: int = option(10, "console line, TensorBoard scalars and metrics.jsonl every N steps")
    health_interval: int = option(100, "per-block pre-clip gradient norms and update/weight ratios every N steps (0 = off)")
    hist_interval: int = option(500, "weight and activation histograms every N steps (0 = off)")
    tensorboard: bool = option(True, "write TensorBoard event files")


@dataclass
class HealthSection:
    """warnings in words (console, TensorBoard text health/KIND, counted in the run summary); training/health.py"""

    # Defaults measured on default runs (README): pre-training's pre-clip norm peaks near 2 x train.grad_clip, SFT's
    # first three steps near 10 x (10.8, 9.7, 9.5), then 6-8 x to step 11 and under 3.2 x from step 20; every group's
    # norm is at least 1/45 of the largest group's (the smallest: the final norm's, a few hundred weights).
    explode_factor: float = option(10.0, "exploding: the pre-clip gradient norm above this x train.grad_clip ...")
    explode_steps: int = option(20, "... for this many steps in a row (0 = off; off when train.grad_clip is 0)")
    vanish_ratio: float = option(1e-3, "vanishing: a group's gradient norm below this x the largest group's (0 = off)")
    # Per-step ratios / (lr / peak lr) of default runs span 4e-5 (DPO's norms at lr 1e-4: ~0.4 x the lr) to 0.15
    # (AdamW's first, sign-like step on weights of std 0.02: lr / 0.02); a smaller fine-tuning lr scales the low end
    # down (DPO at lr 1e-6: ~4e-7), and must not warn. Below 1e-8 the weights effectively do not move: 1e-4 of their
    # norm in 10,000 steps, and fp32 rounds away most per-weight changes under ~6e-8 of the weight.
    ratio_low: float = option(1e-8, "update/weight ratio per step below this x lr / peak lr: lr too low (0 = off)")
    ratio_high: float = option(0.3, "update/weight ratio per step above this x lr / peak lr: lr too high (0 = off)")
    # 2, not more: default fine-tuning validates twice before its final validation (which does not count), after the
    # step-0 one (SFT at 0, 200, 400; DPO 0, 50, 100; RM 0, 500, 1000): 2 rises at most. Replayed on the default
    # runs' logged val/train losses (pre-training, SFT, DPO, RM) it raises no warning.
    overfit_evals: int = option(2, "overfitting: val loss rose this many evaluations in a row, train loss fell (0 = off)")


@dataclass
class CkptSection:
    """checkpoints in the run folder"""

    interval: int = option(500, "save every N steps (and at the end)")
    keep: int = option(2, "keep the newest k checkpoints (by step) and always the one just written")


@dataclass
class DistSection:
    """several processes (torchrun)"""

    strategy: str = option("ddp", "fsdp: FSDP2 fully_shard", ("ddp", "fsdp"))
    backend: str = option("auto", "auto: nccl on CUDA, gloo on CPU", ("auto", "nccl", "gloo"))
    timeout_min: float = option(10.0, "collective timeout in minutes")


@dataclass
class DPOSection:
    """direct preference optimisation (--stage dpo)"""

    beta: float = option(0.1, "scale of the implicit reward beta x (policy - reference) log-ratio")
    loss_type: str = option("sigmoid", "DPO; label-noise-robust DPO; IPO; SLiC-style hinge", DPO_LOSS_TYPES)
    label_smoothing: float = option(0.0, "cDPO / robust DPO label-noise rate")
    ref_cache: bool = option(False, "compute reference log-probs once before training, cache on disk, free the reference")


@dataclass
class RMSection:
    """reward model (--stage rm)"""

    data: str = option("pairs", "preference pairs (Bradley-Terry loss) or rated completions (MSE)", ("pairs", "ratings"))
    standardize: bool = option(False, "ratings: train on (score - mean) / std of the training split's scores")


@dataclass
class RLSection:
    """online reinforcement learning (--stage rl): train.batch_size prompts per micro-step, num_generations each"""

    num_generations: int = option(8, "completions sampled per prompt (a group; at least 2)")
    max_new_tokens: int = option(24, "tokens generated per completion at most")
    temperature: float = option(1.0, "sampling temperature; log-probs (old, new, reference) use the same scaled logits")
    reward: str = option("", "builtin, package.module:function (TRL's signature), comma-separated ('' = builtin)")
    reward_weights: str = option("", "weights of the rewards, reward_model last ('' = 1 each)")
    reward_model: str = option("", "--stage rm run(s) scoring the completions (replace builtin unless both named)")
    reward_model_combine: str = option("min", "an ensemble's standardised scores per completion: the worst or the mean",
                                       ("min", "mean"))
    scale_rewards: str = option("group", "(r - group mean) / (std + 1e-4): the group's, the batch's or 1",
                                ("group", "batch", "none"))
    beta: float = option(0.04, "weight of the per-token KL estimate exp(r - p) - (r - p) - 1 to the reference")
    clip_eps: float = option(0.2, "clip of the ratio to the policy that generated the batch: [1 - eps, 1 + eps]")
    updates_per_batch: int = option(1, "optimizer steps on each generated batch (train.max_steps counts these)")
    filter_groups: bool = option(False, "leave groups of all-equal rewards out of the update and reference pass")


@dataclass
class Config:
    """the stage, the run folder and where the run starts"""

    # choices: the stage table (training/stages/__init__.py:STAGES), read through choices("stage")
    stage: str = option("pretrain", "all but pretrain fine-tune the --init-from run")
    out: str = option("runs/default", "run folder")
    init_from: str = option("", "run folder to start from (weights, model config, tokenizer); fresh optimizer")
    resume: bool = option(False, "continue from the newest complete checkpoint in `out` (highest step)")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    health: HealthSection = field(default_factory=HealthSection)
    ckpt: CkptSection = field(default_factory=CkptSection)
    dist: DistSection = field(default_factory=DistSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    rm: RMSection = field(default_factory=RMSection)
    rl: RLSection = field(default_factory=RLSection)


def _sections(cfg: Config) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}


def _option_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every settable dotted key -> (its type, its dataclass field), in the order of the dataclasses."""
    keys: dict[str, tuple[type, dataclasses.Field]] = {}
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        if dataclasses.is_dataclass(hints[f.name]):
            sub_hints = typing.get_type_hints(hints[f.name])
            for sf in fields(hints[f.name]):
                keys[f"{f.name}.{sf.name}"] = (sub_hints[sf.name], sf)
        else:
            keys[f.name] = (hints[f.name], f)
    return keys


def all_keys() -> dict[str, tuple[type, object]]:
    """Every settable dotted key -> (type, default)."""
    return {key: (tp, f.default) for key, (tp, f) in _option_fields().items()}


# The values each enum-like key accepts, from the fields' metadata: what --help prints is what is enforced.
CHOICES: dict[str, tuple] = {key: f.metadata["choices"] for key, (_, f) in _option_fields().items()
                             if f.metadata.get("choices")}


def stage_table() -> dict:
    """The stages by name: training/stages/__init__.py:STAGES, the one list of stages, each class holding its own
    defaults. Imported when first asked for, since the stage modules import this module."""
    from training.stages import STAGES

    return STAGES


def stage_defaults(stage: str) -> dict:
    """A stage's defaults (`Stage.defaults`), applied before the TOML file and the flags."""
    return stage_table()[stage].defaults


def choices(key: str) -> tuple:
    """The values `key` accepts; empty when any value of its type is fine."""
    return tuple(stage_table()) if key == "stage" else CHOICES.get(key, ())


def _check_choice(key: str, value) -> None:
    allowed = choices(key)
    if allowed and value is not None and value not in allowed:
        raise ValueError(f"{key}={value!r}: expected one of {allowed}")


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _base_type(tp) -> type:
    """int | None -> int; plain types unchanged."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        assert len(args) == 1
        return args[0]
    return tp


def _coerce(key: str, value, tp, from_string: bool):
    base = _base_type(tp)
    if from_string:
        text = value.strip()
        if base is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"--{key}={value!r}: expected a boolean (true/false)")
        try:
            return base(text) if base is not int else int(float(text)) if _is_intlike(text) else int(text)
        except ValueError:
            raise ValueError(f"--{key}={value!r}: expected {base.__name__}") from None
    # From TOML: already typed. Accept ints for floats; nothing else is converted silently.
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool) or base is not bool and isinstance(value, bool):
        raise ValueError(f"config key {key!r}: expected {base.__name__}, got {value!r}")
    if not isinstance(value, base):
        raise ValueError(f"config key {key!r}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    return value


def _is_intlike(text: str) -> bool:
    """'1e3' and '2000.0' are accepted for ints when they are whole numbers."""
    try:
        f = float(text)
    except ValueError:
        return False
    return f.is_integer() and not text.lstrip("-").isdigit()


def set_key(cfg: Config, key: str, value, from_string: bool = False) -> None:
    keys = all_keys()
    if key not in keys:
        raise ValueError(f"unknown config key {key!r}{_suggest(key, keys)}")
    value = _coerce(key, value, keys[key][0], from_string)
    _check_choice(key, value)
    if "." in key:
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    else:
        setattr(cfg, key, value)


def _flatten_toml(d: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten_toml(v, key + "."))
        else:
            flat[key] = v
    return flat


def load_toml(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path}: invalid TOML: {e}") from None
    return _flatten_toml(data)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuild a Config saved with a checkpoint (keys are checked like a TOML file's)."""
    cfg = Config()
    for key, value in _flatten_toml(d).items():
        if value is not None:
            set_key(cfg, key, value)
    return cfg


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (None values, meaning 'the preset's', are left out)."""

    def fmt(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    top = [f"{k} = {fmt(v)}" for k, v in to_dict(cfg).items() if not isinstance(v, dict)]
    lines = top + [""]
    for name, section in _sections(cfg).items():
        lines.append(f"[{name}]")
        for f in fields(section):
            v = getattr(section, f.name)
            if v is not None:
                lines.append(f"{f.name} = {fmt(v)}")
        lines.append("")
    return "\n".join(lines)


def validate(cfg: Config) -> None:
    for key, value in _flatten_toml(to_dict(cfg)).items():
        _check_choice(key, value)  # set_key checks these too; a Config built in code passes here
    t = cfg.train
    for key, value in (("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                       ("log.interval", cfg.log.interval), ("ckpt.keep", cfg.ckpt.keep)):
        if value < 1:
            raise ValueError(f"{key}={value} must be at least 1")
    for key in ("eval.interval", "eval.sample_interval", "log.health_interval", "log.hist_interval"):
        section, _, name = key.partition(".")
        if getattr(getattr(cfg, section), name) < 0:  # every N steps, 0 = off: a negative N means nothing
            raise ValueError(f"{key}={getattr(getattr(cfg, section), name)} must be >= 0 (0 = off)")
    d = cfg.data
    for key in ("max_tokens", "max_docs", "num_proc"):
        if getattr(d, key) < 0:
            raise ValueError(f"data.{key}={getattr(d, key)} must be >= 0 (0 = no cap / all cores)")
    if d.tokenizer_max_mb <= 0:
        raise ValueError(f"data.tokenizer_max_mb={d.tokenizer_max_mb} must be positive")
    if not 0 < d.val_fraction < 1:
        raise ValueError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    if d.chunk_tokens < 1024:
        raise ValueError(f"data.chunk_tokens={d.chunk_tokens} must be at least 1024")
    if t.max_steps < 1 and t.time_budget_min <= 0:
        raise ValueError(f"train.max_steps={t.max_steps} must be at least 1 (or set train.time_budget_min)")
    if t.lr <= 0:
        raise ValueError(f"train.lr={t.lr} must be positive")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ValueError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if not 0 < t.decay_frac <= 1:
        raise ValueError(f"train.decay_frac={t.decay_frac} must be in (0, 1]")
    check_optimizer_options(t)
    check_accum_ramp(t)
    check_seq_warmup(cfg)
    if t.time_budget_min < 0 or t.stop_after_steps < 0 or t.grad_clip < 0:
        raise ValueError("train.time_budget_min, train.stop_after_steps and train.grad_clip must be >= 0")
    check_health(cfg.health)
    r = cfg.rl
    if r.num_generations < 2:
        raise ValueError(f"rl.num_generations={r.num_generations} must be at least 2: group-relative advantages "
                         "compare a prompt's completions with each other (one completion has nothing to compare with)")
    for key, value in (("rl.max_new_tokens", r.max_new_tokens), ("rl.updates_per_batch", r.updates_per_batch)):
        if value < 1:
            raise ValueError(f"{key}={value} must be at least 1")
    if r.temperature <= 0:
        raise ValueError(f"rl.temperature={r.temperature} must be positive (sampling; log-probs divide by it)")
    if r.beta < 0 or r.clip_eps <= 0:
        raise ValueError(f"rl.beta={r.beta} must be >= 0 and rl.clip_eps={r.clip_eps} positive")
    if stage_table()[cfg.stage].fine_tunes and not cfg.init_from and not cfg.resume:
        raise ValueError(f"--stage {cfg.stage} fine-tunes a checkpoint: give --init-from RUN_DIR")


def check_optimizer_options(t: TrainSection) -> None:
    """The Muon-only options need train.optimizer=muon: with adamw they would silently do nothing."""
    if t.optimizer != "muon":
        for key, value, off in (("normuon", t.normuon, False), ("muon_weight_decay", t.muon_weight_decay, 0.0)):
            if value != off:
                raise ValueError(f"train.{key}={value!r} applies to the Muon matrices: it needs "
                                 f"train.optimizer=muon (train.optimizer is {t.optimizer!r})")
    if not 0 <= t.beta2 < 1:  # AdamW's second moment, and NorMuon's per-row one
        raise ValueError(f"train.beta2={t.beta2} must be in [0, 1)")
    if t.weight_decay < 0 or t.muon_weight_decay < 0:
        raise ValueError(f"train.weight_decay={t.weight_decay} and train.muon_weight_decay={t.muon_weight_decay} "
                         "must be >= 0")


def check_accum_ramp(t: TrainSection) -> None:
    if t.accum_ramp_steps < 0:
        raise ValueError(f"train.accum_ramp_steps={t.accum_ramp_steps} must be >= 0 (0 = off)")
    if t.accum_ramp_steps and t.grad_accum < 2:
        raise ValueError(f"train.accum_ramp_steps={t.accum_ramp_steps} ramps the micro-steps up to train.grad_accum, "
                         f"which is {t.grad_accum}: set train.grad_accum to at least 2")
    if t.accum_ramp_steps and t.time_budget_min > 0:
        # The budget turns the first steps' time into a step count; ramped steps grow dearer, so it would overrun.
        raise ValueError(f"train.accum_ramp_steps={t.accum_ramp_steps} needs a step count: the time budget "
                         f"(train.time_budget_min={t.time_budget_min:g}) plans from the time of steps that the ramp "
                         "makes dearer later; give --train.max_steps (which turns the budget off)")
    if t.accum_ramp_steps and t.accum_ramp_steps >= t.max_steps:
        raise ValueError(f"train.accum_ramp_steps={t.accum_ramp_steps} is not shorter than the run "
                         f"(train.max_steps={t.max_steps}): the micro-steps would never reach train.grad_accum="
                         f"{t.grad_accum}; ramp over fewer updates")


def check_seq_warmup(cfg: Config) -> None:
    t = cfg.train
    if t.seq_warmup_len < 0 or t.seq_warmup_steps < 0:
        raise ValueError(f"train.seq_warmup_len={t.seq_warmup_len} and train.seq_warmup_steps={t.seq_warmup_steps} "
                         "must be >= 0 (0 = off)")
    if bool(t.seq_warmup_len) != bool(t.seq_warmup_steps):
        raise ValueError(f"train.seq_warmup_len={t.seq_warmup_len} and train.seq_warmup_steps={t.seq_warmup_steps}: "
                         "set both (a row length and how many updates use it) or neither")
    if t.seq_warmup_len and cfg.stage != "pretrain":
        raise ValueError(f"train.seq_warmup_len={t.seq_warmup_len}: a sequence-length schedule cuts pre-training's "
                         f"windows of text; --stage {cfg.stage} rows are whole examples")


def check_health(h: HealthSection) -> None:
    for key in ("explode_factor", "explode_steps", "vanish_ratio", "ratio_low", "ratio_high", "overfit_evals"):
        if getattr(h, key) < 0:
            raise ValueError(f"health.{key}={getattr(h, key)} must be >= 0")
    if 0 < h.ratio_high <= h.ratio_low:
        raise ValueError(f"health.ratio_high={h.ratio_high} must exceed health.ratio_low={h.ratio_low} (a band)")


USAGE = """usage: train.py [--config FILE.toml] [--stage NAME] [--data SOURCE] [--out RUN_DIR]
                [--init-from RUN_DIR] [--resume] [--section.key=value ...] [--help]
       torchrun --nproc_per_node=N train.py [same options]"""

HELP_INTRO = """Set an option as --section.key=value or --section.key value, or as `key = value` under [section] in the
--config file (top-level keys before any [section]). Each value shown is the one this command line resolves to:
the dataclass default, then the stage's (--stage), then the --config file's, then the flags'."""

# Short flags of the command line contract -> config keys.
ALIASES = {"--data": "data.source", "--out": "out", "--init-from": "init_from", "--stage": "stage",
           "--init_from": "init_from"}


def _shown_value(cfg: Config, key: str) -> str:
    """The value a run of this config uses, as it would be typed; an unset model field shows the preset's."""
    section, _, name = key.rpartition(".")
    value = getattr(getattr(cfg, section) if section else cfg, name)
    if section == "model" and value is None:
        explicit = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "preset" and v is not None}
        value = {f.name: f.default for f in fields(GPTConfig)} | preset_values(cfg.model.preset, explicit)
        value = value[name]
    return as_typed(value)


def as_typed(value) -> str:
    """A setting's value as it is typed on the command line: true / false, not Python's True / False."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return shlex.quote(value) if isinstance(value, str) else repr(value)


def _help_row(cfg: Config, key: str, f: dataclasses.Field) -> tuple[str, str]:
    """(--flag=value, description) of one key; the choices, in brackets, lead the description."""
    flag = f"--{key.replace('_', '-')}" if "." not in key else f"--{key}"
    assert "." in key or flag in ALIASES or flag == "--resume", flag  # top-level keys are shown by their short flag
    allowed = choices(key)
    description = (f"[{'|'.join(allowed)}] " if allowed else "") + f.metadata["help"]
    if flag == "--resume":  # a bare flag, no value
        return flag, description
    return f"{flag}={_shown_value(cfg, key)}", description


def build_parser_help(cfg: Config | None = None) -> str:
    """Every option grouped by section, one line each: --key=value (the value shows the type) and description.

    The values are `cfg`'s (parse_args passes the config the command line resolves to); without one, the default
    pretrain run's. The descriptions and choices are the fields' metadata (see `option`).
    """
    cfg = cfg or _stage_config("pretrain")
    groups = {"": [("--config=FILE", "TOML file of settings, applied after the stage's defaults, before the flags")]}
    for key, (_, f) in _option_fields().items():
        groups.setdefault(key.rpartition(".")[0], []).append(_help_row(cfg, key, f))
    width = max(len(flag) for rows in groups.values() for flag, _ in rows)
    lines = [HELP_INTRO]
    for section, rows in groups.items():
        doc = (type(getattr(cfg, section)) if section else Config).__doc__
        lines += ["", f"[{section}]  {doc}" if section else f"top level  {doc}"]
        lines += [f"  {flag:<{width}}  {text}" for flag, text in rows]
    return "\n".join(lines)


@dataclass
class _CommandLine:
    config_file: str | None = None
    overrides: list[tuple[str, str]] = field(default_factory=list)  # (key, value as typed), in order
    resume: bool = False
    wants_help: bool = False  # -h/--help anywhere: the rest of the line still decides the values shown


def _read_argv(argv: list[str]) -> _CommandLine:
    line, keys = _CommandLine(), all_keys()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help", "--resume"):  # the flags that take no value
            if arg == "--resume":
                line.resume = True
            else:
                line.wants_help = True
            i += 1
            continue
        name, eq, value = arg.partition("=")
        if not name.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options look like --section.key=value")
        if not eq:  # "--key value"
            if i + 1 >= len(argv):
                raise ValueError(f"option {name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "--config":
            line.config_file = value
        elif name in ALIASES:
            line.overrides.append((ALIASES[name], value))
        else:
            key = name[2:]
            if key not in keys:
                raise ValueError(f"unknown option --{key}{_suggest(key, set(keys) | {a[2:] for a in ALIASES})}")
            line.overrides.append((key, value))
    return line


def _stage_config(stage: str) -> Config:
    _check_choice("stage", stage)
    cfg = Config()
    for key, value in stage_defaults(stage).items():
        set_key(cfg, key, value)
    return cfg


def parse_args(argv: list[str]) -> Config:
    """Build the resolved config from the command line (see the module docstring for the order).

    With -h/--help anywhere on the line, print every option with the value this line resolves to and exit.
    """
    line = _read_argv(argv)
    config_file, overrides, resume = line.config_file, line.overrides, line.resume
    file_values = load_toml(config_file) if config_file else {}
    given = dict(overrides)
    if resume and "init_from" in given:
        raise ValueError("--resume continues a run; --init-from starts a new one: give one of them")
    out = given.get("out", file_values.get("out", Config.out))
    saved = os.path.join(str(out), "config.toml")
    if resume and os.path.exists(saved):
        # A resumed run starts from its own resolved config; the file and flags given now are changes to it.
        cfg = from_dict(tomllib.loads(Path(saved).read_text()))
        cfg.train.stop_after_steps = 0  # an early stop applies to the run that asked for it, not to its resumption
    else:
        cfg = _stage_config(given.get("stage", file_values.get("stage", "pretrain")))
    keys = all_keys()
    for key, value in file_values.items():
        if key not in keys:
            raise ValueError(f"config file {config_file}: unknown key {key!r}{_suggest(key, keys)}")
        set_key(cfg, key, value)
    for key, value in overrides:
        set_key(cfg, key, value, from_string=True)
    explicit = set(file_values) | set(given)
    fresh = not (resume and os.path.exists(saved))  # (--resume under torchrun --max-restarts may start a run)
    if fresh and "train.max_steps" in explicit and "train.time_budget_min" not in explicit:
        cfg.train.time_budget_min = 0.0  # an explicit step count means a step-based schedule
    if resume:
        cfg.resume = True
    if line.wants_help:  # before validate: `--stage sft --help` needs no --init-from
        print(USAGE + "\n\n" + build_parser_help(cfg))
        raise SystemExit(0)
    validate(cfg)
    return cfg


# Settings that may differ between a run and its resumption; every other difference is refused.
# train.batch_size may change with the number of processes; the loop then requires batch_size x world size to stay.
RESUMABLE_CHANGES = ("out", "resume", "init_from", "train.stop_after_steps", "train.max_steps", "train.time_budget_min",
                     "train.compile", "train.device", "train.peak_flops", "train.batch_size", "data.num_proc",
                     "data.cache_dir", "eval.", "log.", "health.", "ckpt.", "dist.")


def check_resume_compatible(saved: Config, new: Config) -> None:
    old_flat = _flatten_toml(to_dict(saved))
    new_flat = _flatten_toml(to_dict(new))
    for key, old in old_flat.items():
        if new_flat.get(key) != old and not any(key == p or (p.endswith(".") and key.startswith(p))
                                                for p in RESUMABLE_CHANGES):
            raise ValueError(
                f"--resume: {key} was {old!r} in the saved run but is {new_flat.get(key)!r} now; only "
                f"{', '.join(RESUMABLE_CHANGES)} may change on resume"
            )
