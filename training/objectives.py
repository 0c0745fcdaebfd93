"""The three training objectives: (model, batch) -> (loss_sum, metric sums).

The loop is the same for every stage; only the data and one of these functions change. Each objective returns a
*sum* over its normalisation units and says how many units a batch holds (`count`): target tokens for pre-training,
supervised tokens for SFT, preference pairs for DPO. The loop divides once by the step's global count (all
micro-batches, all ranks), so accumulation and data parallelism equal one large batch.
"""

from __future__ import annotations

import torch

from model.losses import IGNORE, dpo_loss, sequence_logps, token_ce_sum


class LanguageModeling:
    """Next-token cross-entropy over the supervised labels (all of them in pre-training, the assistant's in SFT)."""

    unit = "tokens"

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["labels"] != IGNORE).sum()

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"], positions=batch.get("positions"), doc_ids=batch.get("doc_ids"))
        loss_sum, _ = token_ce_sum(logits, batch["labels"])
        return loss_sum, {}


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
