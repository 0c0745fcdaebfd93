"""Import a Llama, Qwen3, Arcee or GPT-2 checkpoint from a Hugging Face folder as a gptrain run, ready for SFT or DPO.

    python scripts/import_hf.py exports/sft runs/imported
    python train.py --stage sft --init-from runs/imported --out runs/imported-sft

HF_DIR is a local folder as `save_pretrained` writes it (config.json, safetensors or .bin weights, tokenizer.json):
an export of scripts/export_hf.py, or a compatible LlamaForCausalLM / Qwen3ForCausalLM (gptrain's model.qk_norm) /
ArceeForCausalLM (model.relu_squared) / GPT2LMHeadModel. Its tokenizer must hold
gptrain's six special tokens at ids 0..5 (<|endoftext|>, <|pad|>, <|system|>, <|user|>, <|assistant|>, <|end|>),
which the chat format and the data pipeline rely on; a tokenizer without them is refused. Settings gptrain cannot
express (rope scaling, another activation, ...) are refused with a message naming them.

RUN_DIR (new, or empty) gets one checkpoint with the weights (fp32), the model shape, the tokenizer and a training
config, plus config.toml and tokenizer.json, written completely or not at all. It has no optimizer state: it can be
fine-tuned (--init-from), evaluated, sampled and exported, not resumed. Single process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tokenizers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout, not installed: as train.py

from data.tokenizer import SPECIAL_TOKENS, Tokenizer
from model.gpt import GPT
from training.cli import EXPECTED_ERRORS, run_script
from training.hf import from_hf_state_dict, gpt_config_from_hf, require_transformers
from training.load import check_new_folder, save_run
from training.weights import load_weights


def load_hf_tokenizer(hf_dir: Path) -> Tokenizer:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir} has no tokenizer.json: gptrain needs a fast (tokenizers) tokenizer file")
    try:
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), source=str(path))
    except ValueError as e:
        raise ValueError(f"{path}: this tokenizer cannot be used by gptrain, whose chat format and data pipeline need "
                         f"the special tokens {SPECIAL_TOKENS} at ids 0..5 ({e}). Train a model with gptrain's "
                         "tokenizer, or add these tokens at those ids and resize the embeddings first") from None


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Convert the transformers folder `hf_dir` into a new gptrain run folder `run_dir`; returns its path."""
    transformers = require_transformers()

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json; expected a folder written by save_pretrained")
    check_new_folder(run_dir, "run folder")
    tok = load_hf_tokenizer(hf_dir)  # cheap checks first: the weights may be large
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    gcfg = gpt_config_from_hf(config)
    if gcfg.vocab_size < tok.vocab_size:
        raise ValueError(f"vocab_size={gcfg.vocab_size} of the model is smaller than its tokenizer's {tok.vocab_size}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    sd, gcfg = from_hf_state_dict(hf.state_dict(), gcfg)
    del hf
    model = GPT(gcfg)
    load_weights(model, sd)  # every tensor present with the right shape
    out = save_run(run_dir, sd, gcfg, tok, extra={"imported_from": str(hf_dir.resolve()),
                                                  "hf_architecture": (config.architectures or [""])[0]})
    print(f"imported {hf_dir} ({config.model_type}: {model.num_params() / 1e6:.2f}M parameters, gptrain arch "
          f"{gcfg.arch}) into {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("hf_dir", help="a local transformers folder (save_pretrained layout)")
    p.add_argument("run_dir", help="new gptrain run folder to write (must not exist, or be empty)")
    args = p.parse_args(argv)
    with torch.no_grad():
        return import_hf(args.hf_dir, args.run_dir)


if __name__ == "__main__":
    run_script(main, errors=(*EXPECTED_ERRORS, ImportError))
