"""Conversion between gptrain models and Hugging Face `transformers` (the optional `hf` extra).

Each gptrain architecture equals a standard one, so an export needs no custom code:

  modern -> LlamaForCausalLM. Same layout, renamed: RMSNorm pre-norm, SwiGLU (gate/up/down), grouped-query attention,
            rotary embeddings in the half-split convention of transformers' `rotate_half` (pairs (i, i + D/2)), so
            the q/k projections are copied without permutation. `bias` sets both attention_bias and mlp_bias.
  modern + qk_norm -> Qwen3ForCausalLM: Llama's layout plus q_norm / k_norm, RMSNorms of a (head_dim,) weight on each
            head's queries and keys before the rotation, with rms_norm_eps, as model.qk_norm. Its MLP has no biases,
            so bias=true is refused.
  modern + relu_squared -> ArceeForCausalLM: Llama's layout with a two-matrix MLP down(act(up(x))), hidden_act
            "relu2" (relu(x)^2), as model.relu_squared.
  reward models (--stage rm) -> LlamaForSequenceClassification / GPT2ForSequenceClassification, num_labels=1,
            pad_token_id <|pad|>: the score head `score` read at the last non-padding token.
  gpt2   -> GPT2LMHeadModel. Conv1D layers store weights as [in, out]: every projection is transposed; q, k, v are
            concatenated into c_attn; GELU's tanh approximation is `gelu_new`. GPT-2 always has biases: a model
            trained without them is exported with zero biases, an exact equivalent.

A setting with no exact equivalent is refused with a ValueError naming it (see `check_exportable`), as is an
imported checkpoint using a feature gptrain lacks (see `gpt_config_from_hf`). Refused by name, never approximated:
model.logit_softcap, model.residual_scalars, model.value_embeds, model.bigram_buckets, and qk_norm together with
relu_squared (no stock class has QK-norm and a two-matrix MLP with these norms).
"""

from __future__ import annotations

import math

import torch

from data.chat import CHAT_TEMPLATE
from data.tokenizer import END_ID, EOT_ID, PAD_ID, SPECIAL_TOKENS, Tokenizer
from model.gpt import GPTConfig
from model.reward import RewardModel

