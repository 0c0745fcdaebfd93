"""Preference pairs from a policy's own mistakes, for a reward model that judges what the policy will write.

    python scripts/policy_pairs.py runs/sft --out pairs.jsonl                      # 12000 prompts x 2 samples
    python train.py --stage rm --init-from runs/sft --data pairs.jsonl --out runs/rm

The built-in pairs' rejected answers are one kind of slip each (off by one or ten, two items swapped, the list left
as given); a reward model trained on them alone misjudges the wrong answers a policy invents, and RL against it
learns to write those. Here each built-in training prompt (data/synthetic.py:make_sft(N, --seed), training split
only, so the built-in validation pairs stay held out) gets --samples completions from the run at --temperature; each
distinct wrong one (by the tasks' exact-match checker) becomes a pair: chosen = the reference answer, rejected = the
policy's answer (a reply cut at --max-new-tokens included). --builtin M adds M built-in pairs
(make_preferences(M, --seed)) so the slips they cover stay covered. Records are in the DPO / RM format
({"prompt": [user], "chosen": [assistant], "rejected": [assistant], "task", "source": "policy" | "builtin"}),
shuffled, written atomically. Sampling is reproducible: row i's key derives from (--seed, prompt index, sample).
Single process.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout, not installed: as train.py

from data.chat import render_prompt
from data.synthetic import TASKS, answer_matches, make_preferences, make_sft, write_jsonl
from data.tokenizer import END_ID, PAD_ID
from model.generation import generate_rollouts, hashed_key
from training.cli import run_script
from training.load import PRECISIONS, load_run, refuse_reward_model


def sample_key(seed: int, prompt_index: int, sample: int) -> int:
    """The sampling key (int64) of one completion: a hash of (seed, prompt index, sample)."""
    return hashed_key("gptrain-pairs", seed, prompt_index, sample)


def policy_pairs(run, records: list[dict], samples: int, temperature: float, max_new_tokens: int, seed: int,
                 batch_prompts: int = 64) -> tuple[list[dict], Counter, Counter]:
    """(pairs, right samples per task, samples per task) for the conversations `records` (make_sft's)."""
    pairs, right, seen = [], Counter(), Counter()
    for start in range(0, len(records), batch_prompts):
        chunk = records[start:start + batch_prompts]
        prompts = [render_prompt(r["messages"][:1], run.tok) for r in chunk for _ in range(samples)]
        keys = torch.tensor([sample_key(seed, start + i // samples, i % samples) for i in range(len(prompts))])
        with torch.no_grad(), run.autocast:
            rollout = generate_rollouts(run.model, prompts, max_new_tokens, temperature, keys.to(run.device),
                                        END_ID, PAD_ID)
        completions = rollout.input_ids[:, rollout.prompt_len:]  # (N, M)
        for k, record in enumerate(chunk):
            reference, task = record["messages"][1]["content"], record["task"]
            wrong = []
            for i in range(k * samples, (k + 1) * samples):
                ids = completions[i][rollout.completion_mask[i]].tolist()
                text = run.tok.decode(ids[:-1] if ids and ids[-1] == END_ID else ids)
                seen[task] += 1
                if answer_matches(text, reference):
                    right[task] += 1
                elif text.strip() and text not in wrong:
                    wrong.append(text)
            pairs += [{"prompt": record["messages"][:1], "chosen": [record["messages"][1]],
                       "rejected": [{"role": "assistant", "content": text}], "task": task, "source": "policy"}
                      for text in wrong]
    return pairs, right, seen


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run_dir", help="the policy: a run folder (its newest checkpoint) or a checkpoint file")
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--prompts", type=int, default=12000, help="built-in training prompts to sample on")
    p.add_argument("--samples", type=int, default=2, help="completions per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0: the policy's own sampling distribution")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--builtin", type=int, default=24000, help="built-in pairs added (0 = none)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = p.parse_args(argv)
    if args.prompts < 1 or args.samples < 1 or args.builtin < 0 or args.max_new_tokens < 1:
        raise ValueError("--prompts, --samples and --max-new-tokens must be >= 1, --builtin >= 0")
    if not args.temperature > 0:
        raise ValueError(f"--temperature={args.temperature} must be > 0: the pairs are the policy's samples")
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise ValueError(f"--out {out}: give a .jsonl file (the format train.py --stage rm --data reads)")

    run = load_run(args.run_dir, args.device, args.precision)
    refuse_reward_model(run, "sampling answers")
    run.model.eval()
    pairs, right, seen = policy_pairs(run, make_sft(args.prompts, args.seed, "train"), args.samples,
                                      args.temperature, args.max_new_tokens, args.seed)
    builtin = [{**r, "source": "builtin"} for r in make_preferences(args.builtin, args.seed, "train")]
    records = pairs + builtin
    random.Random(f"gptrain-pairs/order/{args.seed}").shuffle(records)
    write_jsonl(out, records)
    shares = ", ".join(f"{t} {right[t] / seen[t]:.2f}" for t in TASKS if seen[t])
    print(f"{sum(seen.values())} samples, right: {shares}; {len(pairs)} policy pairs + {len(builtin)} built-in "
          f"-> {out}")
    return out


if __name__ == "__main__":
    run_script(main)
