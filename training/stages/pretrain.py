"""Pre-training: next-token cross-entropy on every token of a text source (shards prepared by data/shards.py).

The objective sums the loss over target tokens; its count is the number of target tokens (the loop divides once by
the step's global count). Validation: loss and bits per byte on the held-out documents; sample: a continuation of
eval.sample_prompt.
"""

from __future__ import annotations

import torch

from data import shards
from data.tokenizer import Tokenizer
from model.gpt import GPTConfig
from model.losses import IGNORE, token_ce_sum
from training.config import Config
from training.distributed import DistInfo
from training.evaluation import lm_figures
from training.monitor import print0
from training.stages.base import Stage, generate, to_device
from training.tokenizer_cache import cache_root


class LanguageModeling:
    """Next-token cross-entropy over the supervised labels (all of them in pre-training, the assistant's in SFT)."""

    unit = "tokens"  # the count: supervised target tokens

    def count(self, batch: dict) -> torch.Tensor:
        return (batch["labels"] != IGNORE).sum()

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"], positions=batch.get("positions"), doc_ids=batch.get("doc_ids"))
        loss_sum, _ = token_ce_sum(logits, batch["labels"])
        return loss_sum, {}


class PretrainStage(Stage):
    """Next-token prediction on every token of a text source, in block_size windows of memmapped shards."""

    trains_tokenizer = True
    fine_tunes = False
    eval_kinds = ("text",)
    chat = False
    # The CPU speedrun (the default `python train.py`): chosen by validation bits per byte at a fixed wall-clock
    # budget on 2 CPU cores; the measurements are in the README.
    defaults = {"train.time_budget_min": 10.0, "train.optimizer": "muon", "train.batch_size": 8,
                "train.muon_lr": 0.01, "train.lr": 3e-3}

    def __init__(self, cfg: Config, tok: Tokenizer, gcfg: GPTConfig, info: DistInfo) -> None:
        super().__init__(cfg, tok, gcfg, info)
        self.objective = LanguageModeling()
        self.block_size = gcfg.block_size
        shard_dir = shards.default_shard_dir(cache_root(cfg) / "shards", cfg.data.source, tok)
        num_proc = cfg.data.num_proc or None
        self.manifests = {
            split: shards.prepare(cfg.data.source, tok, shard_dir, split, cfg.data.text_column, num_proc=num_proc,
                                  block_size=gcfg.block_size, verbose=info.is_main)
            for split in ("train", "val")
        }
        self.train_path = shards.shard_paths(shard_dir, "train")[0]
        self.val_path = shards.shard_paths(shard_dir, "val")[0]
        self.train = shards.TokenLoader(self.train_path, cfg.train.batch_size, gcfg.block_size, seed=cfg.train.seed,
                                        rank=info.rank, world_size=info.world_size)
        self.byte_lengths = torch.as_tensor(tok.token_byte_lengths(), device=self.device).long()
        self.tokens_per_micro_batch = cfg.train.batch_size * gcfg.block_size
        m = self.manifests["train"]
        print0(f"data: {cfg.data.source}: train {m['tokens']:,} tokens ({m['bytes'] / 1e6:.1f} MB), val "
               f"{self.manifests['val']['tokens']:,} tokens; {self.train.steps_per_epoch} steps per epoch")

    def train_batch(self) -> dict:
        x, y = self.train.next_batch()
        return to_device({"input_ids": x, "labels": y}, self.device)

    def val_batches(self, max_tokens: int | None):
        """This rank's validation batches (rank r scores blocks r, r + world_size, ...). Every rank yields the same
        number of batches -- a forward under FSDP is a collective -- so a rank whose share runs out first adds a
        stand-in batch whose targets are all ignored (it counts for nothing)."""
        B, T, W = self.cfg.train.batch_size, self.block_size, self.info.world_size
        n_blocks = (self.manifests["val"]["tokens"] - 1) // T  # the grid of shards.eval_batches
        if max_tokens is not None:
            n_blocks = min(n_blocks, max(1, max_tokens // T))
        most = -(-n_blocks // W)  # rank 0 holds the most blocks: ceil(n_blocks / W)
        n_batches = -(-most // B)
        done = 0
        for x, y in shards.eval_batches(self.val_path, B, T, max_tokens=max_tokens, rank=self.info.rank,
                                        world_size=W, device=self.device):
            done += 1
            yield x, y
        assert done <= n_batches, (done, n_batches)
        for _ in range(n_batches - done):
            yield (torch.zeros(1, T, dtype=torch.long, device=self.device),
                   torch.full((1, T), IGNORE, dtype=torch.long, device=self.device))

    def validate(self, model, autocast, info: DistInfo, full: bool = False) -> dict[str, float]:
        """Loss and bits per byte on the first eval.max_tokens of the validation split (all of it when full)."""
        max_tokens = None if full else self.cfg.eval.max_tokens or None
        return lm_figures(model, self.val_batches(max_tokens), self.byte_lengths, autocast)

    def sample(self, model, autocast) -> str:
        e = self.cfg.eval
        idx = torch.tensor([self.tok.encode(e.sample_prompt)], device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        with autocast:
            out = generate(model, idx, e.sample_tokens, e.temperature, e.top_k, None, (), g)
        return self.tok.decode(out[0].tolist())
