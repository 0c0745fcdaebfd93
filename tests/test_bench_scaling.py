"""scripts/bench.py --scaling, run as a subprocess on tiny shapes: the JSON's structure, the FLOP count of every row
computed here by hand from its shape, FLOP/s = FLOPs/token x tokens/s, MFU = FLOP/s / the mean of the two peak
readings around the row, the markdown table, and the refusal of a shape the sweep cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Two widths at context 16, two contexts at width 32 (the point 32 x 16 is in both sweeps), 64 tokens per step.
TINY_SWEEP = ["--scaling-widths", "32", "64", "--scaling-contexts", "16", "32", "--scaling-at-width", "32",
              "--scaling-at-context", "16", "--scaling-tokens", "64", "--scaling-layers", "2", "--scaling-steps", "2",
              "--scaling-warmup", "1", "--model", "vocab_size=256", "--peak-n", "128", "--peak-seconds", "0.05",
              "--profile-steps", "1", "--no-compile", "--device", "cpu"]
VOCAB, LAYERS, HEAD_SIZE = 256, 2, 32


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--scaling", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def hand_flops_per_token(d: int, T: int) -> int:
    """6N + 12 L d T for the tiny preset's architecture (SwiGLU MLP of 3 d x 4d matrices, q/k/v/o of d x d, tied
    head of d x V), written out here rather than taken from model/gpt.py."""
    n_matmul = LAYERS * (4 * d * d + 3 * d * 4 * d) + d * VOCAB
    return 6 * n_matmul + 12 * LAYERS * d * T


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("scaling") / "scaling.json"
    p = bench(*TINY_SWEEP, "--profile-below", "2.0", "--json", str(out))  # every row below 200%: all profiled
    assert p.returncode == 0, p.stderr
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_scaling_rows_are_the_sweep(sweep):
    results, _ = sweep
    sc = results["scaling"]
    assert set(results) == {"machine", "scaling"}
    assert (sc["precision"], sc["n_layer"], sc["head_size"], sc["tokens_per_step"]) == ("fp32", LAYERS, HEAD_SIZE, 64)
    shapes = [(r["n_embd"], r["block_size"], r["sweeps"]) for r in sc["rows"]]
    assert shapes == [(32, 16, ["width", "context"]), (64, 16, ["width"]), (32, 32, ["context"])]
    for r in sc["rows"]:
        assert r["batch_size"] == 64 // r["block_size"] and r["tokens_per_step"] == 64
        assert (r["n_layer"], r["n_head"], r["compile"]) == (LAYERS, r["n_embd"] // HEAD_SIZE, False)


def test_scaling_flops_and_mfu_by_hand(sweep):
    sc = sweep[0]["scaling"]
    assert len(sc["peak_readings_flops"]) == len(sc["rows"]) + 1  # before the first row, then after each
    for i, r in enumerate(sc["rows"]):
        assert r["flops_per_token"] == hand_flops_per_token(r["n_embd"], r["block_size"])
        assert r["tokens_per_sec"] == pytest.approx(64 / (r["step_ms"] / 1000), rel=1e-12)
        assert r["achieved_flops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_sec"], rel=1e-12)
        before, after = sc["peak_readings_flops"][i:i + 2]
        assert r["peak_before_after_flops"] == [before, after]
        assert r["mfu_measured_peak"] == pytest.approx(r["achieved_flops"] / ((before + after) / 2), rel=1e-12)
        assert r["mfu_vendor_peak"] is None  # no vendor figure for a CPU


def test_scaling_memory_and_profile(sweep):
    sc = sweep[0]["scaling"]
    assert "VmHWM" in sc["memory_measure"]
    for r in sc["rows"]:
        # the row's own model is built after the reset: its fp32 weights and their gradients are live at the peak
        assert r["peak_memory_mb"] is not None and r["peak_memory_mb"] > 2 * 4 * r["params"] / 2**20, r
        prof = r["profile"]
        assert prof["what"] == "CPU ops, self CPU time" and prof["steps"] == 1
        assert any(t["name"] == "aten::mm" for t in prof["top"])  # the matmuls are among the top ops
        shares = [t["share"] for t in prof["top"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    by_shape = {(r["n_embd"], r["block_size"]): r["peak_memory_mb"] for r in sc["rows"]}
    assert by_shape[64, 16] > max(by_shape[32, 16], by_shape[32, 32])  # 3.6x the parameters, same tokens per step


def test_scaling_markdown_table(sweep):
    results, md = sweep
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| sweep", "| ---"))]
    assert len(rows) == len(results["scaling"]["rows"]) == 3
    first = [c.strip() for c in rows[0].strip("|").split("|")]
    r = results["scaling"]["rows"][0]
    assert first[:5] == ["width+context", "32", "16", "4", "eager"]
    assert first[6] == f"{r['tokens_per_sec']:,.0f}" and first[8] == f"{100 * r['mfu_measured_peak']:.1f}%"
    assert "6N + 12 L d T" in md


def test_scaling_refuses_a_width_off_the_head_size(tmp_path):
    p = bench(*TINY_SWEEP, "--scaling-widths", "48", "--json", str(tmp_path / "x.json"))
    assert p.returncode != 0
    assert "width 48 is not a multiple of the head size 32" in p.stderr
    assert not (tmp_path / "x.json").exists()


def test_bench_imports_without_datasets():
    """bench.py's step mode (--no-data) and the training loop never need `datasets`: importing them must not load it,
    so that a device where `datasets` fails to import (a missing pyarrow, say) still gets its MFU bench."""
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('bench', 'scripts/bench.py')\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "import training.loop, training.stages.pretrain, data.sft, data.sources\n"
            "print(sorted(m for m in sys.modules if m == 'datasets' or m.startswith('datasets.')))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout[:500]


def test_scaling_refuses_two_precisions(tmp_path):
    """One sweep is one precision's table: a second precision would be dropped without a word, so it is refused."""
    p = bench(*TINY_SWEEP, "--precision", "fp32", "bf16", "--json", str(tmp_path / "x.json"))
    assert p.returncode != 0
    assert "--scaling measures one precision per run, not --precision fp32 bf16" in p.stderr
    assert not (tmp_path / "x.json").exists()


