"""Export to / import from Hugging Face transformers: parity with the native model, the tokenizer and chat template
through AutoTokenizer, the import round trip, and refusals that leave nothing half-written."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch

from data.chat import render, render_prompt
from data.synthetic import make_preferences, make_sft
from data.tokenizer import END_ID, EOT_ID
from model.gpt import GPT, GPTConfig
from tests.conftest import TINY_ARGS, optional_import
from training import hf as training_hf
from training.load import load_run, save_run

transformers = optional_import("transformers")  # the `hf` extra; CI installs it, so these tests run there

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"gptrain_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_hf = load_script("export_hf")
import_hf = load_script("import_hf")

# The first transformers releases with each family an option exports to (the `hf` extra's floor, 4.45, has neither).
FIRST_RELEASE = {"Qwen3": "4.51.0", "Arcee": "4.53.0"}
OPTION_FAMILY = {"qk_norm": "Qwen3", "relu_squared": "Arcee"}


def skip_without_family(option: str | None) -> None:
    """Skip a QK-norm (Qwen3) or ReLU-squared (Arcee) case, and only such a case, on a transformers that predates the
    family's classes: there the export's ImportError is the documented behaviour, not a failure of the parity."""
    if option not in OPTION_FAMILY:
        return
    family, module = OPTION_FAMILY[option], training_hf.require_transformers()  # the module the export itself will use
    missing = [name for name in (f"{family}Config", f"{family}ForCausalLM", f"{family}ForSequenceClassification")
               if getattr(module, name, None) is None]
    if missing:
        pytest.skip(f"transformers {module.__version__} has no {', '.join(missing)} (model.{option} exports to "
                    f"{family}, first in transformers {FIRST_RELEASE[family]})")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


def random_run(path: Path, tok, **shape) -> GPT:
    """A run folder holding a model with random weights far from init (non-trivial norms and biases)."""
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64, mlp_ratio=3.0, **shape)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_run(path, model.state_dict(), cfg, tok)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, corpus_dir) -> Path:
    """A gpt2-architecture model trained briefly (for greedy generation parity, which needs a trained model)."""
    from train import main

    out = tmp_path_factory.mktemp("gpt2") / "run"
    main(["--data", str(corpus_dir), "--out", str(out), "--train.max_steps=40", "--eval.interval=0",
          "--model.arch=gpt2", "--model.bias=true", "--log.tensorboard=false", "--log.health_interval=0",
          "--log.hist_interval=0", *TINY_ARGS, "--train.batch_size=8", "--eval.max_tokens=512"])
    return out


@pytest.fixture(scope="module")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    return export_hf.main([str(tiny_run), str(tmp_path_factory.mktemp("exports") / "tiny")])


def hf_class_of(shape: dict) -> str:
    """The stock class each gptrain shape exports to (training/hf.py)."""
    if shape["arch"] == "gpt2":
        return "GPT2LMHeadModel"
    return "Qwen3ForCausalLM" if shape.get("qk_norm") else "ArceeForCausalLM" if shape.get("relu_squared") \
        else "LlamaForCausalLM"


@pytest.mark.parametrize("shape", [
    dict(arch="modern", n_kv_head=2, bias=True, tie_embeddings=False),  # GQA, every bias, separate head
    dict(arch="gpt2", bias=False),  # exported with zero biases
    dict(arch="gpt2", bias=True, tie_embeddings=False),
    dict(arch="modern", n_kv_head=2, qk_norm=True),  # Qwen3: q_norm / k_norm before RoPE
    dict(arch="modern", relu_squared=True, bias=True, tie_embeddings=False),  # Arcee: relu2 MLP, biases
], ids=["modern-gqa-bias-untied", "gpt2-nobias-tied", "gpt2-bias-untied", "qk_norm-gqa-tied",
        "relu_squared-bias-untied"])
def test_export_logits_match_native(tiny_run, tmp_path, shape):
    skip_without_family(next((o for o in OPTION_FAMILY if shape.get(o)), None))
    model = random_run(tmp_path / "run", load_run(tiny_run, "cpu").tok, **shape)
    out = export_hf.main([str(tmp_path / "run"), str(tmp_path / "hf")])
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(hf).__name__ == hf_class_of(shape)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        native, theirs = model(ids), hf(ids).logits
    assert native.abs().max() > 1.0  # logits far from zero: the comparison means something
    torch.testing.assert_close(theirs, native, atol=1e-4, rtol=0)


def test_the_default_model_exports_to_one_stock_class_with_logits_parity(tiny_run, tmp_path):
    """The model `python train.py` builds (the `tiny` preset, every option it enables) is Qwen3ForCausalLM: logits
    within 1e-4 of the native model at full size and context, and imported back to the same weights."""
    from training.config import parse_args
    from training.loop import model_config

    tok = load_run(tiny_run, "cpu").tok
    cfg = model_config(parse_args([]), None, tok.vocab_size)  # the default run's shape, at the test tokenizer's vocab
    assert cfg.qk_norm and (cfg.n_layer, cfg.n_embd, cfg.block_size) == (4, 128, 256)
    skip_without_family("qk_norm")
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # far from init: norms and QK-norm weights are not all ones
    save_run(tmp_path / "run", model.state_dict(), cfg, tok)
    out = export_hf.main([str(tmp_path / "run"), str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        native, theirs = model.eval()(ids), hf(ids).logits
    assert native.abs().max() > 1.0
    torch.testing.assert_close(theirs, native, atol=1e-4, rtol=0)
    back = import_hf.main([str(out), str(tmp_path / "back")])
    reloaded = load_run(back, "cpu")
    assert reloaded.gcfg == cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[name], tensor), name


def _greedy_matches(run, hf, prompt: str, n: int = 20) -> int:
    """Compare 20 greedy tokens of transformers' generate with the native ones; a divergence is accepted only at a
    step where the native top-two logits are within 1e-3 (a near tie that rounding may flip). Returns tokens made."""
    idx = torch.tensor([run.tok.encode(prompt)])
    native = run.model.generate(idx, n, temperature=0.0, stop_tokens=(EOT_ID, END_ID))[0].tolist()
    theirs = hf.generate(idx, max_new_tokens=n, do_sample=False)[0].tolist()
    for t in range(idx.shape[1], max(len(native), len(theirs))):
        if t >= len(native) or t >= len(theirs) or native[t] != theirs[t]:
            with torch.no_grad():
                top2 = run.model(torch.tensor([native[:t]]))[0, -1].topk(2).values
            assert (top2[0] - top2[1]).item() < 1e-3, (prompt, t, native, theirs)
            return t - idx.shape[1]
    return len(native) - idx.shape[1]


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_export_greedy_generation_identical(arch, tiny_run, gpt2_run, tiny_export, tmp_path):
    run_dir = tiny_run if arch == "modern" else gpt2_run
    folder = tiny_export if arch == "modern" else export_hf.main([str(gpt2_run), str(tmp_path / "hf")])
    run = load_run(run_dir, "cpu", "fp32")
    assert run.gcfg.arch == arch
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    made = [_greedy_matches(run, hf, p) for p in ("def main(", "import os\n", "class Parser:\n    ")]
    assert sum(made) >= 30  # mostly full-length continuations, not immediate stops


def test_exported_tokenizer_and_chat_template(tiny_run, tiny_export):
    tok = load_run(tiny_run, "cpu").tok
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_export)
    convs = [r["messages"] for r in make_sft(12, 5)] + [r["prompt"] + r["chosen"] for r in make_preferences(4, 5)]
    convs.append([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "héllo  wörld\n\tdef f():"},
                  {"role": "assistant", "content": " ok "}])
    for conv in convs:
        assert hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"] == render(conv, tok)[0]
        prompt = hf_tok.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)
        assert prompt["input_ids"] == render_prompt(conv[:-1], tok)
    text = "def f(x):\n    return  x ** 2  # ünïcode ✓\n"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (EOT_ID, 1)
    gen = json.loads((tiny_export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [EOT_ID, END_ID]


@pytest.mark.parametrize("arch", ["modern", "gpt2", "qk_norm", "relu_squared"])
def test_import_round_trip(arch, tiny_run, tiny_export, gpt2_run, tmp_path):
    skip_without_family(arch)
    if arch == "modern":
        src, folder = tiny_run, tiny_export
    else:  # a bias-free GPT-2 comes back bias-free (its exported biases are all zero); Qwen3 and Arcee as options
        shape = dict(arch="gpt2", bias=False) if arch == "gpt2" else {arch: True, "n_kv_head": 2}
        random_run(tmp_path / "src", load_run(tiny_run, "cpu").tok, **shape)
        src, folder = tmp_path / "src", export_hf.main([str(tmp_path / "src"), str(tmp_path / "hf")])
    out = import_hf.main([str(folder), str(tmp_path / "imported")])
    a, b = load_run(src, "cpu", "fp32"), load_run(out, "cpu", "fp32")
    assert b.gcfg == a.gcfg
    assert b.tok.encode("def f(x):\n  return 'ünï'") == a.tok.encode("def f(x):\n  return 'ünï'")
    ids = torch.randint(0, a.gcfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(b.model(ids), a.model(ids))


def test_imported_run_fine_tunes(tiny_export, tmp_path):
    from train import main

    run = import_hf.main([str(tiny_export), str(tmp_path / "imported")])
    summary = main(["--stage", "sft", "--init-from", str(run), "--out", str(tmp_path / "sft"), "--train.max_steps=2",
                    "--train.batch_size=4", "--data.synthetic_train=32", "--data.synthetic_val=8",
                    "--eval.interval=0", "--log.tensorboard=false", "--eval.sample_tokens=4"])
    assert summary["step"] == 2 and (tmp_path / "sft" / "checkpoints" / "latest").is_file()
    evaluate = load_script("evaluate")
    with pytest.raises(ValueError, match="has no data of its own"):
        evaluate.main([str(run), "--device", "cpu"])
    assert evaluate.main([str(run), "--data", "synthetic", "--max-examples", "4", "--device", "cpu"])["examples"] == 4


@pytest.mark.parametrize("option", ["qk_norm", "relu_squared"])
def test_reward_model_with_an_option_exports_as_its_sequence_classifier(tiny_run, tmp_path, option):
    """A reward model with QK-norm / ReLU-squared becomes Qwen3 / Arcee ForSequenceClassification; the export's own
    check (verify_scores: padded rows read at their last real token) compares the scores with the native ones."""
    from model.reward import RewardModel

    skip_without_family(option)

    tok = load_run(tiny_run, "cpu").tok
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32, **{option: True})
    torch.manual_seed(0)
    rm = RewardModel(cfg).eval()
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        rm.score.weight.normal_(0.0, 1.0)  # scores well away from 0
    folder = export_hf.export(save_run(tmp_path / "rm", rm.state_dict(), cfg, tok, stage="rm"), tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(hf).__name__ == {"qk_norm": "Qwen3", "relu_squared": "Arcee"}[option] + "ForSequenceClassification"
    ids = torch.randint(6, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = rm.scores(ids, torch.tensor([15, 15])), hf(ids).logits[:, 0]
    assert ours.abs().min() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- refusals
def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_export_refuses_unsupported_config(tiny_run, tmp_path):
    random_run(tmp_path / "run", load_run(tiny_run, "cpu").tok, arch="gpt2", n_kv_head=2)
    before = _siblings(tmp_path / "hf")
    with pytest.raises(ValueError, match="n_kv_head=2"):
        export_hf.main([str(tmp_path / "run"), str(tmp_path / "hf")])
    assert _siblings(tmp_path / "hf") == before  # no folder, no temporary left


@pytest.mark.parametrize("option", [
    dict(logit_softcap=15.0), dict(residual_scalars=True), dict(value_embeds=1), dict(bigram_buckets=64),
    dict(qk_norm=True, relu_squared=True), dict(qk_norm=True, bias=True),
], ids=["logit_softcap", "residual_scalars", "value_embeds", "bigram_buckets", "qk_norm+relu_squared",
        "qk_norm+bias"])
def test_export_refuses_each_option_no_stock_class_computes(tiny_run, tmp_path, option):
    """Refused by name before anything is written, the reward-model export too; never approximated."""
    from model.reward import RewardModel
    from training.hf import to_hf_model

    random_run(tmp_path / "run", load_run(tiny_run, "cpu").tok, **option)
    name = "model.qk_norm=true with model." if "qk_norm" in option else f"model.{next(iter(option))}="
    before = _siblings(tmp_path / "hf")
    with pytest.raises(ValueError, match=name):
        export_hf.main([str(tmp_path / "run"), str(tmp_path / "hf")])
    assert _siblings(tmp_path / "hf") == before
    with pytest.raises(ValueError, match=name):
        to_hf_model(RewardModel(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, **option)))


def test_export_refuses_used_folder_and_cleans_up_failures(tiny_run, tmp_path, monkeypatch):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_hf.main([str(tiny_run), str(used)])
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="no checkpoint"):
        export_hf.main([str(tmp_path), str(tmp_path / "out")])

    def broken(folder, model, seed=0):  # the saved model does not compute the same function
        return 1.0

    monkeypatch.setattr(export_hf, "verify", broken)
    before = _siblings(tmp_path / "hf")
    with pytest.raises(RuntimeError, match="nothing was written"):
        export_hf.main([str(tiny_run), str(tmp_path / "hf")])
    assert _siblings(tmp_path / "hf") == before


def test_import_refusals(tiny_export, tmp_path):
    # a tokenizer without gptrain's special tokens
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_export, foreign)
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    words.save(str(foreign / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"special tokens .* at ids 0\.\.5"):
        import_hf.main([str(foreign), str(tmp_path / "run1")])
    assert not (tmp_path / "run1").exists()
    # a setting gptrain cannot express
    gelu = tmp_path / "gelu"
    shutil.copytree(tiny_export, gelu)
    config = json.loads((gelu / "config.json").read_text())
    (gelu / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        import_hf.main([str(gelu), str(tmp_path / "run2")])
    assert not (tmp_path / "run2").exists()
    # an existing run is never overwritten; a folder that is not a transformers folder is named
    (tmp_path / "run3").mkdir()
    (tmp_path / "run3" / "config.toml").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        import_hf.main([str(tiny_export), str(tmp_path / "run3")])
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf.main([str(tmp_path / "run3"), str(tmp_path / "run4")])


def test_import_refuses_what_a_qwen3_config_adds_beyond_qk_norm(tiny_run, tmp_path):
    """Sliding-window attention and Qwen3's attention-only biases have no gptrain equivalent: refused by name."""
    skip_without_family("qk_norm")
    random_run(tmp_path / "src", load_run(tiny_run, "cpu").tok, qk_norm=True)
    folder = export_hf.main([str(tmp_path / "src"), str(tmp_path / "hf")])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    for i, (key, value, message) in enumerate([("use_sliding_window", True, "use_sliding_window=True"),
                                               ("attention_bias", True, "attention_bias=True in a qwen3 config")]):
        changed = tmp_path / f"changed{i}"
        shutil.copytree(folder, changed)
        (changed / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            import_hf.main([str(changed), str(tmp_path / f"run{i}")])
        assert not (tmp_path / f"run{i}").exists()


def test_import_refuses_another_activation_naming_the_family(tiny_run, tmp_path):
    """An Arcee config with SwiGLU's activation is not gptrain's ReLU-squared MLP: refused, naming both."""
    skip_without_family("relu_squared")
    random_run(tmp_path / "src", load_run(tiny_run, "cpu").tok, relu_squared=True)
    folder = export_hf.main([str(tmp_path / "src"), str(tmp_path / "hf")])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "silu"}))
    with pytest.raises(ValueError, match="hidden_act='silu': gptrain computes an Arcee MLP with 'relu2'"):
        import_hf.main([str(folder), str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
