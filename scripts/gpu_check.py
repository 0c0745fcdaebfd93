"""The Python side of scripts/gpu_check.sh: the local corpus, each stage's JSON and the closing summary.

    python scripts/gpu_check.py corpus DIR --max-mb 6          # train.jsonl + val.jsonl from this Python's stdlib
    python scripts/gpu_check.py stamp FILE --stage NAME --rc 0 --seconds 12.3 --timeout 150
    python scripts/gpu_check.py run RUN_DIR FILE --stage NAME --rc 0 --seconds 40 --timeout 120
    python scripts/gpu_check.py checkpoint RUN_DIR    # prints the run's newest checkpoint; exit 1 when it has none
    python scripts/gpu_check.py summary OUT_DIR --mode gpu --seconds 250

Every stage's JSON carries a "gpu_check" entry: {stage, status (ok | failed | timeout | skipped), rc, seconds,
timeout_s}. `stamp` adds it to the JSON a stage wrote itself (bench.py, evaluate.py), or writes a JSON of that entry
alone when the stage wrote none (it failed, timed out or was skipped); `run` writes a training run's figures from
its metrics.jsonl. `summary` gathers the stages into gpu_check.json with the headline figures: gpt2 bf16 compiled
tokens/s and MFU against the vendor's 989 TFLOP/s and against the device's own measured matmul peak.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

# Each stage's file in $OUT, in the order the stages run (most important first). With gpu_check.json and the log
# that makes the 8 files the device tool brings back.
STAGE_FILES = {
    "bench_bf16_compiled": "01_bench_bf16_compiled.json",
    "bench_eager_bf16_fp16": "02_bench_eager.json",
    "pretrain": "03_pretrain.json",
    "sft": "04_sft.json",
    "dpo": "05_dpo.json",
    "evaluate": "06_evaluate.json",
}
SUMMARY_FILE, LOG_FILE = "gpu_check.json", "gpu_check.log"
MFU_TARGET = 0.45  # issue 16: gpt2 bf16 compiled, against the vendor's dense bf16 peak
VAL_EVERY = 20  # one standard-library module in 20 is validation text
STEP_FILE = re.compile(r"step_(\d+)\.pt")  # training/checkpoint.py's complete checkpoints (a .tmp never counts)
PACKAGES = ("torch", "numpy", "tokenizers", "datasets", "dill", "multiprocess", "pyarrow", "fsspec", "tensorboard")


def status_of(rc: int) -> str:
    """timeout(1) exits 124 when it stopped the command (137 when it had to kill it); -1: the stage did not run."""
    return {0: "ok", 124: "timeout", 137: "timeout", -1: "skipped"}.get(rc, "failed")


def read_json(path: Path) -> dict:
    """A stage's JSON, or {} where it wrote none or an unreadable one (a stage killed mid-write)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")  # never a half-written file where the next stage or the summary reads
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def stage_entry(args) -> dict:
    return {"stage": args.stage, "status": status_of(args.rc), "rc": args.rc, "seconds": args.seconds,
            "timeout_s": args.timeout}


# ---- corpus ---------------------------------------------------------------------------------------------------
def write_corpus(folder: Path, max_mb: float) -> dict:
    """train.jsonl and val.jsonl of {"text": ...} records, one per top-level module of this interpreter's standard
    library (every VAL_EVERY-th in sorted order for val), each split cut at max_mb of text: made here, nothing
    downloaded. (Not data.sources' `stdlib` split: that module imports `datasets`, seconds the smoke run can spare.)"""
    folder.mkdir(parents=True, exist_ok=True)
    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    counts = {}
    for split, paths in (("train", [m for i, m in enumerate(modules) if i % VAL_EVERY]),
                         ("val", modules[::VAL_EVERY])):
        docs = size = 0
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for path in paths:
                text = path.read_text(encoding="utf-8", errors="replace")
                if size and size + len(text.encode()) > max_mb * 1e6:
                    break
                f.write(json.dumps({"text": text}) + "\n")
                docs, size = docs + 1, size + len(text.encode())
        if not docs:
            raise ValueError(f"no standard-library modules for the {split} split of {folder}")
        counts[split] = {"docs": docs, "bytes": size}
    return counts


