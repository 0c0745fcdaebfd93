"""The network: a decoder-only transformer on one device.

Two architectures share one module:
  - "modern" (default): rotary position embeddings, RMSNorm (pre-norm), SwiGLU MLP, no biases,
    grouped-query attention. Exports to transformers' LlamaForCausalLM.
  - "gpt2": learned absolute positions, LayerNorm, GELU (tanh approximation) MLP, biases.
    Exports to transformers' GPT2LMHeadModel.

This module knows nothing of ranks, autocast, optimizers or compilation; the training machinery applies those
from outside. Shapes in comments: B batch, T time (query length), S key length, C = n_embd, H heads,
K kv heads, D head size, V vocab.

FLOPs per token, the one definition used everywhere (GPT.flops_per_token; MFU in the trainer and the benchmark).
N = weights of every matmul (the output head included, embedding lookups excluded), L = n_layer, d = n_embd,
T = the sequence length of the batch (block_size in pre-training, the padded length of an SFT or DPO batch):
    6N + 12 L d T   full attention: the PaLM / nanoGPT convention (Chowdhery et al. 2022, appendix B), so MFU is
                    comparable with published figures. train/mfu and bench.py's "MFU" use it.
    6N + 6 L d T    causal attention as the kernels compute it (the masked half of the scores is skipped).
Per token and layer a forward pass spends 2 x d x T on the scores q k^T and 2 x d x T on weighting the values
(4 L d T; half of it, 2 L d T, when causal), and 2N on the matmuls; training (forward + backward, the backward
twice the forward) is 3x the forward. A forward pass alone (the live DPO reference) is therefore a third of the
training figure: 2N + 4 L d T (full) or 2N + 2 L d T (causal). Elementwise work (norms, activations, the options'
scalars, gates and tanh) is not counted; the options' lookup tables are embeddings, outside N like the token one.

Candidate options (the speedrun v2 ablations; each off by default, and then the model is exactly the plain one):
  qk_norm           RMSNorm with a learnable (D,) weight on each head's queries and keys, before RoPE (Qwen3's
                    q_norm / k_norm; modern only). Exports to Qwen3ForCausalLM.
  relu_squared      MLP down(relu(up(x))^2) instead of SwiGLU (modern only). The width stays mlp_hidden, so the MLP
                    has 2 C h weights, 2/3 of SwiGLU's 3 C h at the same mlp_ratio; mlp_ratio x 1.5 matches SwiGLU's
                    parameter count and FLOPs. Exports to ArceeForCausalLM (Llama with this MLP).
  logit_softcap     logits = cap * tanh(logits / cap), in fp32, in forward, so in every loss, evaluation and
                    generation alike (there is no other path from hidden states to logits).
  residual_scalars  block l reads lambda_l * x + mu_l * x0 instead of x, x0 the embedding output (after dropout);
                    blocks.l.resid_lambda (1,) starts at 1 and blocks.l.x0_lambda (1,) at 0.
  value_embeds      k tables value_embeds.j (V, K D): table j is looked up by token and added to the values of layers
                    j and n_layer - k + j (the first k and the last k layers; 2 k <= n_layer), times a per-kv-head
                    gate blocks.l.attn.ve_gate (K,) initialised to 1; the tables start at zero.
  bigram_buckets    B rows of a table bigram_embed (B, C), row bigram_bucket(prev, token, B) (a mixed hash of
                    (36313 prev) xor (27191 token), mod B) added to the token embedding; starts at zero. A token
                    with no previous token in its sequence gets none: the first of a row (counting the KV cache,
                    which keeps the last token), the first of a packed document (doc_ids), and one after left
                    padding (pad_mask).
Each new scalar and gate is a 1-D parameter, so the optimizers' vector groups take them (no weight decay,
never Muon); the new tables are 2-D and outside the blocks: AdamW with weight decay, like the token embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("modern", "gpt2")


@dataclass
class GPTConfig:
    vocab_size: int = 2048  # tokens in the vocabulary; the tokenizer is trained to exactly this size
    block_size: int = 256  # context length in tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 means n_head (plain multi-head)
    n_embd: int = 128  # residual stream width
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * n_embd (rounded up to a multiple of 8)
    dropout: float = 0.0  # dropout on attention weights and residual branches (training only)
    tie_embeddings: bool = True  # share the token embedding with the output head
    arch: str = "modern"  # "modern" (RoPE, RMSNorm, SwiGLU) or "gpt2" (learned positions, LayerNorm, GELU)
    bias: bool = False  # biases in linear layers and norms (GPT-2 has them, Llama does not)
    rope_theta: float = 10000.0  # rotary base frequency (modern only)
    norm_eps: float = 1e-5  # epsilon of RMSNorm / LayerNorm
    init_std: float = 0.02  # std of the normal init; residual output projections get init_std / sqrt(2 n_layer)
    zero_init_residual: bool = False  # residual output projections start at zero (each block starts as identity)
    # The candidate options (module docstring); every default keeps the plain model.
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Qwen3; modern only)
    relu_squared: bool = False  # MLP down(relu(up(x))^2), width mlp_hidden, instead of SwiGLU (modern only)
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = off
    residual_scalars: bool = False  # block l reads lambda_l * x + mu_l * x0, x0 the embedding output (init 1, 0)
    value_embeds: int = 0  # k value-embedding tables for the first k and last k layers; 0 = off
    bigram_buckets: int = 0  # rows of the hashed bigram embedding added to the token embedding; 0 = off

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch={self.arch!r}: expected one of {ARCHS}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}")
        if self.arch == "modern" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        self._check_options()

    def _check_options(self) -> None:
        for name in MODERN_ONLY:
            if getattr(self, name) and self.arch != "modern":
                raise ValueError(f"model.{name}=true needs arch=modern (got arch={self.arch!r})")
        if self.logit_softcap < 0:
            raise ValueError(f"model.logit_softcap={self.logit_softcap} must be >= 0 (0 = off)")
        if self.bigram_buckets < 0:
            raise ValueError(f"model.bigram_buckets={self.bigram_buckets} must be >= 0 (0 = off)")
        if not 0 <= 2 * self.value_embeds <= self.n_layer:
            raise ValueError(f"model.value_embeds={self.value_embeds}: the first and the last value_embeds layers get "
                             f"a table each, so it must be in [0, n_layer / 2] (n_layer={self.n_layer})")

    def value_embed_table(self, layer: int) -> int | None:
        """The value-embedding table feeding `layer`: j for layers j and n_layer - k + j (j < k), else None."""
        k = self.value_embeds
        if layer < k:
            return layer
        if layer >= self.n_layer - k:
            return layer - (self.n_layer - k)
        return None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return 8 * math.ceil(self.mlp_ratio * self.n_embd / 8)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        return cls(**preset_values(name, overrides))


MODERN_ONLY = ("qk_norm", "relu_squared")  # options of the modern layout that GPTConfig refuses with arch=gpt2


def preset_values(name: str, overrides: dict) -> dict:
    """A preset's fields with the overrides applied. A preset's modern-only option (tiny's QK-norm) is dropped when
    the overrides change the arch to gpt2 without naming it, so that --model.arch=gpt2 keeps working on tiny."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: expected one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    if overrides.get("arch", values.get("arch", "modern")) != "modern":
        for key in MODERN_ONLY:
            if key not in overrides:
                values.pop(key, None)
    return {**values, **overrides}


# Named shapes. Each fixes the tokenizer's vocab size too (the tokenizer is trained to vocab_size).
PRESETS: dict[str, dict] = {
    # The CPU default: ~1M parameters, sized for the 10-minute speedrun on 2 cores. QK-norm won the speedrun's
    # screening (README) and exports as Qwen3ForCausalLM; --model.qk_norm=false gives the plain Llama layout.
    "tiny": dict(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128, mlp_ratio=4.0, qk_norm=True),
    # A laptop-GPU / long-CPU-run model: ~20M parameters.
    "small": dict(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_embd=384, mlp_ratio=4.0),
    # GPT-2 small (124M): learned positions, LayerNorm, GELU, biases; vocab padded 50257 -> 50304.
    "gpt2": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, mlp_ratio=4.0,
                 arch="gpt2", bias=True),
    # GPT-2 medium shape (~350M).
    "medium": dict(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024, mlp_ratio=4.0,
                   arch="gpt2", bias=True),
}


