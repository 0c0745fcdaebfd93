"""Open a finished run for inference (sample, evaluate, export), and write a run folder from given weights (import).

    run = load_run("runs/sft")                      # the newest checkpoint of a run folder, or a checkpoint file
    run.model                                       # GPT in eval mode, fp32 weights, on run.device, no gradients
    with run.autocast:                              # the precision asked for (autocast for bf16/fp16)
        logits = run.model(idx)
    run.tok, run.gcfg, run.cfg, run.ckpt            # tokenizer, model shape, training Config, checkpoint metadata

A run folder written by `save_run` (scripts/import_hf.py) holds what `train.py --init-from` needs: a checkpoint with
the weights, the model shape, a training config and the tokenizer, plus `config.toml` and `tokenizer.json` as any run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from data import chat
from data.tokenizer import END_ID, EOT_ID, Tokenizer
from model.gpt import GPT, GPTConfig
from model.reward import RewardModel, is_reward_state
from training import checkpoint
from training.config import Config, from_dict, to_toml
from training.distributed import pick_device
from training.precision import autocast_ctx, resolve_precision
from training.run_state import RunState, build_checkpoint
from training.weights import load_weights

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class LoadedRun:
    model: GPT  # eval mode, requires_grad False, fp32 weights on `device`; a RewardModel for an RM run
    tok: Tokenizer
    gcfg: GPTConfig
    cfg: Config  # the training config saved with the checkpoint
    ckpt: dict  # the checkpoint's metadata (step, stage, init_from, path, ...); weights and optimizer state removed
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    run_dir: Path | None  # the run folder the checkpoint belongs to (None for a loose checkpoint file)

    @property
    def autocast(self) -> AbstractContextManager:
        """A fresh autocast context for the run's precision (a no-op for fp32)."""
        return autocast_ctx(self.precision, self.device)

    @property
    def step(self) -> int:
        return int(self.ckpt.get("step", 0))

    @torch.no_grad()
    def generate_text(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8, top_k: int | None = None,
                      top_p: float | None = None, chat_mode: bool = False,
                      generator: torch.Generator | None = None) -> str:
        """The continuation of `prompt`, without the prompt. Plain text stops at <|endoftext|> (an empty prompt
        starts a new document); chat mode answers `prompt` as a user message and stops at <|end|>."""
        if chat_mode:
            ids, stop = chat.render_prompt([{"role": "user", "content": prompt}], self.tok), (END_ID,)
        else:
            ids, stop = self.tok.encode(prompt) or [EOT_ID], (EOT_ID,)
        idx = torch.tensor([ids], device=self.device)
        with self.autocast:
            out = self.model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                      stop_tokens=stop, generator=generator)
        new = out[0, idx.shape[1]:].tolist()
        if chat_mode:
            return chat.decode_reply(new, self.tok)
        return self.tok.decode(new[: new.index(EOT_ID)] if EOT_ID in new else new)


def refuse_reward_model(run: LoadedRun, what: str, needs: str = "pre-training, SFT, DPO or RL") -> None:
    """A script that needs a policy (text generation, language-model figures, a causal-LM export) refuses an RM run
    clearly, instead of serving its untrained-for-text LM head; `needs` names the runs it takes."""
    if isinstance(run.model, RewardModel):
        raise ValueError(f"{run.ckpt['path']} is a reward model (stage {run.ckpt.get('stage')!r}, with a score head): "
                         f"{what} needs a policy run ({needs})")


def run_dir_of(path: str | os.PathLike) -> Path | None:
    """The run folder of a run folder or of a checkpoint file inside `RUN/checkpoints/`."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.parent.name == checkpoint.CKPT_DIR:
        return p.parent.parent
    return None


def load_run(path: str | os.PathLike, device: str = "auto", precision: str = "auto") -> LoadedRun:
    """Load the newest checkpoint of a run folder (or a checkpoint file) for inference.

    device: auto | cpu | cuda (| cuda:N); precision: auto | fp32 | bf16 | fp16 (auto: bf16 on capable CUDA, else fp32).
    Raises FileNotFoundError for a missing path and ValueError for a folder without a checkpoint or a foreign file.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    ckpt = checkpoint.load(path)  # clear errors for "no such folder", "no checkpoint", "not a gptrain checkpoint"
    missing = [k for k in ("model_config", "tokenizer") if k not in ckpt]
    if missing:
        raise ValueError(f"{ckpt['path']}: checkpoint lacks {missing}; it was not written by gptrain's trainer")
    gcfg = GPTConfig.from_dict(ckpt["model_config"])
    tok = Tokenizer(tokenizers.Tokenizer.from_str(ckpt["tokenizer"]), source=ckpt["path"])
    cfg = from_dict(ckpt["config"])
    dev = torch.device(device) if device.startswith("cuda:") else pick_device(device)
    msd = ckpt.pop("model")
    model = (RewardModel if is_reward_state(msd) else GPT)(gcfg)  # a reward model (stage rm) has its score head
    load_weights(model, msd)
    ckpt.pop("optimizer", None)  # can be twice the model's size; inference never needs it
    model.to(dev).eval().requires_grad_(False)
    return LoadedRun(model, tok, gcfg, cfg, ckpt, dev, resolve_precision(precision, dev), run_dir_of(path))


def check_new_folder(path: str | os.PathLike, what: str) -> Path:
    """Refuse an existing, non-empty folder (or a file) at `path`: outputs are never merged into old ones."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ValueError(f"{what} {p} already exists and is not empty; choose a new folder (nothing was written)")
    return p


def write_folder_atomically(dest: str | os.PathLike, fill) -> Path:
    """Create folder `dest` completely or not at all: `fill(tmp)` writes into a temporary sibling folder, which is
    then renamed to `dest` (an empty `dest` is replaced). On any error the temporary folder is removed."""
    dest = check_new_folder(dest, "output folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        fill(tmp)
        if dest.exists():
            dest.rmdir()  # empty (checked above); os.replace onto a directory is not portable
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def save_run(run_dir: str | os.PathLike, model_state: dict, gcfg: GPTConfig, tok: Tokenizer, cfg: Config | None = None,
             step: int = 0, stage: str = "pretrain", extra: dict | None = None) -> Path:
    """Write a new run folder holding one checkpoint of `model_state` (atomically; refuses a non-empty folder).

    The checkpoint has the keys `train.py --init-from` reads (model, model_config, tokenizer, config) and the
    trainer's metadata keys; there is no optimizer or loader state, so the run can be fine-tuned, not resumed."""
    load_weights((RewardModel if is_reward_state(model_state) else GPT)(gcfg), model_state)  # checked before writing
    if cfg is None:
        cfg = Config()
        for k, v in gcfg.to_dict().items():  # the shape as explicit model.* keys (norm_eps lives in model_config)
            if hasattr(cfg.model, k):
                setattr(cfg.model, k, v)
    state = build_checkpoint(RunState(step=step, max_steps=step), model_state, None, None, cfg, gcfg, tok,
                             stage=stage, init_from="")
    state.update(extra or {})

    def fill(tmp: Path) -> None:
        checkpoint.save(tmp, step, state)
        checkpoint.atomic_write_bytes(tmp / "config.toml", to_toml(cfg).encode())
        tok.save(tmp / "tokenizer.json")

    return write_folder_atomically(run_dir, fill)