# ---- a training run's figures ----------------------------------------------------------------------------------
def run_figures(run: Path) -> dict:
    """From a run folder's metrics.jsonl: steps, first and last train loss, tokens/s and MFU of the last log window,
    the last validation row, and the checkpoints written."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if any(k.startswith("val/") for k in r)]
    env = read_json(run / "env.json")
    return {
        "run": str(run), "steps": train[-1]["step"] if train else 0,
        "train_loss_first": train[0]["train/loss"] if train else None,
        "train_loss_last": train[-1]["train/loss"] if train else None,
        "tokens_per_sec": train[-1].get("train/tokens_per_sec") if train else None,
        "mfu": train[-1].get("train/mfu") if train else None,
        "last_train": train[-1] if train else None, "last_val": val[-1] if val else None,
        "checkpoints": sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")),
        "gpu": env.get("gpu"), "packages": env.get("packages"),
    }


def newest_checkpoint(run: Path) -> Path | None:
    """The run's checkpoint of the highest step, as training/checkpoint.py's `latest` finds it (without importing
    torch: seconds on a small CPU), or None. A stage that timed out may have saved one: what follows can start."""
    folder = run / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.fullmatch(p.name)) and p.is_file()] \
        if folder.is_dir() else []
    return max(found)[1] if found else None


# ---- the summary -----------------------------------------------------------------------------------------------
def headline(stages: dict[str, dict]) -> dict:
    """The figures the README records: gpt2 bf16 compiled against both peaks, eager bf16 / fp16, the runs' ends."""
    out: dict = {}
    compiled = stages["bench_bf16_compiled"]
    steps = compiled.get("step") or []
    if steps:
        s, peak = steps[0], compiled["peak"]["bf16"]
        out["gpt2_bf16_compiled"] = {
            "tokens_per_sec": s["tokens_per_sec"], "batch_size": s["batch_size"], "block_size": s["block_size"],
            "compile": s["compile"], "precision": s["precision"], "achieved_tflops": s["achieved_tflops"],
            "mfu_vendor_peak": s["mfu_vendor_peak"], "mfu_measured_peak": s["mfu_measured_peak"],
            "flop_convention": "6N + 12 L d T per token (model/gpt.py flops_per_token; full attention, PaLM/nanoGPT)",
            "vendor_peak_tflops": peak["vendor_tflops"], "measured_matmul_peak_tflops": peak["readings_tflops"],
            "matmul_n": peak["matmul_n"], "mfu_target_vendor": MFU_TARGET,
            "target_met": s["mfu_vendor_peak"] >= MFU_TARGET if s["mfu_vendor_peak"] is not None else None,
            "profile_top": (s.get("profile") or {}).get("top", [])[:5],
        }
    out["eager"] = [{k: s[k] for k in ("precision", "tokens_per_sec", "mfu_vendor_peak", "mfu_measured_peak",
                                        "peak_memory_mb")} for s in stages["bench_eager_bf16_fp16"].get("step") or []]
    for name in ("pretrain", "sft", "dpo"):
        if "steps" in stages[name]:
            out[name] = {k: stages[name][k] for k in ("steps", "train_loss_first", "train_loss_last",
                                                      "tokens_per_sec", "mfu")}
    ev = stages["evaluate"]
    out["evaluate"] = {k: ev[k] for k in ("bits_per_byte", "accuracy", "preference_accuracy") if k in ev}
    return out


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_summary(out: Path, mode: str, seconds: float) -> dict:
    """gpu_check.json. Imports no torch (seconds on a small CPU): the GPU's name is the one bench.py recorded."""
    stages = {name: read_json(out / file) for name, file in STAGE_FILES.items()}
    machine = stages["bench_bf16_compiled"].get("machine") or stages["bench_eager_bf16_fp16"].get("machine") or {}
    summary = {
        "mode": mode, "seconds": seconds, "gpu": machine.get("gpu"), "python": sys.version.split()[0],
        "packages": package_versions(), "git_revision": git_revision(),
        "stages": [{"file": STAGE_FILES[name], **(data.get("gpu_check") or {"stage": name, "status": "missing"})}
                   for name, data in stages.items()],
        "headline": headline(stages),
    }
    write_json(out / SUMMARY_FILE, summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("folder", type=Path)
    c.add_argument("--max-mb", type=float, default=6.0, help="text per split at most")
    for name in ("stamp", "run"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("run_dir", type=Path)
        p.add_argument("file", type=Path)
        p.add_argument("--stage", required=True)
        p.add_argument("--rc", type=int, required=True)
        p.add_argument("--seconds", type=float, required=True)
        p.add_argument("--timeout", type=float, required=True)
    k = sub.add_parser("checkpoint")
    k.add_argument("run_dir", type=Path)
    s = sub.add_parser("summary")
    s.add_argument("out", type=Path)
    s.add_argument("--mode", required=True, choices=("gpu", "cpu-smoke"))
    s.add_argument("--seconds", type=float, required=True)
    args = ap.parse_args(argv)

    if args.cmd == "corpus":
        print(json.dumps(write_corpus(args.folder, args.max_mb)))
    elif args.cmd == "stamp":
        write_json(args.file, {**read_json(args.file), "gpu_check": stage_entry(args)})
    elif args.cmd == "run":
        write_json(args.file, {**run_figures(args.run_dir), "gpu_check": stage_entry(args)})
    elif args.cmd == "checkpoint":
        newest = newest_checkpoint(args.run_dir)
        if newest is None:
            sys.exit(f"gpu_check: {args.run_dir} holds no checkpoint ({args.run_dir / 'checkpoints' / 'step_*.pt'})")
        print(newest)
    else:
        summary = write_summary(args.out, args.mode, args.seconds)
        for st in summary["stages"]:
            print(f"{st['stage']:24s} {st['status']:8s} {st.get('seconds', 0):6.1f}s  {st['file']}")
        print(json.dumps(summary["headline"], indent=2))
        failed = [st["stage"] for st in summary["stages"] if st["status"] != "ok"]
        if failed:
            sys.exit(f"gpu_check: not ok: {', '.join(failed)}")


if __name__ == "__main__":
    main()