HF_ARCH = {"modern": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
# A reward model (model/reward.py) is its architecture's sequence classifier with one label: the same transformer,
# and a bias-free `score` layer read at the last non-padding token (with <|pad|> right padding: the closing <|end|>).
HF_REWARD_ARCH = {"modern": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
# The Llama family's members that express a modern model with one of its options (see hf_family).
FAMILY_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "arcee": "ArceeForCausalLM",
               "gpt2": "GPT2LMHeadModel"}
FAMILY_REWARD_ARCH = {"llama": "LlamaForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
                      "arcee": "ArceeForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
# Options no stock transformers class computes, and why; check_exportable refuses each by name.
UNEXPORTABLE = {
    "logit_softcap": "Gemma2/Gemma3 cap their logits this way but also scale the embeddings by sqrt(hidden_size) and "
                     "put (1 + weight) norms after each branch around a GELU-gated MLP; NanoChat caps them but has "
                     "weightless norms, an extra norm after the embedding and QK-norm after RoPE",
    "residual_scalars": "no stock class weighs a block's input by learned scalars or feeds it the embedding output",
    "value_embeds": "no stock class adds token-indexed tables to attention's values",
    "bigram_buckets": "no stock class adds a hashed (previous token, token) embedding to the token embedding",
}
# GELU variants that are the tanh approximation (the same function as F.gelu(approximate="tanh")).
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def require_transformers():
    """The transformers module, or an ImportError that says how to install the optional extra."""
    try:
        import safetensors  # noqa: F401  (save_pretrained writes model.safetensors with it)
        import transformers
    except ImportError as e:
        raise ImportError(f"{e.name} is not installed: export and import need the optional `hf` extra "
                          "(pip install -e '.[hf]', which installs transformers and safetensors)") from None
    return transformers


# ----------------------------------------------------------------------------------------------- export
def check_exportable(gcfg: GPTConfig) -> None:
    """Raise ValueError naming the setting when no standard transformers architecture computes the same function."""
    if gcfg.arch == "gpt2" and gcfg.n_kv_head != gcfg.n_head:
        raise ValueError(f"model.n_kv_head={gcfg.n_kv_head} (grouped-query attention) with model.arch=gpt2: "
                         f"GPT2LMHeadModel has one key/value head per query head (n_head={gcfg.n_head}); train with "
                         "n_kv_head equal to n_head, or use arch=modern (exported as LlamaForCausalLM)")
    if gcfg.arch not in HF_ARCH:
        raise ValueError(f"model.arch={gcfg.arch!r} has no transformers equivalent")
    for name, why in UNEXPORTABLE.items():
        value = getattr(gcfg, name)
        if value:
            raise ValueError(f"model.{name}={value}: no stock transformers class computes this model ({why}); "
                             "it cannot be exported (train without it to export)")
    if gcfg.qk_norm and gcfg.relu_squared:
        raise ValueError("model.qk_norm=true with model.relu_squared=true: no stock transformers class has both "
                         "(Qwen3ForCausalLM has QK-norm and SwiGLU, ArceeForCausalLM ReLU-squared without QK-norm); "
                         "it cannot be exported")
    if gcfg.qk_norm and gcfg.bias:
        raise ValueError("model.qk_norm=true with model.bias=true: Qwen3ForCausalLM, the class with QK-norm, has no "
                         "MLP biases; it cannot be exported")


def hf_family(gcfg: GPTConfig) -> str:
    """The transformers model_type of the class equal to `gcfg` (after check_exportable): gpt2, llama, or the Llama
    variants qwen3 (qk_norm) and arcee (relu_squared)."""
    if gcfg.arch == "gpt2":
        return "gpt2"
    return "qwen3" if gcfg.qk_norm else "arcee" if gcfg.relu_squared else "llama"


def _hf_class(transformers, name: str):
    """transformers.<name>, or an ImportError naming the class an older transformers lacks."""
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ImportError(f"transformers {transformers.__version__} has no {name}, which this model's options need: "
                          "upgrade transformers")
    return cls


def hf_config(gcfg: GPTConfig):
    """The transformers config of the architecture equal to `gcfg`."""
    transformers = require_transformers()

    check_exportable(gcfg)
    common = dict(vocab_size=gcfg.vocab_size, tie_word_embeddings=gcfg.tie_embeddings, bos_token_id=None,
                  eos_token_id=[EOT_ID, END_ID], pad_token_id=PAD_ID)
    if gcfg.arch == "gpt2":
        return transformers.GPT2Config(
            n_positions=gcfg.block_size, n_embd=gcfg.n_embd, n_layer=gcfg.n_layer, n_head=gcfg.n_head,
            n_inner=gcfg.mlp_hidden, activation_function="gelu_new", layer_norm_epsilon=gcfg.norm_eps,
            resid_pdrop=gcfg.dropout, embd_pdrop=gcfg.dropout, attn_pdrop=gcfg.dropout,
            initializer_range=gcfg.init_std, **common)
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": gcfg.rope_theta}} \
        if "rope_parameters" in transformers.LlamaConfig().to_dict() else {"rope_theta": gcfg.rope_theta}
    llama_like = dict(
        hidden_size=gcfg.n_embd, intermediate_size=gcfg.mlp_hidden, num_hidden_layers=gcfg.n_layer,
        num_attention_heads=gcfg.n_head, num_key_value_heads=gcfg.n_kv_head, head_dim=gcfg.head_dim,
        max_position_embeddings=gcfg.block_size, rms_norm_eps=gcfg.norm_eps, attention_bias=gcfg.bias,
        attention_dropout=gcfg.dropout, initializer_range=gcfg.init_std, **rope, **common)
    family = hf_family(gcfg)
    if family == "qwen3":  # no mlp_bias: check_exportable refused bias=true
        return _hf_class(transformers, "Qwen3Config")(hidden_act="silu", use_sliding_window=False, **llama_like)
    if family == "arcee":
        return _hf_class(transformers, "ArceeConfig")(hidden_act="relu2", mlp_bias=gcfg.bias, **llama_like)
    return transformers.LlamaConfig(hidden_act="silu", mlp_bias=gcfg.bias, **llama_like)


def _llama_names(n_layer: int) -> list[tuple[str, str]]:
    """(gptrain name, transformers name) of every Llama tensor; biases included, filtered by the caller."""
    names = [("wte.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight"),
             ("lm_head.weight", "lm_head.weight")]
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names += [(ours + "norm1.weight", theirs + "input_layernorm.weight"),
                  (ours + "norm2.weight", theirs + "post_attention_layernorm.weight")]
        # Qwen3's QK-norm weights (absent from, and so skipped in, a plain Llama's state dicts)
        names += [(f"{ours}attn.{n}.weight", f"{theirs}self_attn.{n}.weight") for n in ("q_norm", "k_norm")]
        for p in ("weight", "bias"):
            names += [(f"{ours}attn.{n}.{p}", f"{theirs}self_attn.{n}.{p}") for n in ("q_proj", "k_proj", "v_proj",
                                                                                     "o_proj")]
            names += [(f"{ours}mlp.{n}.{p}", f"{theirs}mlp.{n}.{p}") for n in ("gate_proj", "up_proj", "down_proj")]
    return names


def to_hf_state_dict(sd: dict[str, torch.Tensor], gcfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gptrain weights -> the state dict of the equivalent transformers model (tensors copied, fp32 kept)."""
    check_exportable(gcfg)
    sd = dict(sd)
    if gcfg.tie_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]
    if gcfg.arch == "modern":
        return {theirs: sd[ours].clone() for ours, theirs in _llama_names(gcfg.n_layer) if ours in sd}

    def get(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        # gpt2 biases (linear layers and LayerNorms) are zeros when the model has none
        return sd[name] if name in sd else torch.zeros(shape)

    c, h = gcfg.n_embd, gcfg.mlp_hidden
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": get("norm_f.bias", (c,)),
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(gcfg.n_layer):
        b, t = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = [f"{b}attn.{n}_proj" for n in "qkv"]
        out.update({
            t + "ln_1.weight": sd[b + "norm1.weight"], t + "ln_1.bias": get(b + "norm1.bias", (c,)),
            t + "ln_2.weight": sd[b + "norm2.weight"], t + "ln_2.bias": get(b + "norm2.bias", (c,)),
            # Conv1D: y = x @ W + b with W [in, out]; c_attn's output is [q | k | v]
            t + "attn.c_attn.weight": torch.cat([sd[n + ".weight"] for n in qkv], dim=0).t(),  # [C, 3C]
            t + "attn.c_attn.bias": torch.cat([get(n + ".bias", (c,)) for n in qkv]),
            t + "attn.c_proj.weight": sd[b + "attn.o_proj.weight"].t(), t + "attn.c_proj.bias": get(
                b + "attn.o_proj.bias", (c,)),
            t + "mlp.c_fc.weight": sd[b + "mlp.up_proj.weight"].t(), t + "mlp.c_fc.bias": get(
                b + "mlp.up_proj.bias", (h,)),
            t + "mlp.c_proj.weight": sd[b + "mlp.down_proj.weight"].t(), t + "mlp.c_proj.bias": get(
                b + "mlp.down_proj.bias", (c,)),
        })
    return {k: v.contiguous().clone() for k, v in out.items()}


def to_hf_model(model):
    """A transformers model (fp32, eval mode) computing the same function as the gptrain `model`: a causal LM, or
    for a RewardModel the sequence classifier with num_labels=1 (its LM head is left out, its score head kept)."""
    transformers = require_transformers()

    gcfg = model.cfg
    config = hf_config(gcfg)
    reward = isinstance(model, RewardModel)
    if reward:
        config.num_labels = 1
        config.tie_word_embeddings = False  # no LM head to tie
    cls = _hf_class(transformers, (FAMILY_REWARD_ARCH if reward else FAMILY_ARCH)[hf_family(gcfg)])
    hf = cls(config)
    sd = to_hf_state_dict(model.state_dict(), gcfg)
    if reward:
        sd.pop("lm_head.weight")
        sd["score.weight"] = model.score.weight.detach().clone()  # (1, C), bias-free in both
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # A tied head is one tensor that transformers may list under either name.
    missing = [k for k in missing if not (gcfg.tie_embeddings and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    hf.generation_config = transformers.GenerationConfig(
        bos_token_id=None, eos_token_id=[EOT_ID, END_ID], pad_token_id=PAD_ID)
    return hf.float().eval()


def to_hf_tokenizer(tok: Tokenizer, block_size: int):
    """A PreTrainedTokenizerFast over the same tokenizer.json: our special tokens (end of text as `eos_token`, the
    chat markers as additional special tokens), data.chat's chat template, no cleanup of spaces when decoding."""
    import tokenizers

    transformers = require_transformers()
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())  # a copy, without our runtime-only flags
    backend.encode_special_tokens = False  # transformers maps special-token strings to their ids (chat templates)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=SPECIAL_TOKENS[EOT_ID], pad_token=SPECIAL_TOKENS[PAD_ID],
        additional_special_tokens=[SPECIAL_TOKENS[i] for i in range(2, len(SPECIAL_TOKENS))],
        chat_template=CHAT_TEMPLATE, model_max_length=block_size, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------- import
def _mlp_ratio(hidden: int, n_embd: int, setting: str) -> float:
    """The mlp_ratio whose MLP width (mlp_ratio x n_embd rounded up to a multiple of 8) is exactly `hidden`."""
    if hidden % 8:
        raise ValueError(f"{setting}={hidden}: gptrain's MLP width is a multiple of 8 (mlp_ratio x n_embd rounded up)")
    ratio = hidden / n_embd
    while 8 * math.ceil(ratio * n_embd / 8) > hidden:  # float rounding just above a multiple of 8
        ratio = math.nextafter(ratio, 0.0)
    return ratio


# The activation of each Llama-family member's MLP as gptrain computes it: SwiGLU (silu), or arcee's relu(x)^2.
FAMILY_ACT = {"llama": "silu", "qwen3": "silu", "arcee": "relu2"}
FAMILY_NAME = {"llama": "a Llama", "qwen3": "a Qwen3", "arcee": "an Arcee"}  # for messages


def gpt_config_from_hf(config) -> GPTConfig:
    """The GPTConfig of a transformers Llama (Qwen3, Arcee) or GPT-2 config; ValueError naming any setting gptrain
    cannot express."""
    kind = getattr(config, "model_type", None)
    if kind in FAMILY_ACT:
        return _llama_family_config(config, kind)
    if kind == "gpt2":
        return _gpt2_config(config)
    raise ValueError(f"model_type={kind!r}: only Llama (llama), Qwen3 (qwen3), Arcee (arcee) and GPT-2 (gpt2) "
                     "checkpoints can be imported")


def _llama_family_config(config, kind: str) -> GPTConfig:
    """llama -> the plain modern model, qwen3 -> qk_norm, arcee -> relu_squared."""
    if config.hidden_act != FAMILY_ACT[kind]:
        raise ValueError(f"hidden_act={config.hidden_act!r}: gptrain computes {FAMILY_NAME[kind]} MLP with "
                         f"{FAMILY_ACT[kind]!r}")
    if kind == "qwen3":
        if config.attention_bias:
            raise ValueError("attention_bias=True in a qwen3 config: gptrain's bias switch also gives the MLP biases, "
                             "which Qwen3 lacks")
        layer_types = getattr(config, "layer_types", None) or []
        if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            raise ValueError(f"use_sliding_window={config.use_sliding_window} / layer_types={layer_types}: gptrain "
                             "attends over the full context in every layer")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"head_dim={head_dim}: gptrain needs head_dim x num_attention_heads == hidden_size "
                         f"({config.hidden_size})")
    rope = getattr(config, "rope_parameters", None) or {
        "rope_type": (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default"),
        "rope_theta": getattr(config, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r}: gptrain implements plain rotary embeddings only")
    if kind != "qwen3" and bool(config.attention_bias) != bool(getattr(config, "mlp_bias", False)):
        raise ValueError(f"attention_bias={config.attention_bias} with mlp_bias={config.mlp_bias}: gptrain has "
                         "one bias switch for all linear layers")
    return GPTConfig(
        vocab_size=config.vocab_size, block_size=config.max_position_embeddings, n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads, n_kv_head=config.num_key_value_heads or config.num_attention_heads,
        n_embd=config.hidden_size, mlp_ratio=_mlp_ratio(config.intermediate_size, config.hidden_size,
                                                        "intermediate_size"),
        tie_embeddings=bool(config.tie_word_embeddings), arch="modern", bias=bool(config.attention_bias),
        rope_theta=float(rope["rope_theta"]), norm_eps=config.rms_norm_eps, init_std=config.initializer_range,
        qk_norm=kind == "qwen3", relu_squared=kind == "arcee")


def _gpt2_config(config) -> GPTConfig:
    """gpt2 -> arch=gpt2 (biases on; from_hf_state_dict turns them off when all are zero)."""
    if config.activation_function not in GELU_TANH:
        raise ValueError(f"activation_function={config.activation_function!r}: gptrain's GPT-2 MLP uses the tanh "
                         f"approximation of GELU ({' or '.join(GELU_TANH)})")
    for name, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if bool(getattr(config, name, want)) != want:
            raise ValueError(f"{name}={getattr(config, name)}: gptrain's attention needs {name}={want}")
    hidden = config.n_inner or 4 * config.n_embd
    return GPTConfig(
        vocab_size=config.vocab_size, block_size=config.n_positions, n_layer=config.n_layer, n_head=config.n_head,
        n_embd=config.n_embd, mlp_ratio=_mlp_ratio(hidden, config.n_embd, "n_inner"),
        tie_embeddings=bool(config.tie_word_embeddings), arch="gpt2", bias=True,
        norm_eps=config.layer_norm_epsilon, init_std=config.initializer_range)


def from_hf_state_dict(hsd: dict[str, torch.Tensor], gcfg: GPTConfig) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """transformers weights -> (gptrain state dict, config). A GPT-2 whose biases are all zero (e.g. our own export
    of a bias-free model) comes back with bias=False, so an export/import round trip restores the same model."""
    hsd = {k: v.detach().float() for k, v in hsd.items()}
    if gcfg.tie_embeddings:
        hsd.pop("lm_head.weight", None)
    if gcfg.arch == "modern":
        sd = {ours: hsd[theirs] for ours, theirs in _llama_names(gcfg.n_layer) if theirs in hsd}
        return {k: v.clone() for k, v in sd.items()}, gcfg
    c = gcfg.n_embd
    sd = {"wte.weight": hsd["transformer.wte.weight"], "wpe.weight": hsd["transformer.wpe.weight"],
          "norm_f.weight": hsd["transformer.ln_f.weight"], "norm_f.bias": hsd["transformer.ln_f.bias"]}
    if not gcfg.tie_embeddings:
        sd["lm_head.weight"] = hsd["lm_head.weight"]
    for i in range(gcfg.n_layer):
        b, t = f"blocks.{i}.", f"transformer.h.{i}."
        w = hsd[t + "attn.c_attn.weight"].t()  # [3C, C]
        bias = hsd[t + "attn.c_attn.bias"]
        for j, n in enumerate("qkv"):
            sd[f"{b}attn.{n}_proj.weight"] = w[j * c:(j + 1) * c]
            sd[f"{b}attn.{n}_proj.bias"] = bias[j * c:(j + 1) * c]
        sd.update({
            b + "norm1.weight": hsd[t + "ln_1.weight"], b + "norm1.bias": hsd[t + "ln_1.bias"],
            b + "norm2.weight": hsd[t + "ln_2.weight"], b + "norm2.bias": hsd[t + "ln_2.bias"],
            b + "attn.o_proj.weight": hsd[t + "attn.c_proj.weight"].t(),
            b + "attn.o_proj.bias": hsd[t + "attn.c_proj.bias"],
            b + "mlp.up_proj.weight": hsd[t + "mlp.c_fc.weight"].t(), b + "mlp.up_proj.bias": hsd[t + "mlp.c_fc.bias"],
            b + "mlp.down_proj.weight": hsd[t + "mlp.c_proj.weight"].t(),
            b + "mlp.down_proj.bias": hsd[t + "mlp.c_proj.bias"],
        })
    if all(not v.any() for k, v in sd.items() if k.endswith(".bias")):
        sd = {k: v for k, v in sd.items() if not k.endswith(".bias")}
        gcfg = GPTConfig.from_dict({**gcfg.to_dict(), "bias": False})
    return {k: v.contiguous().clone() for k, v in sd.items()}, gcfg