class KVCache:
    """Keys and values of every layer for incremental decoding. k, v: (B, K, S_max, D) per layer.

    A layer's storage is made at its first update, in the dtype of the keys it is given: the compute dtype (bf16
    under autocast or FSDP2's mixed precision, whose parameters stay fp32 outside a forward), so the cached keys
    always match the queries they meet. `dtype` is only the default reported before any update."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        self.shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.device, self.dtype = device, dtype
        self.k: list[torch.Tensor | None] = [None] * cfg.n_layer
        self.v: list[torch.Tensor | None] = [None] * cfg.n_layer
        self.pos = 0  # tokens already stored
        self.max_len = max_len
        self.last_token: torch.Tensor | None = None  # (B,) the last token stored: the bigram embedding's previous

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) after the cached ones; return all keys/values so far (B, K, pos+T, D)."""
        t = k.shape[2]
        assert self.pos + t <= self.max_len, "KV cache overflow"
        if self.k[layer] is None:
            self.k[layer] = torch.zeros(self.shape, device=self.device, dtype=k.dtype)
            self.v[layer] = torch.zeros(self.shape, device=self.device, dtype=v.dtype)
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        return self.k[layer][:, :, : self.pos + t], self.v[layer][:, :, : self.pos + t]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the cache rows `rows` (R,) long, in that order, repeats allowed: a prefill of distinct prompts then
        serves every row that shares one. The storage becomes (R, K, S_max, D) per layer."""
        self.k = [None if k is None else k[rows] for k in self.k]
        self.v = [None if v is None else v[rows] for v in self.v]
        self.shape = (len(rows), *self.shape[1:])
        if self.last_token is not None:
            self.last_token = self.last_token[rows]


def padded_causal_mask(pad_mask: torch.Tensor, past: int, t: int) -> torch.Tensor:
    """The boolean attention mask (B, 1, T, S) of T queries after `past` cached keys (S = past + T): causal,
    lower-right aligned (query i sits at column past + i), and only real keys (pad_mask (B, S), True = real token).

    The diagonal stays allowed even where the query itself is padding: a padding query has no real key at or
    before it in a left-padded row, and what SDPA returns for a row with every key masked depends on the kernel and
    the torch version (NaN in older versions' kernels, zeros in torch 2.13's CPU kernels); a NaN there would flow
    through the next layer's matmuls into real tokens (NaN times a zero attention weight is still NaN). Attending
    to itself keeps a padding token's values finite on every kernel, and no real token ever reads them."""
    s = past + t
    assert pad_mask.shape[1] == s, f"pad_mask covers {pad_mask.shape[1]} keys, the attention sees {s}"
    query_col = past + torch.arange(t, device=pad_mask.device)[:, None]  # (T, 1) each query's own column
    key_col = torch.arange(s, device=pad_mask.device)[None, :]  # (1, S)
    mask = (key_col <= query_col) & pad_mask[:, None, :]  # (B, T, S)
    return (mask | (key_col == query_col)).unsqueeze(1)  # (B, 1, T, S)


