"""Loss functions: hand-computed values, explicit reductions, masking, DPO variants."""

import math

import pytest
import torch

from model import dpo_loss, sequence_logps, token_ce_sum


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_token_ce_sum_hand_computed_and_masked():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # (1, 2, 2)
    targets = torch.tensor([[1, -100]])
    loss, n = token_ce_sum(logits, targets)
    assert n.item() == 1
    assert loss.item() == pytest.approx(-math.log(3 / 4), abs=1e-6)  # p(1) = 3 / (1 + 3)


def test_all_masked_batch_gives_zero_loss_and_zero_grad():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss, n = token_ce_sum(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and n.item() == 0
    assert torch.count_nonzero(logits.grad) == 0 and torch.isfinite(logits.grad).all()


def test_sequence_logps_sums_supervised_tokens_only():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 4, -100], [1, -100, -100, -100]])
    s, n = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    assert n.tolist() == [2, 1]
    torch.testing.assert_close(s, torch.stack([logp[0, 1, 3] + logp[0, 2, 4], logp[1, 0, 1]]))


def test_dpo_policy_equal_reference_is_ln2():
    lp = t(-3.0, -10.0)
    losses, cr, rr = dpo_loss(lp, lp - 1, lp, lp - 1)
    assert torch.all(losses == math.log(2))
    assert torch.all(cr == 0) and torch.all(rr == 0)


@pytest.mark.parametrize(
    "loss_type, beta, eps, expected",
    [
        # h = (pc - pr) - (rc - rr) = (-1 + 2) - 0 = 1; log s(x) = -log(1 + e^-x)
        ("sigmoid", 0.5, 0.0, math.log1p(math.exp(-0.5))),
        ("sigmoid", 0.5, 0.1, 0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5))),
        ("robust", 0.5, 0.1, (0.9 * math.log1p(math.exp(-0.5)) - 0.1 * math.log1p(math.exp(0.5))) / 0.8),
        ("ipo", 0.25, 0.0, (1 - 1 / (2 * 0.25)) ** 2),
        ("hinge", 0.5, 0.0, 0.5),
    ],
)
def test_dpo_hand_computed(loss_type, beta, eps, expected):
    losses, cr, rr = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    assert cr.item() == pytest.approx(beta * 0.5) and rr.item() == pytest.approx(-beta * 0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge"])
def test_dpo_finite_at_large_logps_and_grads_to_policy_only(loss_type):
    pc = torch.tensor([-1000.0, -1200.0], requires_grad=True)
    pr = torch.tensor([-1100.0, -900.0], requires_grad=True)
    rc, rr = torch.tensor([-1001.0, -1150.0]), torch.tensor([-1050.0, -950.0])
    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=0.1 if
                               loss_type in ("sigmoid", "robust") else 0.0)
    assert torch.isfinite(losses).all()
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and pc.grad.abs().sum() > 0
    assert not cr.requires_grad and not rr_.requires_grad


def test_dpo_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), label_smoothing=0.5)
