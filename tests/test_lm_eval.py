"""lm-evaluation-harness (the `eval` extra) on an exported tiny SFT run, offline: a local multiple-choice task (a
YAML with `dataset_path: json` over a JSONL file this module writes) through the harness's Python API, plain and
with its chat template, gives every choice the log-likelihood `scripts/evaluate.py --choices` gives it (within
1e-4) and the same accuracies; and the README's `lm_eval` command line runs as written. The task YAML and the
command line are the README's own (tested to appear there verbatim, which needs no harness)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.choice_records import sum_records, write_jsonl
from tests.conftest import optional_import

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gptrain_script_evaluate", ROOT / "scripts" / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)
spec = importlib.util.spec_from_file_location("gptrain_script_export_hf", ROOT / "scripts" / "export_hf.py")
export_hf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_hf)

# The task as the README shows it (test_readme_shows_this_task_and_command_line checks it is the README's): its data
# file relative to the folder lm_eval runs in.
TASK_YAML = """\
task: sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: tasks/sums.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""
# The README's command line, run as written from the folder holding exports/ and tasks/ (checked as TASK_YAML).
README_COMMAND = ("lm_eval --model hf --model_args pretrained=exports/sft --tasks sums --include_path tasks "
                  "--apply_chat_template --device cpu --batch_size 8 --output_path results")
METRICS = {"acc": "mc_accuracy", "acc_norm": "mc_accuracy_norm", "acc_bytes": "mc_accuracy_bytes"}
README_SECTION = "### lm-evaluation-harness"


def readme_blocks(readme: Path, section: str) -> dict[str, list[str]]:
    """The fenced code blocks of one README section (from its heading to the next heading): language -> texts."""
    text = readme.read_text(encoding="utf-8")
    assert section in text, f"{readme} has no section {section!r}"
    body = re.split(r"\n#{1,6} ", text.split(section, 1)[1], maxsplit=1)[0]  # a fenced "# comment" is no heading
    blocks: dict[str, list[str]] = {}
    for chunk in body.split("```")[1::2]:  # the odd chunks are inside fences: "yaml\n...\n"
        language, _, code = chunk.partition("\n")
        blocks.setdefault(language.strip(), []).append(code)
    return blocks


def test_readme_shows_this_task_and_command_line():
    """What this module runs is what the README's lm-evaluation-harness section tells a user: its YAML block is
    TASK_YAML exactly, its bash block holds README_COMMAND as a line of its own."""
    blocks = readme_blocks(ROOT / "README.md", README_SECTION)
    assert blocks.get("yaml") == [TASK_YAML], blocks.get("yaml")
    assert any(README_COMMAND in code.splitlines() for code in blocks.get("bash", [])), blocks.get("bash")


@pytest.fixture(scope="module")
def lm_eval():
    """The harness (the `eval` extra) and transformers; CI installs both (the `test` extra), so the tests that need
    them run there."""
    optional_import("transformers")
    return optional_import("lm_eval")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="module")
def workdir(lm_eval, tiny_run, tmp_path_factory) -> Path:
    """A folder as a user would have it: runs/sft (tiny_run fine-tuned on the built-in tasks for 60 steps),
    exports/sft (its export), tasks/sums.yaml and tasks/sums.jsonl (40 four-way sums and a context longer than
    the model's 64 tokens)."""
    from train import main

    root = tmp_path_factory.mktemp("lm_eval")
    main(["--stage", "sft", "--init-from", str(tiny_run), "--out", str(root / "runs" / "sft"), "--train.max_steps=60",
          "--train.lr=3e-3", "--train.warmup_steps=5", "--data.synthetic_train=1000", "--eval.interval=0",
          "--log.health_interval=0", "--log.hist_interval=0", "--log.tensorboard=false", "--eval.sample_tokens=8"])
    export_hf.main([str(root / "runs" / "sft"), str(root / "exports" / "sft")])
    write_jsonl(root / "tasks" / "sums.jsonl", sum_records(41))
    (root / "tasks" / "sums.yaml").write_text(TASK_YAML)
    return root


def ours(workdir: Path, chat: bool) -> dict:
    return evaluate.main([str(workdir / "runs" / "sft"), "--choices", str(workdir / "tasks" / "sums.jsonl"),
                          "--device", "cpu", "--chat" if chat else "--no-chat"])


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_harness_log_likelihoods_equal_evaluate_choices(lm_eval, workdir, chat, monkeypatch):
    """Per item and choice, the harness's log-likelihood (log_samples) equals evaluate.py's in the same mode, and
    acc / acc_norm / acc_bytes equal mc_accuracy / _norm / _bytes. The requests show the conventions: plain, the
    question and " " + choice; chat, the user turn rendered by the export's template then the bare choice."""
    import datasets
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(workdir)  # the task's data file is relative, as in the README
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(workdir / "hf-datasets"))  # not ~/.cache
    tasks = TaskManager(include_path=str(workdir / "tasks"), include_defaults=False)  # not the ~10k built-in ones
    out = lm_eval.simple_evaluate(model="hf", model_args="pretrained=exports/sft", tasks=["sums"], task_manager=tasks,
                                  device="cpu", batch_size=8, log_samples=True, apply_chat_template=chat)
    mine = ours(workdir, chat)
    rows = [json.loads(line) for line in (workdir / "tasks" / "sums.jsonl").read_text().splitlines()]
    samples = sorted(out["samples"]["sums"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows) == mine["mc_records"] == 41
    for row, sample, lls in zip(rows, samples, mine["mc_loglikelihoods"], strict=True):
        context = f"<|user|>{row['question']}<|end|><|assistant|>" if chat else row["question"]
        assert [list(a) for a in sample["arguments"]] == [[context, c if chat else " " + c] for c in row["choices"]]
        theirs = [resp[0] for resp in sample["filtered_resps"]]
        assert lls == pytest.approx(theirs, abs=1e-4), sample["doc_id"]
    figures = out["results"]["sums"]
    for metric, key in METRICS.items():
        assert figures[f"{metric},none"] == mine[key], metric


def test_readme_command_line_runs(workdir):
    """The README's lm_eval command, as a user runs it from the folder holding exports/ and tasks/ (offline): it
    writes its results, and their accuracies are evaluate.py --chat's."""
    exe = Path(sys.executable).parent / "lm_eval"
    exe = str(exe) if exe.exists() else shutil.which("lm_eval")
    assert exe, "the lm_eval command of lm-evaluation-harness is not installed next to this Python"
    argv = shlex.split(README_COMMAND)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(workdir / "hf-datasets")}
    proc = subprocess.run([exe, *argv[1:]], cwd=workdir, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = sorted((workdir / "results").rglob("results_*.json"))
    assert len(written) == 1, written
    figures = json.loads(written[0].read_text())["results"]["sums"]
    mine = ours(workdir, chat=True)
    for metric, key in METRICS.items():
        assert figures[f"{metric},none"] == mine[key], metric
    assert "|sums |" in proc.stdout  # the table a user reads
