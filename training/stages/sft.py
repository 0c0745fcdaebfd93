"""SFT: next-token cross-entropy on the assistant's tokens of conversations (data/sft.py renders and masks them).

The objective is pre-training's (training/stages/pretrain.py:LanguageModeling); the count is the supervised
tokens. Validation: loss on every held-out example once, and greedy exact match (val/accuracy) on up to
accuracy_examples held-out prompts; sample: the reply to the first of them.
"""

from __future__ import annotations

from data.sft import SFTBatcher, load_sft
from data.tokenizer import Tokenizer
from model.gpt import GPTConfig
from model.losses import IGNORE
from training.config import Config
from training.distributed import DistInfo
from training.evaluation import chat_accuracy, lm_figures
from training.monitor import print0
from training.stages.base import Stage, chat_eval_items, chat_sample, eval_shares, to_device
from training.stages.pretrain import LanguageModeling
from training.tokenizer_cache import hf_cache_dir


class SFTStage(Stage):
    """Supervised fine-tuning on conversations: cross-entropy on the assistant's tokens only."""

    accuracy_examples = 100  # validation prompts answered greedily for the accuracy figure
    # SFT of the tiny preset on the built-in tasks (measured, greedy exact match on 100 held-out prompts, ~2 min
    # on 2 cores): lr 1e-3 x 300 steps 0.10; 2e-3 x 300 0.18; 3e-3 x 300 0.10; 2e-3 x 600 0.41.
    defaults = {"data.source": "synthetic", "train.lr": 2e-3, "train.max_steps": 600, "train.warmup_steps": 20,
                "train.batch_size": 32, "train.weight_decay": 0.0, "eval.interval": 200, "eval.max_tokens": 0,
                "ckpt.interval": 600}

    def __init__(self, cfg: Config, tok: Tokenizer, gcfg: GPTConfig, info: DistInfo) -> None:
        super().__init__(cfg, tok, gcfg, info)
        self.objective = LanguageModeling()
        T = gcfg.block_size
        n_train, n_val = cfg.data.synthetic_train, cfg.data.synthetic_val
        cache = hf_cache_dir(cfg)
        train, st = load_sft(cfg.data.source, "train", tok, T, seed=cfg.train.seed, n_synthetic=n_train,
                             cache_dir=cache)
        val, sv = load_sft(cfg.data.source, "val", tok, T, seed=cfg.train.seed, n_synthetic=n_val, cache_dir=cache)
        for s in (st, sv):
            print0(f"data: {s['source']}: {s['n_examples']} examples ({s['n_dropped']} dropped: no supervised token "
                   f"left after truncation to {T}), {s['n_supervised']:,} supervised tokens")
        self.n_dropped = st["n_dropped"]
        self.train = SFTBatcher(train, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                                world_size=info.world_size, pack=cfg.data.pack, block_size=T)
        self.val_examples = val
        self.tokens_per_micro_batch = cfg.train.batch_size * T
        self.eval_items = chat_eval_items(cfg, "sft", self.accuracy_examples, tok, T, sv["kept"])

    def validate(self, model, autocast, info: DistInfo, full: bool = False) -> dict[str, float]:
        figures = lm_figures(model, self.val_batches(info), None, autocast)
        figures["accuracy"] = chat_accuracy(model, self.tok, self.eval_items, autocast, self.device)
        return figures

    def val_batches(self, info: DistInfo):
        """(input_ids, labels) of every validation example exactly once, this rank's share (see eval_shares)."""
        for idx in eval_shares(len(self.val_examples), self.cfg.train.batch_size, info.rank, info.world_size):
            rows = [self.val_examples[i] for i in idx] or self.val_examples[:1]
            b = to_device(SFTBatcher(rows, len(rows), shuffle=False).next_batch(), self.device)
            if not idx:  # an idle rank's stand-in row: its forward runs, none of its tokens count
                b["labels"].fill_(IGNORE)
            yield b["input_ids"], b["labels"]

    def sample(self, model, autocast) -> str:
        return chat_sample(model, self.tok, self.eval_items, autocast, self.device)
