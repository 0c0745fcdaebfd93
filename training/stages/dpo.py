"""DPO: direct preference optimisation against a frozen reference (the run's starting checkpoint).

Data: prompt + chosen + rejected pairs (data/preference.py). Objective: one forward over [chosen; rejected], the pure
loss model/losses.py:dpo_loss, TRL's reward metrics; the count is the pairs. The reference is a frozen copy of the
starting weights, wrapped onto the policy's numeric path (training/distributed.py:wrap_reference), or with
dpo.ref_cache its log-probs of every pair, computed once and kept in RUN/ref_logps.pt. Validation: the DPO loss and
reward metrics on every held-out pair (preference_figures, also used by scripts/evaluate.py) and greedy exact match.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from pathlib import Path

import torch

from data.preference import PreferenceBatcher, load_preferences
from data.tokenizer import Tokenizer
from model.gpt import GPT, GPTConfig
from model.losses import dpo_loss, sequence_logps
from training import checkpoint
from training.config import Config
from training.distributed import DistInfo, all_reduce, barrier
from training.evaluation import chat_accuracy
from training.monitor import print0, step_flops
from training.stages.base import Stage, StageEnv, chat_eval_items, chat_sample, eval_shares, frozen_reference, to_device
from training.stages.sft import SFTStage
from training.tokenizer_cache import hf_cache_dir


class DPO:
    """Direct preference optimisation with a frozen reference (a model, or log-probs cached by example index)."""

    unit = "pairs"
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected", "logps/accuracies")

    def __init__(self, beta: float, loss_type: str, label_smoothing: float, reference=None, ref_cache=None):
        assert (reference is None) != (ref_cache is None), "give a reference model or cached reference log-probs"
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        # frozen GPT in eval mode, on the policy's numeric path: under the same autocast, or under FSDP sharded with
        # the policy's mixed precision (training/distributed.py:wrap_reference)
        self.reference = reference
        self.ref_cache = ref_cache  # dict split -> tensor (N, 2) of [chosen, rejected] reference log-probs

    def count(self, batch: dict) -> torch.Tensor:
        if "valid" in batch:  # validation batches may hold a stand-in pair that counts for nothing
            return batch["valid"].sum()
        return torch.tensor(batch["chosen_input_ids"].shape[0], device=batch["chosen_input_ids"].device)

    def logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over [chosen; rejected] -> per-sequence log-probs of the completion tokens (B,), (B,).
        IPO uses the mean over completion tokens (as TRL does), the other losses the sum."""
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]], dim=0)  # (2B, T)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]], dim=0)
        s, n = sequence_logps(model(ids), labels)
        if self.loss_type == "ipo":
            s = s / n.clamp(min=1)
        b = batch["chosen_input_ids"].shape[0]
        return s[:b], s[b:]

    @torch.no_grad()
    def reference_logps(self, batch: dict, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_cache is not None:
            ref = self.ref_cache[split].to(batch["index"].device)[batch["index"]]  # (B, 2)
            return ref[:, 0], ref[:, 1]
        return self.logps(self.reference, batch)

    def __call__(self, model, batch: dict, split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pc, pr = self.logps(model, batch)
        rc, rr = self.reference_logps(batch, split)
        losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, self.label_smoothing)
        w = batch["valid"].float() if "valid" in batch else torch.ones_like(losses)  # (B,) 0 = stand-in pair
        metrics = {
            "rewards/chosen": (w * chosen_r).sum(),
            "rewards/rejected": (w * rejected_r).sum(),
            "rewards/accuracies": (w * (chosen_r > rejected_r).float()).sum(),
            "rewards/margins": (w * (chosen_r - rejected_r)).sum(),
            "logps/chosen": (w * pc.detach()).sum(),
            "logps/rejected": (w * pr.detach()).sum(),
            "logps/accuracies": (w * (pc > pr).float()).sum(),  # reference-free: does the policy prefer chosen?
        }
        return (w * losses).sum(), metrics


@torch.no_grad()
def preference_figures(model, objective, batches: list[dict], autocast, split: str = "val") -> dict:
    """DPO loss and TRL's reward metrics averaged over pairs; `logps/accuracies` is the reference-free share of
    pairs where the policy alone gives the chosen answer the higher log-probability."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    names = ("loss",) + objective.metric_names
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    for batch in batches:
        with autocast:
            loss_sum, metrics = objective(model, batch, split=split)
        row = [loss_sum] + [metrics[k] for k in objective.metric_names] + [objective.count(batch)]
        sums += torch.stack([v.to(device).double() for v in row])
    model.train(was_training)
    all_reduce(sums)
    n = max(sums[-1].item(), 1)
    return {name: sums[i].item() / n for i, name in enumerate(names)} | {"pairs": int(sums[-1].item())}


class DPOStage(Stage):
    """Direct preference optimisation of prompt + chosen + rejected pairs against a frozen reference."""

    eval_kinds = ("preference", "chat")
    synthetic_records = "dpo"
    console_metrics = ("rewards/accuracies", "rewards/margins")
    # DPO lr: 2e-4 reached the same held-out reward accuracy (0.71) but halved greedy exact match on the tiny
    # preset's built-in tasks (chosen log-probs fell with the rejected ones); 1e-4 keeps most of it. Measured.
    defaults = {"data.source": "synthetic", "train.lr": 1e-4, "train.max_steps": 150, "train.warmup_steps": 10,
                "train.batch_size": 16, "train.weight_decay": 0.0, "train.schedule": "cosine", "model.dropout": 0.0,
                "eval.interval": 50, "eval.max_tokens": 0, "ckpt.interval": 150}

    def __init__(self, cfg: Config, tok: Tokenizer, gcfg: GPTConfig, info: DistInfo) -> None:
        super().__init__(cfg, tok, gcfg, info)
        T = gcfg.block_size
        cache = hf_cache_dir(cfg)
        train, st = load_preferences(cfg.data.source, "train", tok, T, seed=cfg.train.seed,
                                     n_synthetic=cfg.data.synthetic_train, cache_dir=cache)
        val, sv = load_preferences(cfg.data.source, "val", tok, T, seed=cfg.train.seed,
                                   n_synthetic=cfg.data.synthetic_val, cache_dir=cache)
        for s in (st, sv):
            print0(f"data: {s['source']}: {s['n_examples']} pairs ({s['n_dropped']} dropped by truncation to {T})")
        self.train_examples, self.val_examples = train, val
        self.train = PreferenceBatcher(train, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                                       world_size=info.world_size)
        self.tokens_per_micro_batch = 2 * cfg.train.batch_size * T
        # Held-out prompts answered greedily: does preference training help (or hurt) the actual task?
        self.eval_items = chat_eval_items(cfg, "dpo", SFTStage.accuracy_examples, tok, T, sv["kept"])

    def setup_frozen(self, policy: GPT, env: StageEnv) -> None:
        """The reference: a frozen copy of the starting weights (eval mode, no gradients), on the policy's numeric
        path (at step 0, dropout 0, its log-probs equal the policy's), or (dpo.ref_cache) its cached log-probs."""
        self.make_objective(env.wrap(frozen_reference(policy, env, "DPO", self.cfg.init_from)), env.autocast,
                            env.precision)

    def step_flops(self, model: GPT, batches: list[dict]) -> int:
        """The policy's forward and backward; a live reference adds its forward (a cached one costs nothing)."""
        return step_flops(model, batches, reference_forward=not self.cfg.dpo.ref_cache,
                          input_keys=("chosen_input_ids", "rejected_input_ids"))

    def batch_tokens(self, batch: dict) -> int:
        return batch["chosen_input_ids"].numel() + batch["rejected_input_ids"].numel()

    def _all_batches(self, examples, world_size: int, rank: int) -> list[dict]:
        """Every pair exactly once, this rank's share (see eval_shares); `index` is the pair's position in
        `examples` (the key of cached reference log-probs), `valid` is False on an idle rank's stand-in pair."""
        batches = []
        for idx in eval_shares(len(examples), self.cfg.train.batch_size, rank, world_size):
            rows = [examples[i] for i in idx] or examples[:1]
            b = PreferenceBatcher(rows, len(rows), shuffle=False).next_batch()
            b["index"] = torch.tensor(idx or [0], dtype=torch.long)
            b["valid"] = torch.full((len(rows),), bool(idx))
            batches.append(to_device(b, self.device))
        return batches

    def make_objective(self, reference, autocast=None, precision: str = "fp32"):
        """The DPO objective with a live reference, or (dpo.ref_cache) with its log-probs of every pair, computed once
        by the reference as the loop wraps it, under the loop's autocast: the policy's numeric path. `precision` is
        the run's (fp32 / bf16 / fp16); it is part of the cache's key."""
        d = self.cfg.dpo
        if not d.ref_cache:
            self.objective = DPO(d.beta, d.loss_type, d.label_smoothing, reference=reference)
            return self.objective
        path = Path(self.cfg.out) / "ref_logps.pt"
        key = self._ref_cache_key(reference, precision)
        cache = self._read_ref_cache(path, key)
        if cache is None:
            cache = self._compute_ref_cache(reference, autocast or nullcontext(), key)
            if self.info.is_main:
                Path(self.cfg.out).mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                torch.save(cache, buf)
                checkpoint.atomic_write_bytes(path, buf.getvalue())  # temporary file, fsync, rename
            barrier()
            print0(f"dpo: cached reference log-probs of {len(self.train_examples)} + {len(self.val_examples)} pairs "
                   f"in {path}")
        self.objective = DPO(d.beta, d.loss_type, d.label_smoothing,
                             ref_cache={"train": cache["train"], "val": cache["val"]})
        return self.objective

    def _ref_cache_key(self, reference, precision: str) -> dict:
        """What the cached values depend on: the reference's weights (a checksum), the pairs, sums vs IPO's means,
        and the numeric path (the precision, and FSDP's mixed precision instead of autocast)."""
        # Under FSDP every rank gathers each sharded weight in the same order (a collective per parameter).
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in reference.parameters()]
        return {"init_from": self.cfg.init_from, "weights": float(sum(p.detach().double().sum() for p in full)),
                "loss_type_mean": self.cfg.dpo.loss_type == "ipo",
                "data": (self.cfg.data.source, self.cfg.train.seed),
                "n": (len(self.train_examples), len(self.val_examples)), "precision": precision,
                "fsdp": self.cfg.dist.strategy == "fsdp" and self.info.distributed}

    def _read_ref_cache(self, path: Path, key: dict) -> dict | None:
        """The cache at path if it is readable, well-formed and was computed for `key`; else None (recompute). Read
        with the restricted unpickler: tensors, containers, strings and numbers only, no code runs."""
        if not path.exists():
            return None
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt, or a pickle that would run code: recomputed, never fatal
            print0(f"dpo: {path} is not a readable reference cache ({type(e).__name__}: {str(e)[:200]}); "
                   "recomputing it")
            return None
        sizes = {"train": len(self.train_examples), "val": len(self.val_examples)}
        if not (isinstance(cache, dict) and all(isinstance(cache.get(s), torch.Tensor) and
                                                tuple(cache[s].shape) == (n, 2) for s, n in sizes.items())):
            print0(f"dpo: {path} does not hold [chosen, rejected] log-probs of {sizes} pairs; recomputing it")
            return None
        if cache.get("key") != key:
            print0(f"dpo: {path} was computed for another reference, data or precision; recomputing it")
            return None
        return cache

    def _compute_ref_cache(self, reference, autocast, key: dict) -> dict:
        """Reference log-probs of every pair, [chosen, rejected] fp32 rows by pair index, computed as the loop's
        live reference would compute them. Every rank runs every batch (under FSDP each forward is a collective)."""
        d = self.cfg.dpo
        probe = DPO(d.beta, d.loss_type, d.label_smoothing, reference=reference)
        cache = {"key": key}
        for split, examples in (("train", self.train_examples), ("val", self.val_examples)):
            rows = torch.zeros(len(examples), 2)
            for batch in self._all_batches(examples, 1, 0):
                with autocast:
                    rc, rr = probe.reference_logps(batch)
                rows[batch["index"].cpu()] = torch.stack([rc, rr], dim=1).float().cpu()
            cache[split] = rows
        return cache

    def validate(self, model, autocast, info: DistInfo, full: bool = False) -> dict[str, float]:
        batches = self._all_batches(self.val_examples, info.world_size, info.rank)
        figures = preference_figures(model, self.objective, batches, autocast, split="val")
        figures["accuracy"] = chat_accuracy(model, self.tok, self.eval_items, autocast, self.device)
        return figures

    def sample(self, model, autocast) -> str:
        return chat_sample(model, self.tok, self.eval_items, autocast, self.device)
