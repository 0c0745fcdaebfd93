"""Moving weights between checkpoints and models, shared by training and inference (training/load.py).

load_weights fills an unwrapped GPT from a checkpoint's dict; full_state / load_full_state read and write the full
(unsharded) model and optimizer state of any wrapper (plain, DDP, FSDP2, compiled).
"""

from __future__ import annotations

from model.gpt import GPT
from training import checkpoint


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


def load_weights(model: GPT, msd: dict, may_lack: tuple[str, ...] = ()) -> None:
    """Load a checkpoint's weights into an unwrapped model; a tied head may be absent from the dict, and so may the
    weights named in `may_lack` (a new head: they keep the model's initialisation)."""
    msd = checkpoint.clean_state_dict(msd)
    missing, unexpected = model.load_state_dict(msd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings) and k not in may_lack]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
