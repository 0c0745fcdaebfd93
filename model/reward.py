"""A reward model: the GPT with a scalar score head, read at the closing <|end|> of the response.

RewardModel is a GPT (same blocks, same state-dict names, so an SFT checkpoint loads into it) plus `score`, a
bias-free linear layer n_embd -> 1 on the final, normed hidden state. The score of a sequence is read at one
position per row, the closing <|end|> of the response: with right padding that is the last non-padding token,
which is where transformers' *ForSequenceClassification reads its `score` head. Attention is causal, so neither the
padding after that position nor the other rows of the batch change a row's score.

It subclasses GPT rather than wrapping one so that the training loop handles it as any policy: DDP and FSDP2 wrap
its forward (a score computed outside forward would bypass their hooks), and the loop's FLOPs, health and
histogram code see the usual blocks. Without end_positions, forward returns logits as GPT's does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.gpt import GPT, GPTConfig

SCORE_KEY = "score.weight"  # the head's name in the state dict (and transformers' name for it)


class RewardModel(GPT):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg)
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, 0.0, cfg.init_std)  # as every other linear layer (GPT.reset_parameters)
        if not cfg.tie_embeddings:
            # An untied output head takes no part in a score: frozen, so that DDP does not wait for its gradient (a
            # parameter that gets none stalls DDP's reduction) and the optimizer leaves it as it was loaded.
            self.lm_head.weight.requires_grad_(False)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                kv_cache=None, *, end_positions: torch.Tensor | None = None) -> torch.Tensor:
        """With end_positions (B,): the scores (B,), fp32. Without: logits (B, T, V), as GPT.forward."""
        if end_positions is None:
            return super().forward(idx, positions, doc_ids, kv_cache)
        return self.scores(idx, end_positions)

    def scores(self, input_ids: torch.Tensor, end_positions: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), end_positions (B,) index of each row's closing <|end|> -> scores (B,) in fp32."""
        h = self.hidden_states(input_ids)  # (B, T, C)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(h[rows, end_positions]).squeeze(-1).float()  # (B, C) -> (B,)


def is_reward_state(model_state: dict) -> bool:
    """Whether a checkpoint's weights (names as saved, maybe with wrapper prefixes) hold a score head."""
    return any(k == SCORE_KEY or k.endswith("." + SCORE_KEY) for k in model_state)
