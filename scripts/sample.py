"""Generate text from a gptrain run.

    python scripts/sample.py runs/tiny --prompt "def fib(n):"
    python scripts/sample.py runs/tiny --prompt "import " --temperature 0.8 --top-k 50 --num-samples 3 --seed 1
    python scripts/sample.py runs/sft --chat --prompt "What is 12+30?" --temperature 0      # greedy
    python scripts/sample.py runs/tiny/checkpoints/step_00000150.pt --prompt "class "        # one checkpoint file

Plain mode continues the prompt (an empty prompt starts a new document) and stops at <|endoftext|>. Chat mode
renders the prompt as a user turn followed by <|assistant|> (data.chat) and prints the reply, stopping at <|end|>.
--temperature 0 decodes greedily; otherwise sampling is top-k and/or nucleus (top-p), reproducible with --seed.
Single process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout, not installed: as train.py

from training.cli import run_script
from training.load import PRECISIONS, load_run, refuse_reward_model


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run_dir", help="run folder (its newest checkpoint) or a checkpoint file")
    p.add_argument("--prompt", default="", help="text to continue (chat mode: the user's message)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--chat", action="store_true", help="answer the prompt as a user turn, stop at <|end|>")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = p.parse_args(argv)
    if args.temperature < 0 or args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError("--temperature must be >= 0, --max-new-tokens and --num-samples >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p={args.top_p} must be in (0, 1]")

    run = load_run(args.run_dir, args.device, args.precision)
    refuse_reward_model(run, "sampling text")
    g = torch.Generator(device=run.device).manual_seed(args.seed)
    texts = []
    for i in range(args.num_samples):
        text = run.generate_text(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                 args.chat, g)
        texts.append(text)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text if args.chat else args.prompt + text, flush=True)
    return texts


if __name__ == "__main__":
    run_script(main)
