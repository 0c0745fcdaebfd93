"""The reward model (--stage rm): its losses by hand, the score head's independence from padding and batch
composition, its data (pairs with margins, rated completions, the built-in partial credit), real train.py runs."""

from __future__ import annotations

import math

import pytest
import torch

from data.tokenizer import END_ID, PAD_ID
from model import GPT, GPTConfig, RewardModel, bradley_terry_loss, score_mse


# ----------------------------------------------------------------------------------------------- losses
def test_bradley_terry_loss_by_hand_with_and_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    plain = bradley_terry_loss(chosen, rejected)
    assert plain.tolist() == pytest.approx([-math.log(sig(1.0)), math.log(2.0), -math.log(sig(-2.0))], abs=1e-6)
    margin = torch.tensor([0.5, 1.0, 0.0])  # the chosen score must beat the rejected one by this much
    with_margin = bradley_terry_loss(chosen, rejected, margin)
    assert with_margin.tolist() == pytest.approx([-math.log(sig(0.5)), -math.log(sig(-1.0)),
                                                  -math.log(sig(-2.0))], abs=1e-6)
    assert with_margin.dtype == torch.float32


def test_score_mse_by_hand():
    assert score_mse(torch.tensor([1.0, -0.5]), torch.tensor([0.0, 1.5])).tolist() == pytest.approx([1.0, 4.0])


# ----------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_score_ignores_right_padding_and_batch_composition(arch):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, arch=arch, bias=arch == "gpt2")
    rm = RewardModel(cfg).eval()
    short = torch.tensor([5, 9, 17, 3, END_ID])
    longer = [torch.randint(8, 64, (n,)) for n in (11, 20)]
    alone = rm.scores(short[None], torch.tensor([4]))
    batch = torch.full((3, 20), PAD_ID)
    batch[0, :5] = short
    for row, seq in enumerate(longer, start=1):
        batch[row, : len(seq)] = seq
    together = rm.scores(batch, torch.tensor([4, 10, 19]))
    assert together.shape == (3,) and together.dtype == torch.float32
    assert together[0].item() == pytest.approx(alone.item(), abs=1e-6)
    # the score is the head on the final normed hidden state at the end position, nothing else
    h = rm.hidden_states(short[None])[0, 4]
    assert alone.item() == pytest.approx((h @ rm.score.weight[0]).item(), abs=1e-6)
    # the forward of the wrapped model (what DDP/FSDP call) gives the same scores; without end positions, logits
    assert torch.equal(rm(batch, end_positions=torch.tensor([4, 10, 19])), together)
    assert rm(batch).shape == (3, 20, 64)


def test_reward_model_loads_a_gpt_state_and_keeps_its_logits():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    gpt = GPT(cfg).eval()
    rm = RewardModel(cfg).eval()
    missing, unexpected = rm.load_state_dict(gpt.state_dict(), strict=False)
    assert missing == ["score.weight"] and unexpected == []
    idx = torch.randint(0, 64, (2, 7))
    assert torch.equal(rm(idx), gpt(idx))
