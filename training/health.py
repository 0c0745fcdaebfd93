"""Network health, cheap enough to leave on: per-block gradient norms, update/weight ratios, histograms.

Vanishing or exploding gradients show as `grad_norm/<block>` curves drifting apart; a learning rate that is too
high or too low as `update_ratio/<group>` far from ~1e-3 per step. `grad_norm/<block>` is measured before clipping
(after fp16 unscaling), as `train/grad_norm`: the squares of the block norms sum to the square of the global norm.
"""

from __future__ import annotations

import torch


def _group_of(name: str) -> str:
    """Parameter name -> its block: `blocks.3.attn.q_proj.weight` -> `block_3`, `wte.weight` -> `embedding`."""
    if name.startswith("blocks."):
        return f"block_{name.split('.')[1]}"
    if name.startswith(("wte", "wpe")):
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    return "final_norm"


@torch.no_grad()
def block_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradients of each block (and embedding, head, final norm), after the gradient all-reduce, so
    the figures are the synchronised gradients; the loop calls it after unscaling and before clipping. Every rank
    calls it: under FSDP2 `full_tensor()` gathers the shards (a collective); rank 0 alone logs the result."""
    sq: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        key = _group_of(name)
        sq[key] = sq.get(key, 0) + g.float().pow(2).sum()
    return {k: v.sqrt().item() for k, v in sq.items()}


@torch.no_grad()
def update_ratios(optimizer: torch.optim.Optimizer, before: list[torch.Tensor]) -> dict[str, float]:
    """||W_after - W_before|| / ||W_before|| per optimizer parameter group (matrices, vectors)."""
    ratios, i = {}, 0
    for group in optimizer.param_groups:
        num = den = 0.0
        for p in group["params"]:
            old = before[i]
            i += 1
            num += (p.detach() - old).float().pow(2).sum().item()
            den += old.float().pow(2).sum().item()
        ratios[group.get("name", str(len(ratios)))] = (num ** 0.5) / max(den ** 0.5, 1e-12)
    return ratios


def activation_hooks(model: torch.nn.Module, monitor, step: int) -> list:
    """Forward hooks that log each block's output activations as a histogram once (the hooks are removed after
    the step by the caller)."""
    hooks = []
    for i, block in enumerate(getattr(model, "blocks", [])):
        def hook(module, inputs, output, i=i):
            monitor.histogram(f"activations/block_{i}", output, step)

        hooks.append(block.register_forward_hook(hook))
    return hooks
