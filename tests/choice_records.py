"""Multiple-choice records for the tests (scripts/evaluate.py --choices, the lm-evaluation-harness task): four-way
sums phrased as the built-in `add` task, plus the cases the conventions must get right."""

from __future__ import annotations

import json
import random
from pathlib import Path


def sum_records(n: int, seed: int = 0) -> list[dict]:
    """n questions "What is A+B?" with the sum among three near misses at a random place. Every fifth question ends
    in a space (moved into the continuation in plain mode), every seventh has choices of different lengths in
    characters and in UTF-8 bytes (so acc, acc_norm and acc_bytes can differ), and the last one's context is longer
    than the tiny models' 64 tokens (cut from the left)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n - 1):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        total = a + b
        wrong = rng.sample([x for x in range(max(0, total - 12), total + 13) if x != total], 3)
        choices = [str(x) for x in wrong]
        answer = rng.randrange(4)
        choices.insert(answer, str(total))
        if i % 7 == 3:
            choices = [c if j == answer else f"{c} (é)" if j % 2 else f"{c}0" for j, c in enumerate(choices)]
        rows.append({"question": f"What is {a}+{b}?" + (" " if i % 5 == 0 else ""), "choices": choices,
                     "answer": answer})
    numbers = " ".join(str(rng.randint(1, 999)) for _ in range(40))
    rows.append({"question": f"Sort: {numbers}", "choices": ["1 2 3", "4 5"], "answer": 1})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
