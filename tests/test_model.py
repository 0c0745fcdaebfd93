"""Model tests: causality, KV-cache parity, packing, init loss, parameter and FLOP counts, generation."""

import math

import pytest
import torch

from model import GPT, GPTConfig, KVCache, token_ce_sum
from model.gpt import apply_rope, rope_tables

ARCH_CFGS = {
    "modern": dict(arch="modern", vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
    "gpt2": dict(arch="gpt2", vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, bias=True),
}
# The candidate model options (model/gpt.py), all at once: the parity tests below run with and without them. The
# cap of 3 is well inside these logits' range, so the tanh bends them; 61 buckets for 97 x 97 bigrams collide.
OPTIONS = dict(logit_softcap=3.0, residual_scalars=True, value_embeds=1, bigram_buckets=61)
ARCH_OPTIONS = {"modern": dict(OPTIONS, qk_norm=True, relu_squared=True), "gpt2": OPTIONS}
# The options' parameters start at values that make them do nothing (tables at zero, gates and lambdas at 1, mu at
# 0); make() moves them away from there, as the norms, or a parity test could not see them.
OPTION_PARAMS = ("resid_lambda", "x0_lambda", "ve_gate", "value_embeds", "bigram_embed")


def make(arch: str, options: bool = False, **kw) -> GPT:
    """The arch's small model; options: with every candidate option on (ARCH_OPTIONS)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**ARCH_CFGS[arch], **(ARCH_OPTIONS[arch] if options else {}), **kw})).eval()
    # Non-trivial norm weights and biases, so parity tests also exercise them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif any(part in name for part in OPTION_PARAMS):
                p.add_(0.5 * torch.randn_like(p))
    return model


with_options = pytest.mark.parametrize("options", [False, True], ids=["plain", "options"])


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_zero_init_residual_starts_every_block_as_identity(arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARCH_CFGS[arch], zero_init_residual=True))
    for block in model.blocks:
        assert not block.attn.o_proj.weight.any() and not block.mlp.down_proj.weight.any()
        assert block.attn.q_proj.weight.std() > 0.01  # the rest keeps its normal init
    idx = torch.randint(0, 97, (2, 16))
    x = model.wte(idx) + (model.wpe.weight[:16] if arch == "gpt2" else 0)
    torch.testing.assert_close(model(idx), model.lm_head(model.norm_f(x)), rtol=0, atol=0)


def test_rope_rotates_each_half_split_pair_by_position_times_frequency():
    # head size 4: pairs (0, 2) and (1, 3), frequencies theta^0 = 1 and theta^(-2/4) = 1/10 for theta = 100
    cfg = GPTConfig(vocab_size=8, block_size=6, n_layer=1, n_head=1, n_embd=4, rope_theta=100.0)
    cos, sin = rope_tables(cfg, 6)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(1, 1, 6, 1)  # (B, H, T, D), the same vector at every position
    out = apply_rope(x, cos, sin)  # tables (T, D/2)
    for pos in range(6):
        for i, freq in ((0, 1.0), (1, 0.1)):
            a, b, angle = x[0, 0, pos, i].item(), x[0, 0, pos, i + 2].item(), pos * freq
            assert out[0, 0, pos, i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-6)
            assert out[0, 0, pos, i + 2].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle), abs=1e-6)


@with_options
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_causality(arch, options):
    model = make(arch, options)
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 11] = (changed[:, 11] + 1) % 97
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11:], b[:, 11:])


@with_options
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_kv_cache_matches_full_forward(arch, options):
    model = make(arch, options)
    idx = torch.randint(0, 97, (2, 24))
    full = model(idx)
    # Chunked prefill (needs the lower-right causal mask), then one token at a time (no mask).
    cache = KVCache(model.cfg, 2, 32, "cpu", torch.float32)
    parts = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:15], kv_cache=cache)]
    parts += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(15, 24)]
    inc = torch.cat(parts, dim=1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


@with_options
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_packed_rows_equal_separate_documents(arch, options):
    model = make(arch, options)
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 12))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(12)])[None]
    doc_ids = torch.cat([torch.zeros(9), torch.ones(12)]).long()[None]
    out = model(packed, positions=positions, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :9], model(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 9:], model(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_fresh_model_loss_near_ln_vocab(arch):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**ARCH_CFGS[arch], "vocab_size": 2048, "n_layer": 4, "n_embd": 64})
    model = GPT(cfg)
    idx = torch.randint(0, 2048, (4, 32))
    tgt = torch.randint(0, 2048, (4, 32))
    loss_sum, n = token_ce_sum(model(idx), tgt)
    assert abs((loss_sum / n).item() - math.log(2048)) < 0.1 * math.log(2048)


def test_param_and_flop_counts_by_hand():
    # modern: V=10, C=8, H=2, K=1 (D=4, kv dim 4), L=2, mlp hidden = 8*ceil(2.0*8/8) = 16, tied, no bias.
    cfg = GPTConfig(vocab_size=10, block_size=6, n_layer=2, n_head=2, n_kv_head=1, n_embd=8, mlp_ratio=2.0)
    model = GPT(cfg)
    attn = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8  # q, k, v, o = 192
    mlp = 3 * 8 * 16  # gate, up, down = 384
    norms = 2 * 8  # two RMSNorm weights per block
    per_layer = attn + mlp + norms  # 592
    total = 10 * 8 + 2 * per_layer + 8  # embedding (tied head) + blocks + final norm = 1272
    assert model.num_params() == total == 1272
    assert model.num_params(non_embedding=True) == total - 80
    # N = 2 x (192 + 384) + 8 x 10 = 1232 matmul weights; L d = 2 x 8. Training, full attention (PaLM):
    # 6 x 1232 + 12 x 2 x 8 x 6 = 7392 + 1152; causal: 7392 + 6 x 2 x 8 x 6 = 7392 + 576
    assert model.flops_per_token() == 6 * 1232 + 1152 == 8544
    assert model.flops_per_token(causal=True) == 6 * 1232 + 576 == 7968
    # a padded batch of T = 4 (not block_size): 7392 + 12 x 2 x 8 x 4 = 7392 + 768; causal 7392 + 384
    assert model.flops_per_token(4) == 6 * 1232 + 768 == 8160
    assert model.flops_per_token(4, causal=True) == 6 * 1232 + 384 == 7776
    # a forward pass alone (a third): 2 x 1232 + 4 x 2 x 8 x 4 = 2464 + 256; causal at T = 6: 2464 + 2 x 2 x 8 x 6
    assert model.flops_per_token(4, forward_only=True) == 2 * 1232 + 256 == 2720
    assert model.flops_per_token(causal=True, forward_only=True) == 2 * 1232 + 192 == 2656

    # gpt2: learned positions, LayerNorm with bias, untied head, biases in linears; hidden 4*8 = 32.
    cfg = GPTConfig(vocab_size=10, block_size=6, n_layer=1, n_head=2, n_embd=8, arch="gpt2", bias=True,
                    tie_embeddings=False)
    model = GPT(cfg)
    attn = 4 * (8 * 8 + 8)  # 288
    mlp = (8 * 32 + 32) + (32 * 8 + 8)  # 552
    norms = 2 * 16
    total = 10 * 8 + 6 * 8 + (attn + mlp + norms) + 16 + 80  # wte, wpe, block, final norm, head = 1096
    assert model.num_params() == total == 1096
    assert model.num_params(non_embedding=True) == total - 80 - 48
    assert model.flops_per_token() == 6 * (4 * 64 + 2 * 8 * 32 + 80) + 12 * 1 * 8 * 6 == 5088 + 576 == 5664
    assert model.flops_per_token(causal=True) == 5088 + 6 * 1 * 8 * 6 == 5376


@with_options
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
@pytest.mark.parametrize("prompt_len", [5, 40])
def test_generate_with_kv_cache_equals_full_forward_over_its_window(arch, prompt_len, options, monkeypatch):
    """At every step, the logits generate() samples from (KV cache) equal a full forward without cache over the
    window generate() defines: the tokens since the window's start, the start moving to the last block_size // 2 =
    16 tokens whenever the window holds block_size = 32 (a longer prompt starts at its last 16). 60 tokens after a
    5-token prompt cross three rebuilds (at lengths 32, 48, 64). Sampled at temperature 1, not greedy: at this init
    the greedy continuation is one token repeated, and windows of one repeated token give the same logits."""
    model = make(arch, options)
    prompt = torch.randint(0, 97, (1, prompt_len))
    seen = []  # the (1, V) logits of each step, as generate() hands them to sample_next
    from model.gpt import sample_next as real

    monkeypatch.setattr("model.gpt.sample_next", lambda logits, *args: seen.append(logits) or real(logits, *args))
    out = model.generate(prompt, 60, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, prompt_len + 60) and len(seen) == 60
    g, start = torch.Generator().manual_seed(0), 0
    for t in range(60):
        n = prompt_len + t  # tokens before this step; the window is out[:, start:n]
        if n - start >= 32:
            start = n - 16
        with torch.no_grad():
            logits = model(out[:, start:n])[:, -1]
        torch.testing.assert_close(seen[t], logits, rtol=0, atol=1e-5)
        assert out[0, n] == real(logits, 1.0, None, None, g)  # the same draw from the same distribution


def test_generate_stop_tokens_and_sampling_filters():
    model = make("modern")
    prompt = torch.randint(0, 97, (1, 4))
    greedy = model.generate(prompt, 10, temperature=0)
    stop = int(greedy[0, 6])
    out = model.generate(prompt, 10, temperature=0, stop_tokens=[stop])
    assert out[0, -1].item() == stop and stop not in out[0, 4:-1].tolist()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1, generator=g), greedy)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 10, temperature=0.7, top_p=1e-6, generator=g), greedy)


def test_config_errors():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="arch"):
        GPTConfig(arch="llama")
    with pytest.raises(ValueError, match="preset"):
        GPTConfig.from_preset("huge")
