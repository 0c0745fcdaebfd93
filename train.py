"""gptrain: pre-train, SFT or DPO a small GPT. One program, launched the same way on a laptop and on a cluster.

Pre-train the default `tiny` model on the built-in corpus (the Python standard library's own source), on CPU:
    python train.py
    python train.py --out runs/tiny --train.time_budget_min=10
Fine-tune it on the built-in synthetic chat tasks, then align it with DPO:
    python train.py --stage sft --init-from runs/default --out runs/sft
    python train.py --stage dpo --init-from runs/sft --out runs/dpo
Continue an interrupted run (same schedule, bitwise-identical losses on CPU in fp32):
    python train.py --out runs/tiny --resume
Large data: prepare it once (streamed, on every core, resumable), then train on the folder:
    python scripts/prepare_data.py hf:HuggingFaceFW/fineweb-edu:sample-100BT --config configs/gpt2.toml \
        --out prepared/fineweb
Several processes or machines (DDP by default, FSDP2 with --dist.strategy=fsdp):
    torchrun --nproc_per_node=8 train.py --model.preset=gpt2 --data prepared/fineweb --out runs/gpt2
Every option: python train.py --help   (settable as --section.key=value or in a TOML file given with --config)
"""

from __future__ import annotations

import sys

from training.config import parse_args
from training.loop import TrainingError, run


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line and train; returns the run summary (used by tests and scripts)."""
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    return run(cfg)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
