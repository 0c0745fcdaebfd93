"""scripts/gpu_check.sh --cpu-smoke, run once as a real subprocess: every stage (bench.py twice, torchrun train.py
with configs/gpt2.toml on the corpus it makes, SFT and DPO on top, evaluate.py) finishes and leaves its JSON, the 8
files the device tool brings back are exactly those, and the summary carries the stages' own figures. Then the
stamping and summary of scripts/gpu_check.py on stages that failed, timed out or never ran."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ["01_bench_bf16_compiled.json", "02_bench_eager.json", "03_pretrain.json", "04_sft.json", "05_dpo.json",
         "06_evaluate.json", "gpu_check.json", "gpu_check.log"]
STAGES = ["bench_bf16_compiled", "bench_eager_bf16_fp16", "pretrain", "sft", "dpo", "evaluate"]


def helper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path_factory.mktemp("gpu-check-tmp"))}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    return out, p


def load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_smoke_runs_every_stage(smoke):
    out, p = smoke
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == sorted(FILES)  # at most 8 files come back: these
    for name, stage in zip(FILES[:6], STAGES, strict=True):
        entry = load(out, name)["gpu_check"]
        assert (entry["stage"], entry["status"], entry["rc"]) == (stage, "ok", 0)
        assert 0 < entry["timeout_s"] <= 60 and 0 <= entry["seconds"] <= entry["timeout_s"]
    log = (out / "gpu_check.log").read_text()
    assert "gpu_check: mode cpu-smoke" in log and "=== evaluate: rc 0" in log
    head = log[:log.index("=== bench_bf16_compiled")]  # before the first stage: what `datasets` stands on
    assert all(f"Name: {name} Version: " in head for name in ("pyarrow", "fsspec", "huggingface_hub", "pandas"))
    assert "gpu_check: import datasets: ok" in head
    limits = [load(out, name)["gpu_check"]["timeout_s"] for name in FILES[:6]]
    budget = int(re.search(r"budget (\d+)s", head).group(1))
    assert sum(limits) < budget, (limits, budget)  # the limits fit the budget: no stage starved by those before it


def test_smoke_bench_stages(smoke):
    out, _ = smoke
    first, eager = load(out, FILES[0]), load(out, FILES[1])
    [s] = first["step"]
    assert (s["preset"], s["precision"], s["compile"], s["batch_size"], s["block_size"]) == ("gpt2", "bf16", False,
                                                                                            2, 32)
    assert s["achieved_tflops"] * 1e12 == pytest.approx(s["flops_per_token"] * s["tokens_per_sec"], rel=1e-12)
    assert s["profile"]["top"] and s["profile"]["what"] == "CPU ops, self CPU time"
    assert len(first["peak"]["bf16"]["readings_tflops"]) == 2  # before and after the step measurement
    assert [(r["precision"], r["compile"]) for r in eager["step"]] == [("bf16", False), ("fp16", False)]
    assert first["complete"] is True and eager["complete"] is True


def test_smoke_training_stages(smoke):
    out, _ = smoke
    pre, sft, dpo = (load(out, f) for f in FILES[2:5])
    assert pre["steps"] == 3 and pre["checkpoints"] == ["step_00000002.pt", "step_00000003.pt"]  # --ckpt.interval
    assert pre["last_val"]["val/bpb"] > 0 and pre["tokens_per_sec"] > 0
    assert (sft["steps"], sft["checkpoints"]) == (2, ["step_00000002.pt"])
    assert dpo["steps"] == 2 and "train/rewards/accuracies" in dpo["last_train"]
    ev = load(out, FILES[5])
    assert ev["stage"] == "dpo" and set(ev["data"]) == {"text", "chat", "preference"}
    assert ev["bits_per_byte"] > 0 and 0 <= ev["accuracy"] <= 1 and 0 <= ev["preference_accuracy"] <= 1


def test_smoke_summary(smoke):
    out, _ = smoke
    summary, first = load(out, "gpu_check.json"), load(out, FILES[0])
    assert summary["mode"] == "cpu-smoke" and summary["gpu"] is None
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [(s, "ok") for s in STAGES]
    head = summary["headline"]["gpt2_bf16_compiled"]
    assert head["tokens_per_sec"] == first["step"][0]["tokens_per_sec"]
    assert head["measured_matmul_peak_tflops"] == first["peak"]["bf16"]["readings_tflops"]
    assert head["vendor_peak_tflops"] is None and head["target_met"] is None  # no vendor figure for a CPU
    assert summary["headline"]["pretrain"]["steps"] == 3
    assert [e["precision"] for e in summary["headline"]["eager"]] == ["bf16", "fp16"]


def test_stamp_and_summary_of_failed_stages(tmp_path):
    # stage 1 timed out leaving no JSON, stage 2 failed after writing a half JSON, the rest never ran
    assert helper("stamp", str(tmp_path / FILES[0]), "--stage", STAGES[0], "--rc", "124", "--seconds", "130",
                  "--timeout", "130").returncode == 0
    (tmp_path / FILES[1]).write_text('{"step": [')
    assert helper("stamp", str(tmp_path / FILES[1]), "--stage", STAGES[1], "--rc", "1", "--seconds", "3",
                  "--timeout", "50").returncode == 0
    assert load(tmp_path, FILES[0]) == {"gpu_check": {"stage": STAGES[0], "status": "timeout", "rc": 124,
                                                      "seconds": 130.0, "timeout_s": 130.0}}
    assert load(tmp_path, FILES[1])["gpu_check"]["status"] == "failed"
    assert helper("run", str(tmp_path / "no-run"), str(tmp_path / FILES[2]), "--stage", "pretrain", "--rc", "-1",
                  "--seconds", "0", "--timeout", "0").returncode == 0
    assert load(tmp_path, FILES[2])["steps"] == 0
    p = helper("summary", str(tmp_path), "--mode", "gpu", "--seconds", "140")
    assert p.returncode == 1 and "not ok: bench_bf16_compiled, bench_eager_bf16_fp16, pretrain, sft" in p.stderr
    summary = load(tmp_path, "gpu_check.json")
    assert [s["status"] for s in summary["stages"]] == ["timeout", "failed", "skipped", "missing", "missing",
                                                        "missing"]
    assert "gpt2_bf16_compiled" not in summary["headline"]


def test_later_stages_start_from_a_checkpoint_not_a_return_code(tmp_path):
    """A pre-training stage stopped by its timeout (rc 124) still saved checkpoints: SFT starts from the newest one
    (step 20 over step 3: by number, not name or time); a run with only a half-written .tmp has none."""
    run = tmp_path / "pretrain"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("step_00000003.pt", "step_00000020.pt", "step_00000030.pt.tmp", "latest"):
        (run / "checkpoints" / name).write_text("x")
    p = helper("checkpoint", str(run))
    assert p.returncode == 0 and p.stdout.strip() == str(run / "checkpoints" / "step_00000020.pt")
    for name in ("step_00000003.pt", "step_00000020.pt"):
        (run / "checkpoints" / name).unlink()
    p = helper("checkpoint", str(run))
    assert p.returncode == 1 and f"{run} holds no checkpoint" in p.stderr
    p = helper("checkpoint", str(tmp_path / "never-ran"))
    assert p.returncode == 1 and "never-ran holds no checkpoint" in p.stderr


def test_gpu_stage_limits_fit_the_budget_and_the_device_call():
    """The GPU mode's stage limits leave the stamps room inside its budget, and the worst case (the budget, the
    pre-training stage's kill grace after a timeout, ~60 s for the wheels and the package report before the clock
    starts) fits the 400 s the device call is given. The pre-training stage's grace outlasts torchrun's own 30 s
    between forwarding the SIGTERM and killing its worker, which runs in a session of its own: a SIGKILL to
    torchrun sooner would orphan a worker still holding the GPU."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    gpu_branch = text[text.index("if [[ $MODE == gpu ]]; then"):text.index("\nelse\n")]
    limits = dict(re.findall(r"\b(T_[A-Z]+)=(\d+)", gpu_branch))
    assert sorted(limits) == ["T_BENCH", "T_DPO", "T_EAGER", "T_EVAL", "T_PRETRAIN", "T_SFT"]
    budget = int(re.search(r"BUDGET=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}", gpu_branch).group(1))
    grace = int(re.search(r"KILL_S=(\d+) stage pretrain", text).group(1))
    assert sum(map(int, limits.values())) + 10 <= budget < 300  # "under 5 minutes of work"
    assert grace > 30 and budget + grace + 60 <= 400
    assert text.index("START=$SECONDS") > text.index("import datasets")  # the clock starts after the report


def test_unknown_argument_is_refused(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--gpu-smoke"], cwd=ROOT,
                       env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown argument '--gpu-smoke'" in p.stderr
    assert not list(tmp_path.iterdir())


def test_every_script_runs_from_a_plain_checkout(tmp_path):
    """`python scripts/X.py --help` with the project not installed, as on the device machine (which copies the working
    tree and installs only carried wheels): each script puts the repository root on sys.path itself, as train.py's
    folder is. `-S` skips site-packages' .pth files (how an editable install is found); PYTHONPATH still gives the
    installed libraries (torch, tokenizers, ...). evaluate.py used to fail here with "No module named 'data'"."""
    import site

    from tests.script_runner import run_commands

    scripts = sorted((ROOT / "scripts").glob("*.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages()), "OMP_NUM_THREADS": "1"}
    results = run_commands([[s, "--help"] for s in scripts], cwd=tmp_path, env=env, flags=("-S",), timeout=120)
    assert len(scripts) >= 10
    for script, r in zip(scripts, results, strict=True):
        assert r["exit"] == 0 and r["stdout"].strip(), (script.name, r["exit"], r["stderr"][-2000:])
