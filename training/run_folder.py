"""The run folder: may this run write into it (check_run_dir), may a checkpoint resume here (check_global_batch),
and the files every run writes beside its checkpoints (config.toml, tokenizer.json, env.json)."""

from __future__ import annotations

import json
from pathlib import Path

from training import checkpoint, distributed
from training.config import Config, to_toml
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
