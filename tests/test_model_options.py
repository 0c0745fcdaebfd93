"""The candidate model options of model/gpt.py, one at a time against a hand computation: QK-norm, ReLU-squared,
logit soft-capping, residual and x0 scalars, value embeddings, the hashed bigram embedding; each option's start
against the plain model, their parameter and FLOP counts, optimizer groups, config keys, left-padded generation and
exact resume. The KV-cache, packing and causality parity over the options is in tests/test_model.py."""

from __future__ import annotations

import math

import pytest
import torch

from model import GPT, GPTConfig, KVCache
from model.generation import generate_rollouts
from model.gpt import bigram_bucket
from tests.conftest import TINY_ARGS

SMALL = dict(vocab_size=97, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


def build(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **options})).eval()


def perturbed(model: GPT, scale: float = 0.5) -> GPT:
    """Every parameter moved away from its init (the options' tables start at zero, gates and lambdas at 1 or 0)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def block_inputs(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream each block receives (before its own scalars), (B, T, C) per block."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("option", [dict(residual_scalars=True), dict(value_embeds=2), dict(bigram_buckets=50)],
                         ids=["residual_scalars", "value_embeds", "bigram_buckets"])
def test_option_starts_as_the_plain_model(option):
    """At init these options add nothing, and the plain weights are drawn as the plain model draws them: the same
    seed gives bitwise the same logits."""
    plain, with_option = build(), build(**option)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.equal(with_option(idx), plain(idx))
    assert with_option.num_params() > plain.num_params()


def test_qk_norm_normalises_each_head_before_the_rotation():
    """Scaling the q and k projections changes nothing under QK-norm (each head's q and k are RMS-normalised) but
    changes the plain model (an epsilon of 1e-10, so the norm's own epsilon does not show); and layer 0's cached keys
    are rope(k_norm(k)) computed by hand."""
    for qk_norm in (False, True):
        model = perturbed(build(qk_norm=qk_norm, norm_eps=1e-10), 0.1)
        idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            before = model(idx)
            for block in model.blocks:
                block.attn.q_proj.weight.mul_(7.0)
                block.attn.k_proj.weight.mul_(7.0)
            after = model(idx)
        if qk_norm:
            torch.testing.assert_close(after, before, atol=2e-5, rtol=0)
        else:
            assert (after - before).abs().max() > 0.1
    attn, cfg = model.blocks[0].attn, model.cfg
    cache = KVCache(cfg, 2, 32, "cpu", torch.float32)
    with torch.no_grad():
        model(idx, kv_cache=cache)
        h = model.blocks[0].norm1(model.wte(idx))  # (B, T, C)
        k = (h @ attn.k_proj.weight.T).view(2, 20, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, K, T, D)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * attn.k_norm.weight
        d = cfg.head_dim
        angle = torch.arange(20.0)[:, None] * cfg.rope_theta ** (-torch.arange(0, d, 2.0) / d)  # (T, D/2)
        k1, k2 = k[..., : d // 2], k[..., d // 2 :]
        rotated = torch.cat([k1 * angle.cos() - k2 * angle.sin(), k2 * angle.cos() + k1 * angle.sin()], dim=-1)
    torch.testing.assert_close(cache.k[0][:, :, :20], rotated, atol=1e-5, rtol=0)


def test_relu_squared_mlp_by_hand():
    model = perturbed(build(relu_squared=True), 0.1)
    mlp = model.blocks[1].mlp
    assert not hasattr(mlp, "gate_proj")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        up = x @ mlp.up_proj.weight.T  # (B, T, h)
        want = (up.clamp(min=0) ** 2) @ mlp.down_proj.weight.T
        torch.testing.assert_close(mlp(x), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="model.relu_squared=true needs arch=modern"):
        GPTConfig(arch="gpt2", relu_squared=True)
    with pytest.raises(ValueError, match="model.qk_norm=true needs arch=modern"):
        GPTConfig(arch="gpt2", qk_norm=True)


def test_logit_softcap_bends_every_logit_into_the_cap():
    cap = 2.0
    capped = perturbed(build(logit_softcap=cap))
    plain = build()
    plain.load_state_dict(capped.state_dict())  # the same weights, no cap
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        raw, got = plain(idx), capped(idx)
    assert raw.abs().max() > 3 * cap  # the cap matters for these logits
    torch.testing.assert_close(got, cap * torch.tanh(raw / cap), atol=1e-5, rtol=0)
    assert got.abs().max() < cap and got.dtype == torch.float32
    # the KV-cache path (generation) too: a prefill's last logits are the capped ones
    with torch.no_grad():
        step = capped(idx[:, :10], kv_cache=KVCache(capped.cfg, 2, 32, "cpu", torch.float32))[:, -1]  # (B, V)
    torch.testing.assert_close(step, cap * torch.tanh(raw[:, 9] / cap), atol=1e-4, rtol=0)  # raw logits ~10
    with pytest.raises(ValueError, match="model.logit_softcap=-1"):
        GPTConfig(logit_softcap=-1.0)


def test_residual_scalars_weigh_the_stream_and_the_embedding_output():
    model = build(residual_scalars=True)
    lambdas, mus = [0.5, 2.0, -1.0, 1.5], [2.0, -0.5, 0.25, 1.0]
    with torch.no_grad():
        for block, lam, mu in zip(model.blocks, lambdas, mus, strict=True):
            block.resid_lambda.fill_(lam)
            block.x0_lambda.fill_(mu)
    idx = torch.randint(0, 97, (2, 12))
    rope = (model.rope_cos[:12], model.rope_sin[:12])
    with torch.no_grad():
        x0 = model.wte(idx)  # (B, T, C): the embedding output every block's x0 scalar weighs
        x = x0
        for i, (block, lam, mu) in enumerate(zip(model.blocks, lambdas, mus, strict=True)):
            x = lam * x + mu * x0
            x = x + block.attn(block.norm1(x), rope, "causal", None, i)
            x = x + block.mlp(block.norm2(x))
        want = model.lm_head(model.norm_f(x))
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=0)


def test_value_embedding_layout_and_values():
    """value_embeds=1 of 4 layers: table 0 feeds layers 0 and 3; =2: tables 0, 1, 0, 1. The cached values of layer 0
    and of layer 3 (the last, reusing table 0 under its own gate) are v_proj(norm1(x)) + gate x table[token], per kv
    head, x the layer's input."""
    assert [GPTConfig(**SMALL, value_embeds=1).value_embed_table(i) for i in range(4)] == [0, None, None, 0]
    assert [GPTConfig(**SMALL, value_embeds=2).value_embed_table(i) for i in range(4)] == [0, 1, 0, 1]
    model = perturbed(build(value_embeds=1), 0.1)
    assert [b.attn.ve_gate is not None for b in model.blocks] == [True, False, False, True]
    assert len(model.value_embeds) == 1 and model.value_embeds[0].weight.shape == (97, 2 * 8)
    gates = {0: torch.tensor([0.5, -2.0]), 3: torch.tensor([1.5, 0.25])}  # per kv head, distinct per layer
    with torch.no_grad():
        for layer, gate in gates.items():
            model.blocks[layer].attn.ve_gate.copy_(gate)
    idx = torch.randint(0, 97, (2, 10))
    inputs = block_inputs(model, idx)  # (B, T, C) per block
    cache = KVCache(model.cfg, 2, 32, "cpu", torch.float32)
    with torch.no_grad():
        model(idx, kv_cache=cache)
        ve = model.value_embeds[0](idx).view(2, 10, 2, 8)  # (B, T, K, D): the one table, looked up once
        for layer, gate in gates.items():
            attn = model.blocks[layer].attn
            v = model.blocks[layer].norm1(inputs[layer]) @ attn.v_proj.weight.T  # (B, T, K D)
            want = v.view(2, 10, 2, 8) + gate[:, None] * ve
            torch.testing.assert_close(cache.v[layer][:, :, :10], want.transpose(1, 2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="model.value_embeds=3"):
        GPTConfig(**SMALL, value_embeds=3)


def bigram_row_by_hand(prev: int, token: int, buckets: int) -> int:
    """model.gpt.bigram_bucket's docstring in Python integers (unbounded, so no overflow can hide here)."""
    h = (36313 * prev) ^ (27191 * token)
    h = (h ^ (h >> 32)) % 2**32
    for _ in range(2):
        h ^= h >> 16
        h = (h * 0x45D9F3B) % 2**32
    return (h ^ (h >> 16)) % buckets


def test_bigram_embedding_by_hand():
    """The embedding output is wte[token] + table[hash(prev, token) mod B], the first token of a row without it;
    the hash is model.gpt.bigram_bucket's mixed (36313 prev) xor (27191 token)."""
    # 3 * 36313 ^ 5 * 27191 = 0x3BA98; ^ >> 16: 0x3BA9B; * 0x45D9F3B mod 2^32: 0x881146B9; ^ >> 16: 0x8811CEA8;
    # * 0x45D9F3B mod 2^32: 0x1E7CF8B8; ^ >> 16: 0x1E7CE6C4, whose low 6 bits are 0b000100
    assert bigram_bucket(torch.tensor(3), torch.tensor(5), 64).item() == bigram_row_by_hand(3, 5, 64) == 4
    big = torch.tensor([50256, 2**20 + 7])  # a GPT-2-sized token and one past 2^20 (h above 32 bits: the fold)
    assert bigram_bucket(big, big.flip(0), 1000).tolist() == [bigram_row_by_hand(50256, 2**20 + 7, 1000),
                                                               bigram_row_by_hand(2**20 + 7, 50256, 1000)]
    model = perturbed(build(bigram_buckets=50), 0.1)
    idx = torch.randint(0, 97, (2, 9))
    x0 = block_inputs(model, idx)[0]  # (B, T, C): the embedding output (dropout 0)
    table, wte = model.bigram_embed.weight, model.wte.weight
    for b in range(2):
        for t in range(9):
            want = wte[idx[b, t]].clone()
            if t > 0:
                want += table[bigram_row_by_hand(int(idx[b, t - 1]), int(idx[b, t]), 50)]
            torch.testing.assert_close(x0[b, t], want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="model.bigram_buckets=-1"):
        GPTConfig(bigram_buckets=-1)


@pytest.mark.parametrize("buckets", [64, 50])
def test_bigram_hash_uses_the_high_bits(buckets):
    """With B = 2^k a hash that keeps only the low k bits sends (p, t) and (p + B, t) (and (p, t + B)) to one row
    always; the mixed hash agrees on about 1 in B of them, like any two independent rows. Every row is used."""
    prev, token = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")  # (256, 256) each
    rows = bigram_bucket(prev, token, buckets)
    same_prev_shift = (rows == bigram_bucket(prev + buckets, token, buckets)).double().mean().item()
    same_token_shift = (rows == bigram_bucket(prev, token + buckets, buckets)).double().mean().item()
    assert same_prev_shift < 3 / buckets and same_token_shift < 3 / buckets, (same_prev_shift, same_token_shift)
    load = torch.bincount(rows.flatten(), minlength=buckets)  # 65536 bigrams: 1024 per row at 64 rows
    assert load.min() > 0.8 * 65536 / buckets and load.max() < 1.2 * 65536 / buckets, load


@pytest.mark.parametrize("options", [dict(bigram_buckets=31, value_embeds=1, residual_scalars=True),
                                     dict(qk_norm=True, logit_softcap=3.0)], ids=["tables-scalars", "norm-cap"])
def test_left_padded_rollouts_equal_each_row_alone(options):
    """Batched RL generation left-pads the prompts: each row's logits equal the row's own, unpadded (the bigram of
    a row's first real token has no previous token, whatever padding precedes it)."""
    model = perturbed(build(**options), 0.3)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 6], [11]]
    out = generate_rollouts(model, prompts, 6, 1.0, torch.tensor([1, 2, 3]), stop_token=-1, pad_id=1)
    with torch.no_grad():
        batched = model(out.input_ids, positions=out.positions, pad_mask=out.pad_mask)
        for i in range(3):
            real = out.pad_mask[i]
            alone = model(out.input_ids[i][real][None])[0]
            torch.testing.assert_close(batched[i][real], alone, atol=1e-4, rtol=0)  # a wrong bigram: ~7


def test_param_and_flop_counts_of_the_options_by_hand():
    # tests/test_model.py's modern model: V=10, C=8, H=2, K=1 (D=4), L=2, mlp hidden 16, tied: 1272 parameters,
    # N = 1232 matmul weights, 8544 training FLOPs per token at T = 6 (full attention).
    base = dict(vocab_size=10, block_size=6, n_layer=2, n_head=2, n_kv_head=1, n_embd=8, mlp_ratio=2.0)
    relu2 = GPT(GPTConfig(**base, relu_squared=True))
    # MLP 2 x 8 x 16 = 256 instead of 384: 1272 - 2 x 128; N = 2 x (192 + 256) + 80 = 976
    assert relu2.num_params() == 1272 - 256 == 1016
    assert relu2.flops_per_token() == 6 * 976 + 12 * 2 * 8 * 6 == 7008
    assert relu2.flops_per_token(causal=True, forward_only=True) == 2 * 976 + 2 * 2 * 8 * 6
    every = GPT(GPTConfig(**base, qk_norm=True, residual_scalars=True, value_embeds=1, bigram_buckets=7,
                          logit_softcap=15.0))
    # + q_norm, k_norm (4 + 4) per layer, + lambda, mu (1 + 1) per layer, + one value table 10 x 4 (K D = 4) and
    # its gate (K = 1) in layers 0 and 1, + the bigram table 7 x 8; the soft-cap has no parameters
    assert every.num_params() == 1272 + 16 + 4 + 40 + 2 + 56 == 1390
    # non-embedding leaves out the token embedding (80), the value table (40) and the bigram table (56)
    assert every.num_params(non_embedding=True) == 1390 - 80 - 40 - 56 == 1214
    # lookups and elementwise work are not counted (module docstring): the matmuls are the plain model's
    assert every.flops_per_token() == 8544 and every.flops_per_token(4, causal=True) == 7776


def test_optimizer_groups_of_the_options():
    """Scalars, gates and QK-norm weights go to the vector group (no weight decay, never Muon); the value and bigram
    tables to the AdamW matrices with weight decay, like the token embedding; the blocks' matrices to Muon."""
    from training.config import TrainSection
    from training.optim import build_muon, param_groups

    model = build(qk_norm=True, residual_scalars=True, value_embeds=1, bigram_buckets=16)
    names = {id(p): n for n, p in model.named_parameters()}

    def group_names(groups):
        return {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}

    muon = group_names(build_muon(model, TrainSection(optimizer="muon")).param_groups)
    assert {"value_embeds.0.weight", "bigram_embed.weight", "wte.weight"} == muon["matrices"]
    assert {"blocks.0.resid_lambda", "blocks.0.x0_lambda", "blocks.0.attn.ve_gate", "blocks.0.attn.q_norm.weight",
            "blocks.3.attn.k_norm.weight", "blocks.3.attn.ve_gate"} <= muon["vectors"]
    assert all(n.endswith("_proj.weight") for n in muon["muon"])
    adamw = {g["name"]: (g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in param_groups(model, 0.1)}
    assert {"value_embeds.0.weight", "bigram_embed.weight"} <= adamw["matrices"][1] and adamw["matrices"][0] == 0.1
    assert "blocks.2.x0_lambda" in adamw["vectors"][1] and adamw["vectors"][0] == 0.0


def test_model_options_from_the_command_line_and_refused_when_fine_tuning():
    from training.config import parse_args
    from training.loop import model_config

    cfg = parse_args(["--model.qk_norm=true", "--model.relu_squared=true", "--model.logit_softcap=15",
                      "--model.residual_scalars=true", "--model.value_embeds=2", "--model.bigram_buckets=4096"])
    gcfg = model_config(cfg, None, 2048)
    assert (gcfg.qk_norm, gcfg.relu_squared, gcfg.logit_softcap, gcfg.residual_scalars, gcfg.value_embeds,
            gcfg.bigram_buckets) == (True, True, 15.0, True, 2, 4096)
    # fine-tuning keeps the checkpoint's options; one saved before the options existed has them off
    old = {k: v for k, v in GPTConfig(vocab_size=2048).to_dict().items() if k not in ("qk_norm", "bigram_buckets")}
    assert model_config(parse_args(["--stage", "sft", "--init-from", "x"]), old, 2048).qk_norm is False
    with pytest.raises(ValueError, match="--model.qk_norm=true: the starting checkpoint has qk_norm=false;"):
        model_config(parse_args(["--stage", "sft", "--init-from", "x", "--model.qk_norm=true"]), old, 2048)


def test_run_with_every_option_resumes_bitwise(tmp_path, corpus_dir):
    """A Muon run with every option stopped and resumed ends bitwise where the uninterrupted one does."""
    from tests.conftest import assert_resumes_exactly
    from train import main

    options = ["--model.qk_norm=true", "--model.relu_squared=true", "--model.logit_softcap=10",
               "--model.residual_scalars=true", "--model.value_embeds=1", "--model.bigram_buckets=512"]

    def run(out, *args):
        main(["--data", str(corpus_dir), "--out", str(out), *TINY_ARGS, "--train.optimizer=muon",
              "--train.batch_size=4", "--train.max_steps=6", "--model.dropout=0.1", "--eval.interval=0",
              "--log.interval=1", "--log.tensorboard=false", *options, *args])

    whole = assert_resumes_exactly(run, tmp_path, [], stop_after=3)
    from training import checkpoint

    ckpt = checkpoint.load(whole)
    assert ckpt["model_config"]["bigram_buckets"] == 512
    moved = ckpt["model"]["blocks.1.x0_lambda"]  # trained away from its init of 0
    assert moved.abs().item() > 0 and math.isfinite(moved.item())
    assert ckpt["model"]["bigram_embed.weight"].abs().sum() > 0  # trained away from its init of zeros
