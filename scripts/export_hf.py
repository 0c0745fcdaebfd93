"""Export a gptrain run to a Hugging Face `transformers` folder that loads with no custom code.

    python scripts/export_hf.py runs/sft exports/sft
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer as T; \
               m = AutoModelForCausalLM.from_pretrained('exports/sft'); t = T.from_pretrained('exports/sft')"
    lm_eval --model hf --model_args pretrained=exports/sft --tasks lambada_openai --device cpu

RUN_DIR is a run folder (its newest checkpoint) or a checkpoint file. The folder gets config.json, model.safetensors
(fp32), generation_config.json (stops at <|endoftext|> and <|end|>) and the tokenizer as transformers saves it, with
the special tokens and data.chat's chat template. The modern architecture becomes LlamaForCausalLM (with
model.qk_norm Qwen3ForCausalLM, with model.relu_squared ArceeForCausalLM) and gpt2 GPT2LMHeadModel (training/hf.py); a
config with no exact equivalent is refused, naming the setting (model.logit_softcap, model.residual_scalars,
model.value_embeds, model.bigram_buckets, qk_norm with relu_squared, ...). A reward model (--stage rm) becomes the
same family's ForSequenceClassification class (num_labels=1, pad_token_id <|pad|>), which TRL and others load with
AutoModelForSequenceClassification; its scores are what is verified.

Before the folder appears, the saved model is loaded back with AutoModelForCausalLM and its logits compared with the
native model's (fp32): EXPORT_DIR is written completely and verified, or not at all. An existing non-empty
EXPORT_DIR is refused. Single process (there is nothing to parallelise; do not launch it with torchrun).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout, not installed: as train.py

from data.tokenizer import END_ID, PAD_ID, SPECIAL_TOKENS
from model.reward import RewardModel
from training.cli import EXPECTED_ERRORS, run_script
from training.hf import check_exportable, require_transformers, to_hf_model, to_hf_tokenizer
from training.load import check_new_folder, load_run, write_folder_atomically

VERIFY_ATOL = 1e-4  # fp32 logits of the reloaded model vs the native one


@torch.no_grad()
def verify(folder: Path, model, seed: int = 0) -> float:
    """Load `folder` through the Auto classes and return the largest logit difference to `model` on random ids."""
    import transformers

    transformers.AutoTokenizer.from_pretrained(folder)  # must load too
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, RewardModel):
        return verify_scores(transformers.AutoModelForSequenceClassification.from_pretrained(folder), model, g)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, min(model.cfg.block_size, 32)), generator=g)
    return (hf(ids).logits - model(ids)).abs().max().item()


def verify_scores(hf, model, g: torch.Generator) -> float:
    """The largest score difference on random rows ending in <|end|>, one of them right-padded with <|pad|>: the
    classifier reads the last non-padding token, the native model the given end position."""
    hf = hf.float().eval()
    T = min(model.cfg.block_size, 32)
    ids = torch.randint(len(SPECIAL_TOKENS), model.cfg.vocab_size, (2, T), generator=g)  # no pad inside a row
    ends = torch.tensor([T - 1, T // 2])
    ids[torch.arange(2), ends] = END_ID
    ids[1, T // 2 + 1 :] = PAD_ID
    return (hf(ids).logits[:, 0] - model.scores(ids, ends)).abs().max().item()


def export(run_path: str | Path, export_dir: str | Path, check: bool = True) -> Path:
    """Write the transformers folder of a run; returns its path. ValueError for unsupported configs or a used folder."""
    require_transformers()
    export_dir = check_new_folder(export_dir, "export folder")
    run = load_run(run_path, device="cpu", precision="fp32")
    check_exportable(run.gcfg)  # before anything is written
    hf_model = to_hf_model(run.model)
    hf_tok = to_hf_tokenizer(run.tok, run.gcfg.block_size)

    def fill(tmp: Path) -> None:
        hf_model.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        if check:
            diff = verify(tmp, run.model)
            if not diff <= VERIFY_ATOL:
                raise RuntimeError(f"the exported model's {'scores' if isinstance(run.model, RewardModel) else 'logits'} differ from the checkpoint's by {diff:.3g} "
                                   f"(tolerance {VERIFY_ATOL}); nothing was written")

    out = write_folder_atomically(export_dir, fill)
    arch = hf_model.config.architectures[0] if hf_model.config.architectures else type(hf_model).__name__
    print(f"exported {run.ckpt['path']} (step {run.step}, {run.gcfg.arch}) as {arch} to {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run_dir", help="run folder (its newest checkpoint) or a checkpoint file")
    p.add_argument("export_dir", help="new folder to write (must not exist, or be empty)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    args = p.parse_args(argv)
    return export(args.run_dir, args.export_dir, check=not args.no_verify)


if __name__ == "__main__":
    run_script(main, errors=(*EXPECTED_ERRORS, RuntimeError, ImportError))
