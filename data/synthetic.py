"""Built-in fine-tuning data: small instruction tasks with verifiable answers, generated from a seed.

Four task families, one fixed surface form each, so that a tiny model pre-trained on Python source can pick them up
in a few hundred SFT steps::

    add      What is 47+385?            -> 432
    reverse  Reverse: k q b e           -> e b q k
    sort     Sort: 42 7 19 7            -> 7 7 19 42
    count    Count a in 'abacdba'       -> 3

``make_sft`` gives conversations (``{"messages": [user, assistant], "task": ...}``, the TRL "messages" format);
``make_preferences`` gives pairs (``{"prompt": [user], "chosen": [assistant], "rejected": [assistant], "task": ...}``)
whose rejected answer is a plausible mistake (off by one or ten, two elements swapped, the list left unsorted...);
``make_ratings`` gives rated completions (``{"prompt", "completion", "score", "task"}``, the score the answer's
``partial_credit``) for reward models.
``answer_matches`` is the exact-match check used for accuracy. ``write_builtin`` writes both as .jsonl files that
load through ``datasets`` like any user data.

Splits: a prompt belongs to the validation split iff a stable hash of its text falls in a fixed 1/10 bucket, so
validation prompts never occur in any training set (SFT or DPO, whatever the seed or size); each split and each
dataset kind also draws from its own seeded random stream. Prompts are unique within a split.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

TASKS = ("add", "reverse", "sort", "count")
SPLITS = ("train", "validation")
DEFAULT_SIZES = {"train": 4000, "validation": 200}  # what `train.py --data synthetic` uses unless told otherwise
_VAL_BUCKETS = 10  # 1 prompt in 10 (by hash) is reserved for validation

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_COUNT_ALPHABET = "abcd"  # few letters so that counts are usually > 1


def _gen_add(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(0, 10 ** rng.randint(1, 3) - 1), rng.randint(0, 10 ** rng.randint(1, 3) - 1)
    return f"What is {a}+{b}?", str(a + b), a + b


def _gen_reverse(rng: random.Random) -> tuple[str, str, list[str]]:
    items = rng.sample(_LETTERS, rng.randint(3, 6))  # distinct letters: a wrong order is always a different string
    return "Reverse: " + " ".join(items), " ".join(reversed(items)), items


def _gen_sort(rng: random.Random) -> tuple[str, str, list[int]]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return "Sort: " + " ".join(map(str, nums)), " ".join(map(str, sorted(nums))), nums


def _gen_count(rng: random.Random) -> tuple[str, str, int]:
    word = "".join(rng.choice(_COUNT_ALPHABET) for _ in range(rng.randint(4, 9)))
    ch = rng.choice(_COUNT_ALPHABET)
    return f"Count {ch} in '{word}'", str(word.count(ch)), word.count(ch)


_GENERATORS: dict[str, Callable[[random.Random], tuple]] = {
    "add": _gen_add,
    "reverse": _gen_reverse,
    "sort": _gen_sort,
    "count": _gen_count,
}


def _wrong_answer(task: str, answer: str, data, rng: random.Random) -> str:
    """A plausible but wrong answer for the DPO "rejected" side (always different from ``answer``)."""
    if task in ("add", "count"):
        value = data
        deltas = [1, -1, 10, -10] if task == "add" else [1, -1, 2]
        candidates = [value + d for d in deltas if value + d >= 0]
        return str(rng.choice(candidates))
    items = answer.split(" ")
    if task == "reverse":
        choices = ["original", "swap"]
    else:  # sort: the input order is wrong unless it happens to be sorted already
        choices = ["swap", "original"] if " ".join(map(str, data)) != answer else ["swap"]
    for _ in range(20):
        how = rng.choice(choices)
        if how == "original":
            wrong = " ".join(map(str, data))
        else:  # swap two adjacent elements of the right answer
            i = rng.randrange(len(items) - 1)
            swapped = items[:i] + [items[i + 1], items[i]] + items[i + 2 :]
            wrong = " ".join(swapped)
        if wrong != answer:
            return wrong
    # e.g. sorting [5, 5, 5]: every permutation is right; changing one number is still a plausible slip
    return " ".join(items[:-1] + [str(int(items[-1]) + 1)])


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash of its text (independent of seeds and sizes)."""
    return "validation" if zlib.crc32(prompt.encode("utf-8")) % _VAL_BUCKETS == 0 else "train"


def _check(n: int, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"number of examples must be >= 0, got {n}")


def _draw(n: int, seed: int, split: str, kind: str):
    """Yield (task, prompt, answer, data, rng) for ``n`` unique prompts of ``split``, tasks in equal shares."""
    rng = random.Random(f"gptrain-synthetic/{kind}/{split}/{seed}")  # str seeds are stable across Python versions
    seen: set[str] = set()
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        for _ in range(10_000):
            prompt, answer, data = _GENERATORS[task](rng)
            if prompt not in seen and split_of(prompt) == split:
                break
        else:  # not reachable with the ranges above; guards against a future too-small task space
            raise ValueError(f"cannot draw {n} unique {split} prompts for task {task!r}")
        seen.add(prompt)
        yield task, prompt, answer, data, rng