def test_scaling_profiles_the_rows_own_model(tmp_path):
    """A profiled row reuses the model it was timed on (under torch.compile a second model would compile again):
    one model per row, plus the one throw-away step before the sweep. Every row is profiled here (--profile-below 2)."""
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('bench', 'scripts/bench.py')\n"
            "bench = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(bench)\n"
            "built = []\n"
            "class CountedGPT(bench.GPT):\n"
            "    def __init__(self, cfg):\n"
            "        built.append((cfg.n_embd, cfg.block_size))\n"
            "        super().__init__(cfg)\n"
            "bench.GPT = CountedGPT\n"
            "bench.main(['--scaling', *sys.argv[1:]])\n"
            "print('built', built)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code, *TINY_SWEEP, "--profile-below", "2.0", "--json",
                        str(tmp_path / "s.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "s.json").read_text())["scaling"]["rows"]
    assert all(r["profile"] is not None for r in rows)
    built = p.stdout.strip().splitlines()[-1]
    assert built == "built [(32, 16), (32, 16), (64, 16), (32, 32)]", built


def test_a_stopped_bench_keeps_the_measurements_it_finished(tmp_path):
    """bench.py writes its JSON after each measurement (atomically), so a run stopped by a stage timeout
    (scripts/gpu_check.sh) keeps what it measured: stopped with SIGKILL while torch.compile works, after the eager
    step was printed, the file holds that step, with its two peak readings, and says the run is not complete."""
    import signal

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--preset", "tiny", "--device", "cpu", "--steps", "2",
           "--warmup", "1", "--batch-size", "2", "--model", "vocab_size=256", "--peak-n", "128", "--peak-seconds",
           "0.05", "--no-loop", "--no-data", "--json", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        for line in p.stdout:
            if line.startswith("step fp32 eager"):
                p.send_signal(signal.SIGKILL)  # torch.compile of the next measurement has only begun
                break
        p.wait(timeout=60)
    finally:
        p.kill()
        p.stdout.close()
    assert p.returncode == -signal.SIGKILL  # it was stopped, not finished
    results = json.loads(out.read_text())
    assert results["complete"] is False
    [step] = results["step"]
    assert (step["preset"], step["compile"], step["precision"]) == ("tiny", False, "fp32")
    assert step["tokens_per_sec"] > 0 and len(results["peak"]["fp32"]["readings_tflops"]) == 2
    assert not out.with_name(out.name + ".tmp").exists()
