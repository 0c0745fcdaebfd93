"""Pre-training: next-token cross-entropy on every token of a text source, read from prepared token shards.

The shards are a prepared folder given as --data DIR (scripts/prepare_data.py), or prepared from the source into
the gptrain cache by `prepare`, before the process group starts (data/prepare.py; the processes of a machine
serialise on its file lock, the first prepares). Under a multi-node torchrun only a prepared folder is accepted.

The objective sums the loss over target tokens; its count is the number of target tokens (the loop divides once by
the step's global count). Validation: loss and bits per byte on the held-out documents; sample: a continuation of
eval.sample_prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data import shards
from data.prepare import prepare
from data.shards import is_prepared_dir, open_prepared
from data.tokenizer import Tokenizer
from model.gpt import GPTConfig
from model.losses import IGNORE, token_ce_sum
from training.config import Config
from training.distributed import DistInfo
from training.evaluation import lm_figures
from training.monitor import print0
from training.stages.base import Stage, generate, to_device
from training.tokenizer_cache import cache_root, hf_cache_dir


def shard_dir(cfg: Config, tok: Tokenizer) -> Path:
    """The cache folder of the source's preparation under this config's data settings and tokenizer."""
    d = cfg.data
    return shards.default_shard_dir(cache_root(cfg) / "shards", d.source, tok, text_column=d.text_column,
                                    val_fraction=d.val_fraction, max_tokens=d.max_tokens, max_docs=d.max_docs,
                                    chunk_tokens=d.chunk_tokens)


def _whose_tokenizer(cfg: Config) -> str:
    if cfg.resume:
        return f"the resumed run {cfg.out}"
    if cfg.init_from:
        return f"--init-from {cfg.init_from}"
    return f"--data.tokenizer {cfg.data.tokenizer}" if cfg.data.tokenizer else "this run"


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
    # budget on 2 CPU cores; the measurements are in the README. With the tiny preset's QK-norm, AdamW at 6e-3 beat
    # 3e-3 at 600 fixed steps but lost at full length (1.2837-1.2918 against 1.2806 with fewer steps), so 3e-3 stays.
    defaults = {"train.time_budget_min": 10.0, "train.optimizer": "muon", "train.batch_size": 8,
                "train.muon_lr": 0.01, "train.lr": 3e-3}

    @classmethod
    def check_launch(cls, cfg: Config, launch: DistInfo) -> None:
        source = cfg.data.source
        if launch.nodes > 1 and not is_prepared_dir(source):
            raise ValueError(f"--data {source}: under a torchrun of {launch.nodes} nodes every node must train on "
                             "the same prepared data; prepare it once with  python scripts/prepare_data.py "
                             f"{source} --out DIR  (on a shared disk, or copied to each node) and give --data DIR")

    @classmethod
    def prepare(cls, cfg: Config, tok: Tokenizer, gcfg: GPTConfig, launch: DistInfo) -> None:
        warm = cfg.train.seq_warmup_len  # before anything is written
        if warm and (warm >= gcfg.block_size or gcfg.block_size % warm):
            raise ValueError(f"train.seq_warmup_len={warm} must divide model.block_size={gcfg.block_size} and be "
                             "shorter: each window is cut into whole rows")
        source = cfg.data.source
        if is_prepared_dir(source):
            open_prepared(source).check_tokenizer(tok, _whose_tokenizer(cfg))
            return
        d = cfg.data
        if d.chunk_tokens <= gcfg.block_size:
            raise ValueError(f"data.chunk_tokens={d.chunk_tokens} must exceed model.block_size={gcfg.block_size}: "
                             "a block never straddles two chunks")
        prepare(source, tok, shard_dir(cfg, tok), text_column=d.text_column, val_fraction=d.val_fraction,
                max_tokens=d.max_tokens, max_docs=d.max_docs, chunk_tokens=d.chunk_tokens, workers=d.num_proc,
                block_size=gcfg.block_size, overwrite=True, verbose=launch.is_main, hf_cache_dir=hf_cache_dir(cfg))

    def __init__(self, cfg: Config, tok: Tokenizer, gcfg: GPTConfig, info: DistInfo) -> None:
        super().__init__(cfg, tok, gcfg, info)
        self.objective = LanguageModeling()
        self.block_size = gcfg.block_size
        source = cfg.data.source
        self.data = open_prepared(source if is_prepared_dir(source) else shard_dir(cfg, tok))
        self.data.check_tokenizer(tok, _whose_tokenizer(cfg))
        self.train = shards.TokenLoader(self.data.chunks("train"), cfg.train.batch_size, gcfg.block_size,
                                        seed=cfg.train.seed, rank=info.rank, world_size=info.world_size)
        self.val_chunks = self.data.chunks("val")
        self.byte_lengths = torch.as_tensor(tok.token_byte_lengths(), device=self.device).long()
        self.tokens_per_micro_batch = cfg.train.batch_size * gcfg.block_size
        train, val = self.data.split("train"), self.data.split("val")
        print0(f"data: {source}: train {train['tokens']:,} tokens ({train['bytes'] / 1e6:.1f} MB, "
               f"{len(train['chunks'])} chunk(s)), val {val['tokens']:,} tokens; {self.train.steps_per_epoch} steps "
               f"per epoch; prepared data {self.data.hash[:16]} in {self.data.root}")

    def identity(self) -> dict[str, str]:
        return {"prepared data": self.data.hash}

    def state_dict(self) -> dict:
        return {**self.train.state_dict(), "data_hash": self.data.hash}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("data_hash")
        if saved is not None and saved != self.data.hash:
            raise ValueError(f"--resume: the checkpoint was trained on prepared data {saved[:16]}, but "
                             f"{self.data.root} is prepared data {self.data.hash[:16]}; resume on the same data")
        self.train.load_state_dict(state)

    def train_batch(self) -> dict:
        x, y = self.train.next_batch()
        return to_device({"input_ids": x, "labels": y}, self.device)

    def val_batches(self, max_tokens: int | None):
        """This rank's validation batches (rank r scores blocks r, r + world_size, ...). Every rank yields the same
        number of batches -- a forward under FSDP is a collective -- so a rank whose share runs out first adds a
        stand-in batch whose targets are all ignored (it counts for nothing)."""
        B, T, W = self.cfg.train.batch_size, self.block_size, self.info.world_size
        n_blocks = shards.count_eval_blocks(self.val_chunks, T, max_tokens)
        most = -(-n_blocks // W)  # rank 0 holds the most blocks: ceil(n_blocks / W)
        n_batches = -(-most // B)
        done = 0
        for x, y in shards.eval_batches(self.val_chunks, B, T, max_tokens=max_tokens, rank=self.info.rank,
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