def make_sft(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` conversations ``{"messages": [user, assistant], "task": name}``, deterministic in (n, seed, split)."""
    _check(n, split)
    records = [
        {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "task": task,
        }
        for task, prompt, answer, _, _ in _draw(n, seed, split, "sft")
    ]
    random.Random(f"gptrain-synthetic/sft-order/{split}/{seed}").shuffle(records)
    return records


def make_preferences(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` preference pairs ``{"prompt": [user], "chosen": [assistant], "rejected": [assistant], "task": name}``."""
    _check(n, split)
    records = []
    for task, prompt, answer, data, rng in _draw(n, seed, split, "dpo"):
        wrong = _wrong_answer(task, answer, data, rng)
        assert wrong != answer, (prompt, answer)
        records.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": wrong}],
                "task": task,
            }
        )
    random.Random(f"gptrain-synthetic/dpo-order/{split}/{seed}").shuffle(records)
    return records


def partial_credit(task: str, pred: str, ref: str) -> float:
    """The built-in rating of an answer, in [0, 1]; 1 exactly when it matches (``answer_matches``).

    sort, reverse: the share of list positions right, over the longer of the two lists (an element missing or extra
        counts as a wrong position): ``7 19 7 42`` for ``7 7 19 42`` scores 2/4.
    add, count: ``1 / (1 + |pred - ref|)`` for an integer answer (off by one 0.5, off by ten 1/11), 0 for a
        non-integer one.
    """
    if answer_matches(pred, ref):
        return 1.0
    if task in ("add", "count"):
        try:
            return 1.0 / (1.0 + abs(int(pred.strip()) - int(ref)))
        except ValueError:
            return 0.0
    if task not in ("sort", "reverse"):
        raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
    got, want = pred.split(), ref.split()
    return sum(a == b for a, b in zip(got, want, strict=False)) / max(len(got), len(want), 1)


def _rated_answer(task: str, answer: str, data, rng: random.Random) -> str:
    """An answer to rate: right (1 in 3), a plausible slip (``_wrong_answer``, 1 in 3) or a cruder mistake (a value
    up to 20 away, a shuffled list; 1 in 3), so the ratings spread over [0, 1]."""
    how = rng.choice(("right", "slip", "crude"))
    if how == "right":
        return answer
    if how == "slip":
        return _wrong_answer(task, answer, data, rng)
    if task in ("add", "count"):
        return str(max(0, data + rng.randint(-20, 20)))
    items = answer.split(" ")
    rng.shuffle(items)
    return " ".join(items)


def make_ratings(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` rated completions ``{"prompt": [user], "completion": [assistant], "score": float, "task": name}``:
    an answer (``_rated_answer``) and its ``partial_credit``."""
    _check(n, split)
    records = []
    for task, prompt, answer, data, rng in _draw(n, seed, split, "ratings"):
        given = _rated_answer(task, answer, data, rng)
        records.append({"prompt": [{"role": "user", "content": prompt}],
                        "completion": [{"role": "assistant", "content": given}],
                        "score": partial_credit(task, given, answer), "task": task})
    random.Random(f"gptrain-synthetic/ratings-order/{split}/{seed}").shuffle(records)
    return records


def answer_matches(pred: str, ref: str) -> bool:
    """Exact match after stripping surrounding whitespace (the accuracy criterion of the built-in tasks)."""
    return pred.strip() == ref.strip()


def write_jsonl(path: Path, records: list[dict]) -> None:
    # atomic: a crash never leaves a half-written file that would later load as a smaller dataset
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_builtin(
    out_dir: str | os.PathLike, seed: int = 0, n_train: int | None = None, n_val: int | None = None
) -> dict[str, Path]:
    """Write ``<out_dir>/sft/{train,validation}.jsonl`` and ``<out_dir>/dpo/{train,validation}.jsonl``.

    Returns ``{"sft": <out_dir>/sft, "dpo": <out_dir>/dpo}``; each folder is a ``datasets`` source whose split names
    come from the file names, so ``load_sft(paths["sft"], "validation", ...)`` reads the validation file.
    """
    out = Path(out_dir)
    sizes = {"train": DEFAULT_SIZES["train"] if n_train is None else n_train,
             "validation": DEFAULT_SIZES["validation"] if n_val is None else n_val}
    for split, n in sizes.items():
        write_jsonl(out / "sft" / f"{split}.jsonl", make_sft(n, seed, split))
        write_jsonl(out / "dpo" / f"{split}.jsonl", make_preferences(n, seed, split))
    return {"sft": out / "sft", "dpo": out / "dpo"}
