"""Online RL (--stage rl): the KL estimator, group advantages and the clipped surrogate by hand; the objective's
ratio and REINFORCE gradient; rewards (built-in, TRL-style functions, a reward model) and their errors; real
train.py runs (metrics, exact resume, refusals)."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import train
from data.synthetic import make_sft
from data.tokenizer import END_ID, PAD_ID
from model.generation import generate_rollouts
from model.gpt import GPT, GPTConfig
from model.losses import ADVANTAGE_EPS, categorical_kl, clipped_surrogate, group_advantages, kl_estimate
from tests.conftest import TINY_ARGS, assert_resumes_exactly
from training import checkpoint
from training.load import load_run
from training.rewards import RewardModelScorer, Rollouts, combine_scores
from training.stages.base import StageEnv, frozen_reference
from training.stages.rl import GroupPolicyOptimization, RLStage, completion_logps


# ----------------------------------------------------------------------------------------------- losses
def test_kl_estimate_is_zero_at_equality_and_its_expectation_is_the_exact_kl():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    r = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert torch.equal(kl_estimate(p.log(), p.log()), torch.zeros(4))
    exact = (p * (p / r).log()).sum().item()  # KL(policy || reference)
    k3 = kl_estimate(p.log(), r.log())  # (4,) one value per token the policy could sample
    assert (k3 >= 0).all()
    assert (p * k3).sum().item() == pytest.approx(exact, rel=1e-6)  # expectation under the policy, exactly
    # ... and the mean over sampled tokens, within 4 standard errors
    g = torch.Generator().manual_seed(0)
    n = 200_000
    samples = torch.multinomial(p, n, replacement=True, generator=g)
    values = k3[samples]
    assert abs(values.mean().item() - exact) < 4 * values.std().item() / math.sqrt(n)


def test_categorical_kl_by_hand_and_as_the_estimates_expectation():
    """The exact KL of softmax distributions: p = (1/2, 1/2), r = (1/4, 3/4) by hand, 0 for equal logits (and for
    logits shifted by a constant: the same distribution), batched over leading dimensions, and equal to the expected
    k3 estimate, whose mean over sampled tokens is what RL logs as train/kl."""
    p, r = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.1438...
    assert categorical_kl(p.log(), r.log()).item() == pytest.approx(by_hand, rel=1e-6)
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert categorical_kl(logits, logits + 2.5).abs().max().item() < 1e-6
    other = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    kl = categorical_kl(logits, other)
    assert kl.shape == (3, 5) and (kl > 0).all()
    probs = logits.softmax(-1)
    expected_k3 = (probs * kl_estimate(logits.log_softmax(-1), other.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(kl, expected_k3, rtol=1e-5, atol=1e-6)


def test_kl_estimate_gradient_is_that_of_the_reverse_kl():
    """Samples held fixed, the expected estimate's gradient through the policy's log-probs is grad KL(ref || pol)."""
    logits = torch.tensor([1.0, 0.2, -0.5, 0.3], requires_grad=True)
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logp = logits.log_softmax(-1)
    weights = logp.exp().detach()  # the sampling distribution: not differentiated (the samples are data)
    (weights * kl_estimate(logp, ref.log())).sum().backward()
    estimate_grad = logits.grad.clone()
    logits.grad = None
    reverse_kl = (ref * (ref.log() - logits.log_softmax(-1))).sum()
    reverse_kl.backward()
    assert torch.allclose(estimate_grad, logits.grad, atol=1e-6)
    forward_kl = (logits.log_softmax(-1).exp() * (logits.log_softmax(-1) - ref.log())).sum()
    g_forward, = torch.autograd.grad(forward_kl, logits)
    assert not torch.allclose(estimate_grad, g_forward, atol=1e-3)  # not the forward KL's


def test_group_advantages_by_hand_with_an_all_equal_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    adv, std = group_advantages(rewards, 4, "group")
    s = math.sqrt((4 * 0.5**2) / 3)  # sample std of [1, 0, 0, 1]
    assert std.tolist() == pytest.approx([s, 0.0])
    want = [0.5 / (s + ADVANTAGE_EPS), -0.5 / (s + ADVANTAGE_EPS)] * 1
    assert adv[:4].tolist() == pytest.approx([want[0], want[1], want[1], want[0]], rel=1e-6)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: advantage 0, never NaN
    batch_std = rewards.std().item()
    adv_b, _ = group_advantages(rewards, 4, "batch", batch_std)
    assert adv_b[:4].tolist() == pytest.approx([0.5 / (batch_std + ADVANTAGE_EPS), -0.5 / (batch_std + ADVANTAGE_EPS),
                                                -0.5 / (batch_std + ADVANTAGE_EPS), 0.5 / (batch_std + ADVANTAGE_EPS)])
    adv_n, _ = group_advantages(rewards, 4, "none")
    assert adv_n.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 4, "token")


def test_clipped_surrogate_by_hand_inside_and_outside_the_clip():
    eps = 0.2
    ratios = torch.tensor([[1.1, 1.5, 0.5, 1.5, 0.5, 0.9]])
    adv = torch.tensor([2.0])
    old = torch.zeros(1, 6)
    loss, low, high = clipped_surrogate(ratios.log(), old, adv, eps)
    # A > 0: min(r A, clip(r) A) -> 1.1 A inside; 1.2 A clipped above; 0.5 A (the unclipped one is smaller) below
    assert loss[0].tolist() == pytest.approx([-2.2, -2.4, -1.0, -2.4, -1.0, -1.8], rel=1e-6)
    assert high[0].tolist() == [False, True, False, True, False, False]
    assert not low.any()  # ratio < 1 - eps only counts as clipped when A < 0
    loss_n, low_n, high_n = clipped_surrogate(ratios.log(), old, torch.tensor([-1.0]), eps)
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)): 1.1; 1.5 (unclipped, larger); 0.8 (clipped below)
    assert loss_n[0].tolist() == pytest.approx([1.1, 1.5, 0.8, 1.5, 0.8, 0.9], rel=1e-6)
    assert low_n[0].tolist() == [False, False, True, False, True, False] and not high_n.any()


# ----------------------------------------------------------------------------------------------- the objective
def rollout_batch(model, temperature=1.0):
    """A sampled batch of 2 prompts x 3 completions from `model`, with made-up advantages, as the stage builds it."""
    prompts = [[7, 8, 9, 10, 11], [12, 13]]
    ids = [p for p in prompts for _ in range(3)]
    keys = torch.arange(6, dtype=torch.long) * 7919 + 1
    out = generate_rollouts(model, ids, 6, temperature, keys, END_ID, PAD_ID)
    batch = {"input_ids": out.input_ids, "pad_mask": out.pad_mask, "positions": out.positions,
             "completion_mask": out.completion_mask, "prompt_len": out.prompt_len,
             "advantages": torch.tensor([1.0, -0.5, -0.5, 0.7, 0.0, -0.7])}
    with torch.no_grad():
        batch["ref_logps"], _ = completion_logps(model, batch, temperature)
    return batch


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_update_has_ratio_one_kl_zero_and_the_reinforce_gradient(temperature):
    model = tiny_policy()
    batch = rollout_batch(model, temperature)
    n = batch["completion_mask"].sum()
    objective = GroupPolicyOptimization(beta=0.0, clip_eps=0.2, temperature=temperature)
    loss_sum, metrics = objective(model, batch)
    # the policy is the reference (same weights, same numeric path): KL exactly 0; old = new.detach(): ratio 1
    assert metrics["kl"].item() == 0.0 and metrics["clip_ratio/region_mean"].item() == 0.0
    logps, _ = completion_logps(model, batch, temperature)
    assert torch.equal(torch.exp(logps - batch["old_logps"]), torch.ones_like(logps))
    (loss_sum / n).backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    mask = batch["completion_mask"].float()
    reinforce = -(batch["advantages"][:, None] * logps * mask).sum() / n  # -sum(A grad log pi) / N_tokens
    reinforce.backward()
    for k, p in model.named_parameters():
        assert torch.allclose(got[k], p.grad, atol=1e-6, rtol=1e-5), k
    # with beta > 0 the KL term adds nothing at the reference (its gradient vanishes there too)
    model.zero_grad()
    loss_kl, _ = GroupPolicyOptimization(beta=0.5, clip_eps=0.2, temperature=temperature)(model, batch)
    assert loss_kl.item() == pytest.approx(loss_sum.item(), abs=1e-6)


def test_kl_is_exactly_zero_at_the_start_in_bf16_autocast():
    """The frozen reference as the stage builds it (a copy of the policy before training), under the same autocast."""
    model = tiny_policy(1)
    env = StageEnv(start_checkpoint=None, resumed=False, wrap=lambda m: m, autocast=None, precision="bf16")
    reference = frozen_reference(model, env, "RL", "")
    assert reference is not model and not any(p.requires_grad for p in reference.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = rollout_batch(model)
        batch["ref_logps"], _ = completion_logps(reference, batch, 1.0)
        _, metrics = GroupPolicyOptimization(0.1, 0.2, 1.0)(model, batch)
    assert metrics["kl"].item() == 0.0


def test_rl_step_flops_count_the_generation_and_the_reference_only_on_a_step_that_generated():
    # Two micro-batches of 4 and 2 rows of T = 12 tokens whose generations ran forwards over 30 and 11 tokens: the
    # policy's forward and backward over 72 tokens, plus on the generating step forwards over 72 (the reference)
    # and 41 (the generation) tokens. A step that reuses its batch (rl.updates_per_batch > 1) runs only the first.
    model, T = tiny_policy(), 12
    train_fpt, forward_fpt = model.flops_per_token(T), model.flops_per_token(T, forward_only=True)
    batches = [{"input_ids": torch.zeros(4, T, dtype=torch.long), "generation_tokens": 30},
               {"input_ids": torch.zeros(2, T, dtype=torch.long), "generation_tokens": 11}]
    assert RLStage.step_flops(SimpleNamespace(fresh=True), model, batches) == 72 * train_fpt + 113 * forward_fpt
    assert RLStage.step_flops(SimpleNamespace(fresh=False), model, batches) == 72 * train_fpt


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_completion_logps_are_the_unpadded_rows_next_token_log_probs_at_the_temperature(arch):
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, arch=arch,
                          bias=arch == "gpt2")).eval()
    batch = rollout_batch(model, temperature=0.5)
    got, _ = completion_logps(model, batch, 0.5)  # (N, M)
    p = batch["prompt_len"]
    for row in range(batch["input_ids"].shape[0]):
        real = batch["input_ids"][row][batch["pad_mask"][row]]  # prompt + kept completion, unpadded
        n_prompt = int(batch["pad_mask"][row, :p].sum())
        logp = torch.log_softmax(model(real[None])[0].float() / 0.5, dim=-1)  # (L, V)
        for k in range(int(batch["completion_mask"][row].sum())):
            want = logp[n_prompt + k - 1, real[n_prompt + k]]
            assert got[row, k].item() == pytest.approx(want.item(), abs=1e-5), (row, k)


# ----------------------------------------------------------------------------------------------- runs

QUIET = ["--log.interval=1", "--log.health_interval=0", "--log.hist_interval=0", "--train.peak_flops=1e11"]
SMALL = ["--data.synthetic_train=64", "--data.synthetic_val=8", "--train.batch_size=2", "--rl.num_generations=4",
         "--rl.max_new_tokens=8", "--train.precision=fp32", "--rl.filter_groups=false"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


def rl_run(out, init, *args):
    return train.main(["--stage", "rl", "--out", str(out), "--init-from", str(init), *QUIET, *SMALL, *args])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def series(out, key):
    return {m["step"]: m[key] for m in metrics(out) if key in m}


TRL_TRAIN = ("train/loss", "train/reward", "train/reward_std", "train/kl", "train/entropy",
             "train/clip_ratio/region_mean", "train/clip_ratio/low_mean", "train/clip_ratio/high_mean",
             "train/completions/mean_length", "train/completions/clipped_ratio", "train/frac_reward_zero_std")


def test_rl_run_logs_grpo_metrics_starts_at_kl_zero_and_saves(tmp_path, tiny_run):
    out = tmp_path / "rl"
    rl_run(out, tiny_run, "--train.max_steps=3", "--eval.interval=3", "--rl.reward=builtin,tests.rl_rewards:digit_share",
           "--rl.reward_weights=1,0.5", "--rl.beta=0.1", "--train.lr=1e-2")
    for key in (*TRL_TRAIN, "train/rewards/builtin/mean", "train/rewards/digit_share/mean"):
        assert sorted(series(out, key)) == [1, 2, 3], key
    # step 1: the policy is the reference, and the batch's own log-probs are its old ones
    assert series(out, "train/kl")[1] == 0.0
    assert series(out, "train/clip_ratio/region_mean")[1] == 0.0
    assert series(out, "train/kl")[3] > 0  # the policy has moved
    for step in (1, 2, 3):  # the total is the weighted sum of the named rewards
        want = series(out, "train/rewards/builtin/mean")[step] + 0.5 * series(
            out, "train/rewards/digit_share/mean")[step]
        assert series(out, "train/reward")[step] == pytest.approx(want, abs=1e-6)
        assert 0 <= series(out, "train/frac_reward_zero_std")[step] <= 1
        assert 1 <= series(out, "train/completions/mean_length")[step] <= 8
    for key in ("val/accuracy", "val/reward", "val/accuracy/add", "val/rewards/builtin"):
        assert sorted(series(out, key)) == [0, 3], key
    ck = checkpoint.load(out)
    assert ck["stage"] == "rl"
    run = load_run(out)  # every script reads it
    assert run.model.cfg.block_size == 64
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out), size_guidance={"tensors": 0})
    acc.Reload()
    samples = [t for t in acc.Tags()["tensors"] if t.startswith("sample")]
    assert samples, acc.Tags()["tensors"]
    text = acc.Tensors(samples[0])[-1].tensor_proto.string_val[0].decode()
    assert "prompt:" in text and "reward" in text and "advantage" in text


@pytest.mark.parametrize("filter_groups", ["false", "true"])
def test_rl_resumes_exactly_in_the_middle_of_a_reused_batch(tmp_path, tiny_run, filter_groups):
    args = ["--train.max_steps=4", "--eval.interval=0", "--rl.updates_per_batch=2", "--rl.reward=tests.rl_rewards:odd_first_token",
            "--train.lr=1e-2", "--log.tensorboard=false", f"--rl.filter_groups={filter_groups}"]
    # stopped after the first use of the second batch
    whole = assert_resumes_exactly(lambda out, *a: rl_run(out, tiny_run, *a), tmp_path, args, stop_after=3)
    assert checkpoint.load(whole)["step"] == 4
    # steps 1 and 2 train on one batch (its figures logged twice); at step 2 the policy has moved from the weights
    # that generated it, so the same tokens give another loss and a KL above 0
    assert series(whole, "train/reward")[1] == series(whole, "train/reward")[2]
    assert series(whole, "train/loss")[1] != series(whole, "train/loss")[2]
    assert series(whole, "train/kl")[1] == 0.0 < series(whole, "train/kl")[2]


def test_reward_functions_get_trl_arguments_and_bad_ones_are_named(tmp_path, tiny_run, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RL_REWARD_LOG", str(log))
    rl_run(tmp_path / "ok", tiny_run, "--train.max_steps=1", "--eval.interval=0", "--rl.reward=tests.rl_rewards:record_call",
           "--log.tensorboard=false")
    call = json.loads(log.read_text().splitlines()[0])  # the first training generation (validation came after)
    assert len(call["prompts"]) == len(call["completions"]) == len(call["completion_ids"]) == 2 * 4
    assert call["prompts"][0] == call["prompts"][3] and call["prompts"][0][0]["role"] == "user"
    assert call["completions"][0][0]["role"] == "assistant"  # chat prompts get chat completions, as in TRL
    assert sorted(call["columns"]) == ["answer", "task"] and len(call["columns"]["answer"]) == 8
    cases = [("tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
             ("tests.rl_rewards:missing", "has no function 'missing'"),
             ("tests.rl_rewards:too_few", "returned 15 values for 16 completions"),
             ("tests.rl_rewards:not_finite", r"returned nan for completion 0 \(the prompt of record \d+ of built-in")]
    for spec, message in cases:
        out = tmp_path / spec.replace(":", "_")
        with pytest.raises(ValueError, match=message):
            rl_run(out, tiny_run, "--train.max_steps=2", "--eval.interval=0", f"--rl.reward={spec}",
                   "--data.synthetic_train=8", "--train.batch_size=4")
        assert checkpoint.latest(out) is None, spec  # no checkpoint written
    # a function raising on some prompts: the error names the record of the first prompt it fails on alone
    with pytest.raises(ValueError, match="raised RuntimeError: cannot score count prompts on the prompt of") as e:
        rl_run(tmp_path / "count", tiny_run, "--train.max_steps=2", "--eval.interval=0", "--data.synthetic_train=8",
               "--rl.reward=tests.rl_rewards:raises_on_count", "--train.batch_size=4")
    record = int(re.search(r"the prompt of record (\d+) of built-in synthetic sft data \(train, seed 1337\)",
                           str(e.value)).group(1))
    assert make_sft(8, 1337, "train")[record]["task"] == "count"


def test_rl_refusals(tmp_path, tiny_run):
    with pytest.raises(ValueError, match="rl.num_generations=1 must be at least 2"):
        rl_run(tmp_path / "g1", tiny_run, "--rl.num_generations=1")
    with pytest.raises(ValueError, match="is not a reward model"):
        rl_run(tmp_path / "pol", tiny_run, f"--rl.reward_model={tiny_run}")
    with pytest.raises(ValueError, match="--stage rl needs model.dropout=0"):
        rl_run(tmp_path / "dropout", tiny_run, "--model.dropout=0.1")
    assert not (tmp_path / "g1").exists()
    assert checkpoint.latest(tmp_path / "pol") is None


def test_rl_against_a_reward_model_and_its_refusals(tmp_path, tiny_run, corpus_dir):
    rm = tmp_path / "rm"
    train.main(["--stage", "rm", "--init-from", str(tiny_run), "--out", str(rm), *QUIET, "--train.max_steps=2",
                "--eval.interval=0", "--data.synthetic_train=16", "--data.synthetic_val=4", "--train.batch_size=4",
                "--log.tensorboard=false"])
    out = tmp_path / "rl_rm"
    rl_run(out, tiny_run, "--train.max_steps=2", "--eval.interval=2", f"--rl.reward_model={rm}",
           "--log.tensorboard=false")
    keys = {k for m in metrics(out) for k in m}
    assert "train/rewards/reward_model/mean" in keys and "val/rewards/reward_model" in keys
    assert "train/rewards/builtin/mean" not in keys  # a reward model alone replaces the built-in reward
    # the logged reward is the reward model's score of prompt + completion, recomputed here from the saved rollouts
    both = tmp_path / "rl_both"
    rl_run(both, tiny_run, "--train.max_steps=1", "--eval.interval=0", "--rl.reward=builtin",
           f"--rl.reward_model={rm}", "--rl.reward_weights=1,2", "--log.tensorboard=false")
    m = [r for r in metrics(both) if "train/reward" in r][0]
    assert m["train/reward"] == pytest.approx(m["train/rewards/builtin/mean"] + 2 * m["train/rewards/reward_model/mean"],
                                              abs=1e-5)
    # an RM run cannot start a policy stage; a reward model with another tokenizer is refused
    with pytest.raises(ValueError, match="is a reward model .* --stage rl trains a policy"):
        rl_run(tmp_path / "from_rm", rm)
    other = tmp_path / "other"
    train.main(["--data", str(corpus_dir), "--out", str(other), *TINY_ARGS, "--model.vocab_size=320",
                "--train.max_steps=1", "--eval.interval=0", "--log.tensorboard=false"])
    other_rm = tmp_path / "other_rm"
    train.main(["--stage", "rm", "--init-from", str(other), "--out", str(other_rm), *QUIET, "--train.max_steps=1",
                "--eval.interval=0", "--data.synthetic_train=8", "--data.synthetic_val=2", "--train.batch_size=4",
                "--log.tensorboard=false"])
    with pytest.raises(ValueError, match="its tokenizer .* differs from the policy's"):
        rl_run(tmp_path / "mismatch", tiny_run, f"--rl.reward_model={other_rm}")
    assert checkpoint.latest(tmp_path / "mismatch") is None


def test_ensemble_scores_standardised_per_member_then_min_or_mean_by_hand():
    scores = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])  # 3 completions x 2 reward models
    # member 1: mean 3, sample std 2 -> z -1, 0, 1; member 2: mean 20, std 10 -> z -1, 1, 0 (each over std + 1e-4)
    z1 = torch.tensor([-2.0, 0.0, 2.0]) / (2 + 1e-4)
    z2 = torch.tensor([-10.0, 10.0, 0.0]) / (10 + 1e-4)
    assert torch.allclose(combine_scores(scores, "min"), torch.minimum(z1, z2), atol=1e-7)
    assert torch.allclose(combine_scores(scores, "min"), torch.tensor([-1.0, 0.0, 0.0]), atol=1e-4)
    assert torch.allclose(combine_scores(scores, "mean"), torch.tensor([-1.0, 0.5, 0.5]), atol=1e-4)
    assert torch.equal(combine_scores(scores[:, :1], "min"), scores[:, 0])  # one reward model: its raw score
    assert torch.equal(combine_scores(scores[:1], "min"), torch.zeros(1))  # one completion: nothing to compare
    flat = torch.tensor([[2.0, 1.0], [2.0, 3.0]])  # a member that scores every completion alike says nothing
    # member 1: std 0 -> z 0, 0; member 2: mean 2, sample std sqrt(2) -> z -1 / sqrt(2), +1 / sqrt(2)
    assert torch.allclose(combine_scores(flat, "mean"), torch.tensor([-0.5, 0.5]) / 2 ** 0.5, atol=1e-4)
    with pytest.raises(ValueError, match="reward_model_combine='max'"):
        combine_scores(scores, "max")


def test_rl_against_an_ensemble_of_reward_models(tmp_path, tiny_run):
    rms = []
    for seed in (1, 2):
        rm = tmp_path / f"rm{seed}"
        train.main(["--stage", "rm", "--init-from", str(tiny_run), "--out", str(rm), *QUIET, "--train.max_steps=2",
                    "--eval.interval=0", "--data.synthetic_train=16", "--data.synthetic_val=4", "--train.batch_size=4",
                    f"--train.seed={seed}", "--log.tensorboard=false"])
        rms.append(str(rm))
    for how in ("mean", "min"):
        out = tmp_path / f"rl_{how}"
        rl_run(out, tiny_run, "--train.max_steps=2", "--eval.interval=0", f"--rl.reward_model={','.join(rms)}",
               f"--rl.reward_model_combine={how}", "--log.tensorboard=false")
        logged = [r for r in metrics(out) if "train/reward" in r]
        assert len(logged) == 2
        for m in logged:
            assert "train/rewards/reward_model_1/mean" in m and "train/rewards/reward_model_2/mean" in m
            # each member's scores are standardised over the micro-batch: their mean is 0, so is that of the mean
            # of the members, and the min of the members is at most that
            if how == "mean":
                assert m["train/rewards/reward_model/mean"] == pytest.approx(0.0, abs=1e-5)
            else:
                assert m["train/rewards/reward_model/mean"] < -0.05  # the members disagree somewhere
            assert m["train/reward"] == pytest.approx(m["train/rewards/reward_model/mean"], abs=1e-6)
    with pytest.raises(ValueError, match="names a reward model twice"):
        rl_run(tmp_path / "twice", tiny_run, f"--rl.reward_model={rms[0]},{rms[0]}")
    with pytest.raises(ValueError, match=f"--rl.reward_model {tiny_run}: .* is not a reward model"):
        rl_run(tmp_path / "policy_member", tiny_run, f"--rl.reward_model={rms[0]},{tiny_run}")
    assert checkpoint.latest(tmp_path / "policy_member") is None


def test_reward_model_scorer_scores_each_unpadded_sequence_at_its_last_token(tmp_path, tiny_run):
    rm = tmp_path / "rm"
    train.main(["--stage", "rm", "--init-from", str(tiny_run), "--out", str(rm), *QUIET, "--train.max_steps=1",
                "--eval.interval=0", "--data.synthetic_train=8", "--data.synthetic_val=2", "--train.batch_size=4",
                "--log.tensorboard=false"])
    tok = load_run(tiny_run).tok
    scorer = RewardModelScorer(str(rm), tok, 64)
    scorer.build(torch.device("cpu"), lambda m: m)
    prompts = [[3, 40, 41, 42, 5], [3, 50, 5]]
    completions = [[60, 61, END_ID], [70, 71, 72, 73, 74]]  # the second never reached <|end|> (truncated)
    ro = Rollouts(["a", "b"], ["x", "y"], completions, {}, prompts, ["record 0", "record 1"])
    got = scorer(ro, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = torch.tensor([p + c])
        want = scorer.model.scores(seq, torch.tensor([seq.shape[1] - 1]))
        assert got[row].item() == pytest.approx(want.item(), abs=1e-6)


def test_equal_rewards_give_no_signal_and_batch_scaling_divides_by_the_batch_std(tmp_path, tiny_run):
    out = tmp_path / "constant"
    rl_run(out, tiny_run, "--train.max_steps=2", "--eval.interval=0", "--rl.reward=tests.rl_rewards:constant",
           "--rl.beta=0.5", "--log.tensorboard=false")
    for step in (1, 2):
        m = [r for r in metrics(out) if r["step"] == step and "train/loss" in r][0]
        assert m["train/frac_reward_zero_std"] == 1.0 and m["train/reward_std"] == 0.0
        assert m["train/reward"] == pytest.approx(0.3)
        assert m["train/loss"] == pytest.approx(0.5 * m["train/kl"], abs=1e-7)  # advantages 0: only the KL term
    # --rl.scale_rewards=batch: a batch stopped before its second use keeps its rewards and advantages
    split = tmp_path / "batch"
    rl_run(split, tiny_run, "--train.max_steps=2", "--eval.interval=0", "--rl.reward=tests.rl_rewards:odd_first_token",
           "--rl.scale_rewards=batch", "--rl.updates_per_batch=2", "--train.stop_after_steps=1",
           "--log.tensorboard=false")
    (batch,) = checkpoint.load(split)["loader"]["batches_by_rank"][0]
    r = batch["rewards"].double()  # (B x G,) groups of 4
    centred = (r.view(-1, 4) - r.view(-1, 4).mean(1, keepdim=True)).flatten()
    want = centred / (r.std() + ADVANTAGE_EPS)
    assert torch.allclose(batch["advantages"].double(), want, atol=1e-5)
    assert r.std() > 0


def test_filter_groups_keeps_the_informative_groups_and_normalises_by_their_tokens(tmp_path, tiny_run):
    # The same first batch with and without --rl.filter_groups (a reward that varies only on `sort` prompts), stopped
    # before the batch's second use so that the checkpoint holds it: the filtered batch is exactly the unfiltered
    # one's rows of the groups whose rewards differ; at step 1 (ratio 1, KL 0) a group of equal rewards adds 0 to
    # the loss sum, so the two losses differ only by their token counts.
    args = ["--train.max_steps=2", "--eval.interval=0", "--rl.reward=tests.rl_rewards:digit_share_on_sort",
            "--rl.updates_per_batch=2", "--train.stop_after_steps=1", "--train.batch_size=8", "--log.tensorboard=false"]
    rl_run(tmp_path / "all", tiny_run, *args)
    rl_run(tmp_path / "kept", tiny_run, *args, "--rl.filter_groups=true")
    (whole,) = checkpoint.load(tmp_path / "all")["loader"]["batches_by_rank"][0]
    (kept,) = checkpoint.load(tmp_path / "kept")["loader"]["batches_by_rank"][0]
    groups = whole["rewards"].view(8, 4)
    informative = groups.std(dim=1) > 0  # (8,)
    assert 0 < informative.sum() < 8, groups  # some groups of each kind, so the test shows something
    rows = informative.repeat_interleave(4)
    for key in ("input_ids", "completion_mask", "advantages", "rewards", "ref_logps", "positions", "pad_mask"):
        assert torch.equal(kept[key], whole[key][rows]), key
    assert torch.all(whole["advantages"][~rows] == 0)
    tokens_whole, tokens_kept = whole["completion_mask"].sum().item(), kept["completion_mask"].sum().item()
    loss_whole, loss_kept = series(tmp_path / "all", "train/loss")[1], series(tmp_path / "kept", "train/loss")[1]
    assert loss_kept != 0
    assert loss_kept * tokens_kept == pytest.approx(loss_whole * tokens_whole, rel=1e-5, abs=1e-7)
    # the figures of the generation are those of every group, filtered or not
    for key in ("train/reward", "train/frac_reward_zero_std", "train/completions/mean_length"):
        assert series(tmp_path / "kept", key)[1] == series(tmp_path / "all", key)[1], key
    assert series(tmp_path / "kept", "train/frac_reward_zero_std")[1] == pytest.approx(1 - informative.float().mean())


def test_filter_groups_with_no_informative_group_keeps_a_placeholder_that_adds_nothing(tmp_path, tiny_run):
    out = tmp_path / "constant"
    rl_run(out, tiny_run, "--train.max_steps=3", "--eval.interval=0", "--rl.reward=tests.rl_rewards:constant",
           "--rl.filter_groups=true", "--rl.updates_per_batch=2", "--train.stop_after_steps=3",
           "--log.tensorboard=false")
    (batch,) = checkpoint.load(out)["loader"]["batches_by_rank"][0]
    assert batch["input_ids"].shape[0] == 4  # one group of G=4 rows: the placeholder
    assert not batch["completion_mask"].any()
    for step in (1, 2, 3):  # nothing to learn from and nothing counted: loss and KL are exactly 0, not NaN
        assert series(out, "train/loss")[step] == 0.0 and series(out, "train/kl")[step] == 0.0
        assert series(out, "train/frac_reward_zero_std")[step] == 1.0


def test_rl_prompts_from_a_file_with_extra_columns_reach_the_reward(tmp_path, tiny_run, monkeypatch):
    from data.rl import load_rl_prompts

    folder = tmp_path / "prompts"
    folder.mkdir()
    rows = [{"prompt": f"Say {w}", "target": w, "level": i} for i, w in enumerate(["yes", "no", "maybe", "ok"])]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "validation.jsonl").write_text(json.dumps({"prompt": "Say ok", "target": "ok", "level": 9}) + "\n")
    chats = tmp_path / "chats.jsonl"  # a conversation's last assistant turn becomes the answer column
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Say ok"},
                                              {"role": "assistant", "content": "ok"}], "task": "echo"}) + "\n")
    tok = load_run(tiny_run).tok
    prompts, stats = load_rl_prompts(str(folder), "train", tok, 64, 8)
    assert stats["n_examples"] == 4 and prompts[0].prompt == "Say yes"
    assert prompts[0].columns == {"target": "yes", "level": 0}
    val, _ = load_rl_prompts(str(folder), "val", tok, 64, 8)
    assert val[0].prompt == "Say ok" and val[0].columns == {"target": "ok", "level": 9}
    conv, _ = load_rl_prompts(str(chats), "train", tok, 64, 8)
    assert conv[0].columns == {"answer": "ok", "task": "echo"}
    assert conv[0].prompt == [{"role": "user", "content": "Say ok"}]
    lengths = sorted(len(p.ids) for p in prompts)
    assert lengths[0] < lengths[-1]
    kept, st = load_rl_prompts(str(folder), "train", tok, 64, 64 - lengths[0])  # room for the shortest only
    assert len(kept) == lengths.count(lengths[0]) and st["n_dropped"] == 4 - len(kept)
    with pytest.raises(ValueError, match="all 4 prompts leave no room for rl.max_new_tokens=64 in block_size=64"):
        load_rl_prompts(str(folder), "train", tok, 64, 64)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RL_REWARD_LOG", str(log))
    rl_run(tmp_path / "rl", tiny_run, "--data", str(folder), "--train.max_steps=1", "--eval.interval=0",
           "--rl.reward=tests.rl_rewards:record_call", "--log.tensorboard=false")
    call = json.loads(log.read_text().splitlines()[0])
    assert sorted(call["columns"]) == ["level", "target"] and isinstance(call["completions"][0], str)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"record 0 of .*bad: an RL record needs 'prompt'.*found fields \['question'\]"):
        load_rl_prompts(str(bad), "train", tok, 64, 8)


def test_rl_raises_the_reward_it_is_trained_on(tmp_path, tiny_run):
    # The end-to-end check that the update goes uphill: rewarding an odd first token id (about half the samples of
    # the tiny pre-trained model at first), a few steps make most first tokens odd; a sign error in the advantage
    # or the surrogate drives the reward down instead.
    out = tmp_path / "rl"
    rl_run(out, tiny_run, "--train.max_steps=12", "--eval.interval=0", "--rl.reward=tests.rl_rewards:odd_first_token",
           "--rl.num_generations=8", "--rl.beta=0.01", "--train.lr=3e-2", "--train.warmup_steps=0", "--log.tensorboard=false")
    reward = series(out, "train/reward")
    first, last = sum(reward[s] for s in (1, 2, 3)) / 3, sum(reward[s] for s in (10, 11, 12)) / 3
    assert last > first + 0.25, reward
    assert series(out, "train/kl")[12] > 0


def test_partial_credit_reward_by_hand_and_its_missing_columns():
    from training.rewards import partial_credit_reward

    chat = [[{"role": "assistant", "content": "7 19 7 42"}], [{"role": "assistant", "content": "433"}]]
    values = partial_credit_reward(prompts=["p", "q"], completions=chat, task=["sort", "add"],
                                   answer=["7 7 19 42", "432"], completion_ids=[[1], [2]])
    assert values == [0.5, 0.5]  # positions 0 and 3 right; off by one: 1 / (1 + 1)
    assert partial_credit_reward(prompts=["p"], completions=["3"], task=["count"], answer=[3]) == [1.0]
    with pytest.raises(ValueError, match="need 'task' and 'answer' columns"):
        partial_credit_reward(prompts=["p"], completions=["3"], answer=["3"])


def test_step_part_timings_wait_for_cuda_work(monkeypatch):
    """bench.py --rl's generation / scoring / reference split: CUDA kernels run asynchronously, so each clock read
    on a CUDA device first waits for the queued work (without it a reference pass's kernels were timed in the
    update); on the CPU nothing is queued and no sync is made."""
    from training.stages import rl

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    before = rl.device_clock(torch.device("cuda", 1))
    assert synced == [torch.device("cuda", 1)]
    after = rl.device_clock(torch.device("cpu"))
    assert synced == [torch.device("cuda", 1)] and after >= before