def rope_tables(cfg: GPTConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, D/2), fp32. Half-split convention (as Llama in transformers)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (T, D/2) or (B, 1, T, D/2): pairs are (i, i + D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


_LOW32 = 0xFFFFFFFF
_MIX32 = 0x45D9F3B  # odd, < 2^27: a 32-bit value times it stays below 2^59, no int64 overflow


def bigram_bucket(prev: torch.Tensor, token: torch.Tensor, buckets: int) -> torch.Tensor:
    """The hashed bigram's row, int64 (part of the model's definition: a trained table is only valid under this hash):
    h = (36313 prev) xor (27191 token), folded to 32 bits (h xor h >> 32, low 32 bits), then mixed
    (h ^= h >> 16; h = h * 0x45D9F3B mod 2^32, twice; h ^= h >> 16) and taken mod buckets.

    Why the mixing: multiplying by an odd number only carries bits upwards, so without it the low k bits of h depend
    only on the low k bits of prev and token, and with buckets = 2^k the tokens p and p + 2^k would share every row.
    The multiply-then-shift-down steps make every output bit depend on every input bit."""
    h = torch.bitwise_xor(prev * 36313, token * 27191)  # (B, T), non-negative
    h = torch.bitwise_xor(h, h >> 32) & _LOW32
    for _ in range(2):
        h = torch.bitwise_xor(h, h >> 16)
        h = (h * _MIX32) & _LOW32
    return torch.bitwise_xor(h, h >> 16) % buckets


def previous_tokens(idx: torch.Tensor, kv_cache: KVCache | None, doc_ids: torch.Tensor | None,
                    pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's previous token (B, T) and whether it has one (B, T) bool: not for the first token of the
    sequence (the cache's last token precedes the new ones), nor for a packed document's first token, nor for a
    token after padding (pad_mask (B, S) covers the cached keys and the new ones)."""
    b, t = idx.shape
    past = kv_cache.pos if kv_cache is not None else 0
    first = kv_cache.last_token if past > 0 else torch.zeros(b, dtype=idx.dtype, device=idx.device)
    prev = torch.cat([first[:, None], idx[:, :-1]], dim=1)  # (B, T)
    has_prev = torch.ones(b, t, dtype=torch.bool, device=idx.device)
    has_prev[:, 0] = past > 0
    if doc_ids is not None:
        has_prev[:, 1:] &= doc_ids[:, 1:] == doc_ids[:, :-1]
    if pad_mask is not None:  # the key before new token j is column past + j - 1 (none before column 0)
        before = pad_mask[:, max(past - 1, 0) : past + t - 1]  # (B, T), or (B, T - 1) when past == 0
        has_prev[:, t - before.shape[1] :] &= before
    return prev, has_prev


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    """Concatenate weights (or biases) along the output dimension; None when the layers have no bias."""
    return None if tensors[0] is None else torch.cat(tensors, dim=0)


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.o_proj.residual = True  # scaled init
        self.resid_drop = nn.Dropout(cfg.dropout)
        if cfg.qk_norm:  # over each head's D features, one weight shared by the heads (Qwen3)
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        # The value embedding's weight in this layer's values, one per kv head; 1 at init (reset_parameters).
        self.ve_gate = nn.Parameter(torch.ones(cfg.n_kv_head)) if value_embed else None

    def forward(self, x, rope, mask, kv_cache: KVCache | None, layer: int, ve: torch.Tensor | None = None
                ) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        # One matmul for q, k and v (three small ones run well below the CPU's matmul peak); the weights stay three
        # separate parameters, so checkpoints and exports keep the standard layout.
        qkv = F.linear(x, _cat(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight),
                       _cat(self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))  # (B, T, (H + 2K) D)
        qkv = qkv.view(b, t, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, H + 2K, T, D)
        if cfg.qk_norm:  # normalise each head's q and k, then rotate them
            q = self.q_norm(qkv[:, : cfg.n_head])  # (B, H, T, D)
            k = self.k_norm(qkv[:, cfg.n_head : cfg.n_head + cfg.n_kv_head])  # (B, K, T, D)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        elif rope is not None:  # rotate q and k together
            qk = apply_rope(qkv[:, : cfg.n_head + cfg.n_kv_head], *rope)
            q, k = qk.split([cfg.n_head, cfg.n_kv_head], dim=1)  # (B, H, T, D), (B, K, T, D)
        else:
            q, k = qkv[:, : cfg.n_head], qkv[:, cfg.n_head : cfg.n_head + cfg.n_kv_head]
        v = qkv[:, cfg.n_head + cfg.n_kv_head :]  # (B, K, T, D)
        if ve is not None:  # the value embedding (B, T, K D) of these tokens, weighted per kv head
            ve = self.ve_gate[:, None, None] * ve.view(b, t, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
            v = v + ve.to(v.dtype)  # (B, K, T, D) in the projections' dtype (bf16 under autocast), as k
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, K, S, D), S = cached + T
        if cfg.n_kv_head != cfg.n_head:  # grouped-query attention: each kv head serves H/K query heads
            rep = cfg.n_head // cfg.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout_p = cfg.dropout if self.training else 0.0
        if isinstance(mask, str):  # "causal": plain training/prefill from position 0, fastest kernels
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # None (one query sees every key) or an explicit boolean (B|1, 1, T, S) mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(b, t, cfg.n_embd)  # (B, T, C)
        return self.resid_drop(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gated = cfg.arch == "modern" and not cfg.relu_squared
        self.relu_squared = cfg.relu_squared
        h = cfg.mlp_hidden
        if self.gated:  # SwiGLU: down(silu(gate(x)) * up(x))
            self.gate_proj = nn.Linear(cfg.n_embd, h, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, h, bias=cfg.bias)
        self.down_proj = nn.Linear(h, cfg.n_embd, bias=cfg.bias)
        self.down_proj.residual = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = F.linear(x, _cat(self.gate_proj.weight, self.up_proj.weight),
                                _cat(self.gate_proj.bias, self.up_proj.bias)).chunk(2, dim=-1)  # one matmul
            h = F.silu(gate) * up
        elif self.relu_squared:
            h = F.relu(self.up_proj(x)).square()  # (B, T, h)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.drop(self.down_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg, value_embed=cfg.value_embed_table(layer) is not None)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)
        # residual_scalars: this block reads resid_lambda * x + x0_lambda * x0; 1 and 0 at init (reset_parameters)
        self.resid_lambda = nn.Parameter(torch.ones(1)) if cfg.residual_scalars else None
        self.x0_lambda = nn.Parameter(torch.zeros(1)) if cfg.residual_scalars else None

    def forward(self, x, rope, mask, kv_cache, layer, x0=None, ve=None) -> torch.Tensor:
        if self.resid_lambda is not None:  # x, x0 (B, T, C)
            x = self.resid_lambda * x + self.x0_lambda * x0
        x = x + self.attn(self.norm1(x), rope, mask, kv_cache, layer, ve)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # The options' tables start at zero (reset_parameters). nn.Embedding draws an init when built: forking the
        # random state keeps those draws out of the stream reset_parameters draws the plain weights from, so a model
        # with the tables starts with the plain model's weights from the same seed (and computes the same function).
        kv_dim = cfg.n_kv_head * cfg.head_dim
        with torch.random.fork_rng(devices=[]):
            self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, kv_dim) for _ in range(cfg.value_embeds)) \
                if cfg.value_embeds else None
            self.bigram_embed = nn.Embedding(cfg.bigram_buckets, cfg.n_embd) if cfg.bigram_buckets else None
        for table in [*(self.value_embeds or []), self.bigram_embed]:
            if table is not None:
                table.zero_init = True
        if cfg.arch == "modern":
            cos, sin = rope_tables(cfg, cfg.block_size)
            # Not part of the state dict: derived from the config.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 n_layer) so the residual
        stream's variance does not grow with depth (or zero with zero_init_residual); zero biases; unit norms."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                residual = getattr(m, "residual", False)
                if residual and self.cfg.zero_init_residual:
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.normal_(m.weight, 0.0, std / math.sqrt(2 * self.cfg.n_layer) if residual else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding) and getattr(m, "zero_init", False):  # the options' tables
                nn.init.zeros_(m.weight)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
        for block in self.blocks:
            if block.attn.ve_gate is not None:
                nn.init.ones_(block.attn.ve_gate)
            if block.resid_lambda is not None:
                nn.init.ones_(block.resid_lambda)
                nn.init.zeros_(block.x0_lambda)
        if self.cfg.arch == "modern":
            cos, sin = rope_tables(self.cfg, self.cfg.block_size)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V).

        positions (B, T): position of each token (restarting per packed document); default 0..T-1, or continuing
            after the cache. doc_ids (B, T): packed rows; a token attends only to earlier tokens of its own doc id.
        kv_cache: incremental decoding; the new tokens attend to every cached token and causally among themselves.
        pad_mask (B, S) bool, S = cached + T: True on real tokens; no query attends to a padding key (left-padded
            batched generation, model/generation.py; give the per-row positions with it).
        """
        logits = self.lm_head(self.hidden_states(idx, positions, doc_ids, kv_cache, pad_mask))  # (B, T, V)
        cap = self.cfg.logit_softcap
        if cap:  # in fp32: under bf16 the tanh would round the capped logits to 8 bits
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def hidden_states(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states (B, T, C), after the final norm: what the output head (and a reward model's score
        head, model/reward.py) reads. Arguments as forward's."""
        b, t = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if positions is None and past + t > self.cfg.block_size:
            raise ValueError(f"sequence of {past + t} tokens exceeds block_size={self.cfg.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.bigram_embed is not None:
            prev, has_prev = previous_tokens(idx, kv_cache, doc_ids, pad_mask)  # (B, T) each
            bigram = self.bigram_embed(bigram_bucket(prev, idx, self.cfg.bigram_buckets))  # (B, T, C)
            x = x + bigram * has_prev[..., None].to(bigram.dtype)

        # Positions: either a plain range (fast path: slice the tables) or per-token positions (gather).
        if positions is None:
            pos_slice = slice(past, past + t)
        if self.wpe is not None:
            x = x + (self.wpe.weight[pos_slice] if positions is None else self.wpe(positions))
            rope = None
        elif positions is None:
            rope = (self.rope_cos[pos_slice], self.rope_sin[pos_slice])  # (T, D/2) each
        else:
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))  # (B, 1, T, D/2)
        x = self.drop(x)
        x0 = x if self.cfg.residual_scalars else None  # (B, T, C) what every block's x0 scalar weighs
        ves = [table(idx) for table in self.value_embeds] if self.value_embeds is not None else []  # (B, T, K D)

        # Attention mask. SDPA's is_causal aligns the triangle to the top-left, right only when queries and keys
        # start at the same position; with a cache the T queries come after `past` keys (lower-right alignment).
        if pad_mask is not None:
            assert doc_ids is None, "pad_mask and doc_ids together: a padded row is not packed"
            mask = padded_causal_mask(pad_mask, past, t)  # (B, 1, T, S)
        elif doc_ids is not None:
            assert kv_cache is None, "packed rows are a training-time input"
            causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
            mask = (causal & same_doc).unsqueeze(1)  # (B, 1, T, T)
        elif past == 0:
            mask = "causal"
        elif t == 1:
            mask = None  # a single new query may see every key
        else:
            s = past + t
            mask = torch.ones(t, s, dtype=torch.bool, device=idx.device).tril(diagonal=past)  # (T, S)

        for i, block in enumerate(self.blocks):
            j = self.cfg.value_embed_table(i)
            x = block(x, rope, mask, kv_cache, i, x0, None if j is None else ves[j])
        if kv_cache is not None:
            kv_cache.pos += t
            kv_cache.last_token = idx[:, -1]
        return self.norm_f(x)  # (B, T, C)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: tuple[int, ...] | list[int] = (),
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens tokens; returns (B, T + n). temperature 0 decodes greedily.

        The tokens of stream(). Generation stops when every row has produced a stop token (kept in the output);
        finished rows are padded with that token.
        """
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        out = idx
        for nxt in self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator):  # (B,) each
            if len(stop):
                nxt = torch.where(done, out[:, -1], nxt)
                done = done | torch.isin(nxt, stop)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if len(stop) and bool(done.all()):
                break
        return out

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token (B,) of every row of idx (B, T), up to max_new_tokens times (scripts/chat.py prints
        each as it comes; generate collects them).

        One prefill forward into a KV cache, then one forward per token, run only when the next token is asked for
        (a caller that stops early pays for nothing more). Once the sequence fills the context, the cache is rebuilt
        from the last block_size // 2 tokens (learned-position models cannot look further, and rotary ones were not
        trained to). Every row is sampled at every step with the one generator, so a seeded stream gives the same
        tokens whatever the caller does with them."""
        cfg = self.cfg
        out = idx
        cache, logits = None, None
        for _ in range(max_new_tokens):
            if cache is None or cache.pos >= cfg.block_size:
                ctx = out[:, -(cfg.block_size // 2 if out.shape[1] >= cfg.block_size else cfg.block_size):]
                dtype = next(self.parameters()).dtype
                cache = KVCache(cfg, out.shape[0], cfg.block_size, idx.device, dtype)
                logits = self(ctx, kv_cache=cache)[:, -1, :]  # prefill
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            yield nxt
            out = torch.cat([out, nxt[:, None]], dim=1)
            if cache.pos < cfg.block_size:
                logits = self(nxt[:, None], kv_cache=cache)[:, -1, :]

    # ---------------------------------------------------------------- accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; non_embedding leaves out every lookup table: the token and position embeddings (and so a
        tied head), and the value and bigram embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            tables = [self.wte, self.wpe, *(self.value_embeds or []), self.bigram_embed]
            n -= sum(m.weight.numel() for m in tables if m is not None)
        return n

    def flops_per_token(self, seq_len: int | None = None, causal: bool = False, forward_only: bool = False) -> int:
        """FLOPs per token on sequences of seq_len tokens (default block_size), the module docstring's formulas:
        training 6N + 12 L C T (full attention, the PaLM convention; causal: 6N + 6 L C T), a third of it with
        forward_only (2N + 4 L C T; causal 2N + 2 L C T)."""
        cfg = self.cfg
        T = cfg.block_size if seq_len is None else seq_len
        kv = cfg.n_kv_head * cfg.head_dim
        attn = cfg.n_embd * (2 * cfg.n_embd + 2 * kv)  # q, o and k, v projections
        mlp = (3 if cfg.arch == "modern" and not cfg.relu_squared else 2) * cfg.n_embd * cfg.mlp_hidden
        matmul_weights = cfg.n_layer * (attn + mlp) + cfg.n_embd * cfg.vocab_size
        scores_and_values = (2 if causal else 4) * cfg.n_layer * cfg.n_embd * T  # forward; causal: half the keys
        passes = 1 if forward_only else 3  # the backward costs twice the forward
        return passes * (2 * matmul_weights + scores_and_values)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
