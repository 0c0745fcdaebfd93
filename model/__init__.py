"""The network and its losses: single-device, no ranks, no autocast, no optimizer."""

from model.gpt import GPT, PRESETS, GPTConfig, KVCache
from model.losses import IGNORE, dpo_loss, sequence_logps, token_ce_sum, token_logps

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "IGNORE", "dpo_loss", "sequence_logps", "token_ce_sum",
           "token_logps"]
