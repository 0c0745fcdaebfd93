"""The network and its losses: single-device, no ranks, no autocast, no optimizer."""

from model.gpt import GPT, PRESETS, GPTConfig, KVCache
from model.losses import IGNORE, bradley_terry_loss, dpo_loss, score_mse, sequence_logps, token_ce_sum, token_logps
from model.reward import RewardModel

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "IGNORE", "RewardModel", "bradley_terry_loss", "dpo_loss",
           "score_mse", "sequence_logps", "token_ce_sum", "token_logps"]
