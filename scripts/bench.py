"""Benchmark: device matmul peak, training-step throughput and MFU, and the data side, in one run.

    python scripts/bench.py --json bench.json                        # tiny preset, CPU fp32 (eager + compiled)
    python scripts/bench.py --preset gpt2 --device cuda --precision bf16 fp16 --json bench_gpu.json
    python scripts/bench.py --preset tiny --no-compile --no-loop --json quick.json
    python scripts/bench.py --prepare --no-eager --no-compile --no-loop --no-data --json prepare.json  # data at scale
    python scripts/bench.py --rl runs/sft --no-eager --no-compile --no-loop --no-data --json rl.json  # the RL step
    python scripts/bench.py --scaling --no-compile --json scaling.json   # how cost grows (+ scaling.md, the table)
    python scripts/bench.py --preset gpt2 --device cuda --no-eager --profile 3 --json g.json  # + top GPU kernels

What it measures, on the device it is given:
  peak      dense matmul FLOP/s of the device for each precision (square matmuls in a timed loop), measured before
            and after each step measurement; MFU is taken against the mean of the two readings around it
  step      the training step of the preset (same functions as train.py's loop): tokens/s, model FLOPs/token
            (model/gpt.py's one definition) in both conventions -- 6N + 12 L d T (full attention, PaLM / nanoGPT;
            the "MFU" columns and train/mfu) and 6N + 6 L d T (causal, as the kernels compute it; "causal"
            columns) -- MFU against the measured peak and the vendor peak where known,
            the step split into forward / backward / optimizer, and peak memory (RSS on CPU,
            torch.cuda.max_memory_allocated on GPU); eager and torch.compile; --profile N: the top kernels (GPU) or
            ops (CPU) by self time over N more steps under torch.profiler
  scaling   (--scaling, alone) how cost grows: training steps (forward, backward, optimizer; the device's default
            precision, eager and compiled unless --no-eager / --no-compile) of the tiny preset's architecture with
            4 layers, head size 32 and 2048 tokens per step (batch = 2048 / context) at widths 128/256/384/768
            (context 256) and contexts 256/512/1024 (width 256): tokens/s, model FLOP/s and MFU (6N + 12 L d T, as
            `step`) against the matmul peak read before and after each row (and the vendor peak where known), peak
            memory (GPU: torch.cuda.max_memory_allocated; CPU: the growth of the peak RSS over the row, VmHWM reset
            through /proc/self/clear_refs -- tracemalloc does not see torch's tensors), and for each row below
            --profile-below (0.5) of the measured peak the profiler's top kernels/ops. JSON, and a markdown table
            (--markdown, default beside --json). The --scaling-* options change the sweep (tests use tiny shapes)
  loop      the real train.py loop on the built-in corpus for a few steps (tokens/s from its metrics.jsonl), so
            any overhead of data loading, logging or syncs shows against the bare step
  data      tokenizer training time, tokenization MB/s of the built-in corpus, and the loader's batches/s
  prepare   (--prepare) on a JSONL corpus of ~115 MB (the stdlib's training files 12 times, each copy's lines
            rotated by another offset so documents differ; built once under --prepare-dir, as is its tokenizer:
            vocab 2048, trained on the first 8 MB; neither is timed): encode_batch_fast MB/s of every document with
            1 and 2 Rayon threads (a subprocess each, only the encode calls timed, batches of 1024 documents), and
            data.prepare.prepare MB/s with a pool of 1 and of 2 worker processes (timed from the first encoded
            batch's arrival to the return, over the bytes after that batch: start-up left out), each the fastest
            of --prepare-repeats interleaved readings (the machine's load average is recorded), the ratios
            prepare(2)/encode(2) (target >= 0.85) and speed-up(prepare)/speed-up(encode) (target >= 0.9), whether
            the shards are byte-identical, and the loader's tracemalloc peak over one epoch of a 3- and a 30-chunk
            corpus (2^22 tokens per chunk)
  rl        (--rl RUN_DIR: an SFT run) the RL stage's step, as train.py runs it with the stage defaults: seconds per
            step in generation (the KV-cache decoding of B x G completions), scoring (the rewards), reference (the
            frozen model's log-probs) and update (the policy's forward, backward and optimizer step), generated
            tokens/s, and the same completions decoded greedily without a KV cache (each token a forward over the
            whole sequence), against decoding with it: the speed-up the cache gives
It prints a table and writes JSON. No test asserts on these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import GPT, GPTConfig
from training import checkpoint
from training.config import TrainSection, stage_defaults
from training.hostmem import keep_freed_memory
from training.loop import accumulate_gradients, apply_update, clip_gradients, unscale_gradients
from training.optim import build_optimizer
from training.runinfo import environment_info, matmul_peak, vendor_peak
from training.stages.pretrain import LanguageModeling

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def profile_ops(step, device: torch.device, steps: int, top: int = 8) -> dict:
    """Where a step's time goes: ``steps`` calls of ``step`` under torch.profiler, and the ``top`` entries with the
    most self time -- on CUDA the GPU kernels (self device time), on CPU the aten ops (self CPU time) -- with their
    milliseconds per step and their share of the summed self time of all kernels (ops)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_s = time.perf_counter() - t0

    def self_us(e) -> float:  # microseconds over all profiled steps
        if cuda:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    # kernels only on CUDA: an aten op's device time is that of the kernels it launched, counted twice otherwise
    events = [e for e in prof.key_averages() if (e.device_type == DeviceType.CUDA) == cuda and self_us(e) > 0]
    total = sum(self_us(e) for e in events)
    events.sort(key=self_us, reverse=True)
    return {"steps": steps, "what": "GPU kernels, self device time" if cuda else "CPU ops, self CPU time",
            "wall_ms_per_step": 1000 * wall_s / steps, "self_ms_per_step": total / 1000 / steps,
            "top": [{"name": e.key[:160], "ms_per_step": self_us(e) / 1000 / steps, "share": self_us(e) / total,
                     "calls_per_step": e.count / steps} for e in events[:top]]}


# ---- how host memory is measured on CPU ----------------------------------------------------------------------
# tracemalloc sees only Python's allocations, not torch's tensors, and ru_maxrss is the process's peak since it
# started. Instead: give freed heap memory back to the kernel (glibc's malloc_trim, since train.py's malloc tuning
# keeps it), reset the kernel's peak-RSS mark (writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS),
# run the measurement, and report VmHWM minus the RSS before it: the resident memory the measurement added at its peak.
CPU_MEMORY_MEASURE = ("peak RSS growth: /proc/self/status VmHWM after the row minus VmRSS before it (heap trimmed "
                      "with malloc_trim, VmHWM reset through /proc/self/clear_refs)")
CUDA_MEMORY_MEASURE = "torch.cuda.max_memory_allocated (reset before the row; model, optimizer and activations)"


def proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])  # "VmHWM:   123456 kB"
    raise KeyError(key)


def reset_host_peak() -> int | None:
    """Trim the heap, reset VmHWM and return the RSS in kB it now starts from; None where /proc cannot do it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the RSS simply starts higher
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return proc_status_kb("VmRSS")
    except (OSError, KeyError):
        return None


def bench_step(preset: str, device: torch.device, precision: str, compile_: bool, batch_size: int, steps: int,
               warmup: int, overrides: dict, optimizer: str = "adamw", profile_steps: int = 0,
               keep_step: bool = False) -> dict:
    """Time the training step: forward, backward, optimizer, each synchronised, then whole steps unsynchronised;
    with profile_steps, then that many steps under torch.profiler (``profile_ops``: where the time goes).
    keep_step: the result's "step" is the step function itself (its model warm, compiled once), to profile later."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, **overrides)
    raw = GPT(cfg).to(device)
    model = torch.compile(raw) if compile_ else raw
    t = TrainSection(batch_size=batch_size, optimizer=optimizer)
    opt = build_optimizer(model, t, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = torch.autocast(device.type, dtype=DTYPES[precision]) if precision != "fp32" else nullcontext()
    objective = LanguageModeling()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size + 1), device=device)
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}  # as the loader gives them
    count = objective.count(batch).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:  # one whole step as the loop runs it
        accumulate_gradients(model, objective, [batch], count, 1, autocast, scaler, "ddp")
        unscale_gradients(opt, scaler)
        clip_gradients(params, 1.0)
        apply_update(opt, scaler)
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):  # includes compilation
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0

    # Split timing (synchronised after each part; adds a little overhead).
    fwd = bwd = upd = 0.0
    for _ in range(steps):
        sync(device)
        a = time.perf_counter()
        with autocast:
            loss_sum, _ = objective(model, batch)
            loss = loss_sum / count
        sync(device)
        b = time.perf_counter()
        scaler.scale(loss).backward()
        sync(device)
        c = time.perf_counter()
        unscale_gradients(opt, scaler)
        clip_gradients(params, 1.0)
        apply_update(opt, scaler)
        opt.zero_grad(set_to_none=True)
        sync(device)
        d = time.perf_counter()
        fwd, bwd, upd = fwd + b - a, bwd + c - b, upd + d - c

    # Whole steps as the loop runs them (one sync at the end).
    sync(device)
    a = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - a) / steps
    tokens = batch_size * cfg.block_size
    profile = profile_ops(step, device, profile_steps) if profile_steps else None
    return {
        "preset": preset, "precision": precision, "compile": compile_, "batch_size": batch_size, "optimizer": optimizer,
        "block_size": cfg.block_size, "params": raw.num_params(), "flops_per_token": raw.flops_per_token(),
        "flops_per_token_causal": raw.flops_per_token(causal=True),
        "step_ms": 1000 * step_s, "tokens_per_sec": tokens / step_s,
        "achieved_tflops": raw.flops_per_token() * tokens / step_s / 1e12,
        "achieved_tflops_causal": raw.flops_per_token(causal=True) * tokens / step_s / 1e12,
        "forward_ms": 1000 * fwd / steps, "backward_ms": 1000 * bwd / steps, "optimizer_ms": 1000 * upd / steps,
        "warmup_s": warmup_s, "peak_memory_mb": peak_memory_mb(device), "profile": profile,
        **({"step": step} if keep_step else {}),
    }


# ---- how cost grows (--scaling) -------------------------------------------------------------------------------
SCALING_WIDTHS = (128, 256, 384, 768)  # swept at context SCALING_AT_CONTEXT
SCALING_CONTEXTS = (256, 512, 1024)  # swept at width SCALING_AT_WIDTH
SCALING_AT_CONTEXT = SCALING_AT_WIDTH = 256
SCALING_LAYERS, SCALING_HEAD_SIZE, SCALING_TOKENS = 4, 32, 2048  # tokens per step: batch = tokens / context


def scaling_shapes(widths, contexts, at_width: int, at_context: int) -> list[dict]:
    """The sweep's (width, context) points in order, each once, with the sweeps it belongs to."""
    points: dict[tuple[int, int], list[str]] = {}
    for w in widths:
        points.setdefault((w, at_context), []).append("width")
    for c in contexts:
        points.setdefault((at_width, c), []).append("context")
    return [{"n_embd": w, "block_size": c, "sweeps": sweeps} for (w, c), sweeps in points.items()]


def check_scaling_shape(width: int, context: int, head_size: int, tokens: int) -> None:
    if width % head_size:
        raise ValueError(f"--scaling width {width} is not a multiple of the head size {head_size}")
    if tokens % context:
        raise ValueError(f"--scaling-tokens {tokens} is not a multiple of the context {context}")


def bench_scaling(args, device: torch.device, precision: str, modes: list[bool], overrides: dict) -> dict:
    """Training steps (forward, backward, optimizer) over the widths and contexts of the sweep: tokens/s, model
    FLOP/s, MFU against the matmul peak measured before and after each row, peak memory; rows below
    --profile-below of that peak get a profiler summary (``profile_ops``)."""
    shapes = scaling_shapes(args.scaling_widths, args.scaling_contexts, args.scaling_at_width, args.scaling_at_context)
    for shape in shapes:
        check_scaling_shape(shape["n_embd"], shape["block_size"], args.scaling_head_size, args.scaling_tokens)
    dtype, vp = DTYPES[precision], vendor_peak(device, precision)
    # one throw-away step first, so that one-time costs (libraries loading, thread pools) fall in no row's memory
    bench_step("tiny", device, precision, False, 1, 1, 0, scaling_model(args, shapes[0], overrides), args.optimizer)
    readings = [matmul_peak(device, dtype, n=args.peak_n, seconds=args.peak_seconds)]
    rows = []
    for shape in shapes:
        for compile_ in modes:
            row, step = scaling_row(args, device, precision, compile_, shape, overrides)
            readings.append(matmul_peak(device, dtype, n=args.peak_n, seconds=args.peak_seconds))
            peak = (readings[-2] + readings[-1]) / 2
            row.update(peak_before_after_flops=readings[-2:], peak_flops=peak,
                       mfu_measured_peak=row["achieved_flops"] / peak,
                       mfu_vendor_peak=row["achieved_flops"] / vp if vp else None)
            # the row's own model, warm (and compiled once): a fresh one would compile again
            row["profile"] = (profile_ops(step, device, args.profile_steps)
                              if row["mfu_measured_peak"] < args.profile_below else None)
            del step  # the next row's memory is measured from here: this model freed first
            rows.append(row)
            print(f"scaling: width {row['n_embd']:4d} context {row['block_size']:5d} "
                  f"{'compiled' if compile_ else 'eager'}: {row['tokens_per_sec']:,.0f} tok/s, "
                  f"{row['achieved_flops'] / 1e9:,.1f} GFLOP/s, MFU {100 * row['mfu_measured_peak']:.1f}% of measured "
                  f"peak, {row['peak_memory_mb']:,.0f} MB", flush=True)
    return {"precision": precision, "n_layer": args.scaling_layers, "head_size": args.scaling_head_size,
            "tokens_per_step": args.scaling_tokens, "steps": args.scaling_steps, "warmup": args.scaling_warmup,
            "optimizer": args.optimizer, "matmul_n": args.peak_n, "peak_readings_flops": readings,
            "vendor_peak_flops": vp, "profile_below": args.profile_below,
            "flop_convention": "6N + 12 L d T per token (model/gpt.py flops_per_token: full attention, the PaLM / "
                               "nanoGPT convention, as train/mfu); N = the matmul weights, embedding lookups excluded",
            "memory_measure": CUDA_MEMORY_MEASURE if device.type == "cuda" else CPU_MEMORY_MEASURE, "rows": rows}


def scaling_model(args, shape: dict, overrides: dict) -> dict:
    return {**overrides, "n_layer": args.scaling_layers, "n_embd": shape["n_embd"],
            "n_head": shape["n_embd"] // args.scaling_head_size, "block_size": shape["block_size"]}


def scaling_row(args, device: torch.device, precision: str, compile_: bool, shape: dict,
                overrides: dict) -> tuple[dict, object]:
    """One point of the sweep: bench_step on the tiny preset's architecture at this shape, its memory measured;
    returns the row and its step function (for the profiler)."""
    start_kb = reset_host_peak() if device.type == "cpu" else None
    r = bench_step("tiny", device, precision, compile_, args.scaling_tokens // shape["block_size"],
                   args.scaling_steps, args.scaling_warmup, scaling_model(args, shape, overrides), args.optimizer,
                   keep_step=True)
    step = r.pop("step")
    if device.type == "cpu":
        r["peak_memory_mb"] = (proc_status_kb("VmHWM") - start_kb) / 1024 if start_kb is not None else None
    r.update(sweeps=shape["sweeps"], n_embd=shape["n_embd"], n_layer=args.scaling_layers,
             n_head=shape["n_embd"] // args.scaling_head_size, tokens_per_step=r["batch_size"] * r["block_size"],
             achieved_flops=r["flops_per_token"] * r["tokens_per_sec"],
             achieved_flops_causal=r["flops_per_token_causal"] * r["tokens_per_sec"])
    return r, step


def scaling_markdown(results: dict) -> str:
    """The sweep as a markdown table, with the machine, precision, FLOP convention and peak above it."""
    sc, m = results["scaling"], results["machine"]
    peak = ", ".join(f"{x / 1e9:,.0f}" for x in sc["peak_readings_flops"])
    vendor = f"; vendor peak {sc['vendor_peak_flops'] / 1e12:.0f} TFLOP/s" if sc["vendor_peak_flops"] else ""
    lines = [f"Machine: {m['gpu'] or m['processor'] or platform.machine()}, {m['cpu_count']} cores, "
             f"{m['torch_threads']} torch threads, torch {m['torch']}. {sc['precision']}, {sc['n_layer']} layers, "
             f"head size {sc['head_size']}, {sc['tokens_per_step']} tokens per step (batch = tokens / context), "
             f"{sc['optimizer']}, {sc['steps']} timed steps after {sc['warmup']} warm-up.",
             f"FLOPs: {sc['flop_convention']}. Matmul peak ({sc['matmul_n']}^3, before and after each row): {peak} "
             f"GFLOP/s{vendor}. Memory: {sc['memory_measure']}.", "",
             "| sweep | width | context | batch | mode | params | tok/s | GFLOP/s | MFU (measured peak) | MFU (vendor) "
             "| peak MB | where the time goes (top 3, self time) |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sc["rows"]:
        top = "; ".join(f"{t['name'][:40]} {100 * t['share']:.0f}%" for t in r["profile"]["top"][:3]) \
            if r["profile"] else ""
        vendor = f"{100 * r['mfu_vendor_peak']:.1f}%" if r["mfu_vendor_peak"] else "-"
        mem = f"{r['peak_memory_mb']:,.0f}" if r["peak_memory_mb"] is not None else "-"
        lines.append(f"| {'+'.join(r['sweeps'])} | {r['n_embd']} | {r['block_size']} | {r['batch_size']} | "
                     f"{'compiled' if r['compile'] else 'eager'} | {r['params'] / 1e6:.2f}M | "
                     f"{r['tokens_per_sec']:,.0f} | {r['achieved_flops'] / 1e9:,.1f} | "
                     f"{100 * r['mfu_measured_peak']:.1f}% | {vendor} | {mem} | {top} |")
    return "\n".join(lines) + "\n"


def bench_loop(preset: str, device: torch.device, batch_size: int, steps: int, overrides: dict, cache: str,
               optimizer: str = "adamw") -> dict:
    """The real train.py loop (data loading, logging, syncs) for `steps` steps; tokens/s of its last log window."""
    from train import main

    out = Path(tempfile.mkdtemp(prefix="gptrain-bench-")) / "run"
    args = ["--out", str(out), f"--model.preset={preset}", f"--train.batch_size={batch_size}",
            f"--train.optimizer={optimizer}",
            f"--train.max_steps={steps}", f"--log.interval={steps // 2}", "--eval.interval=0",
            "--log.health_interval=0", "--log.hist_interval=0", "--eval.sample_tokens=1", f"--train.device={device.type}",
            f"--data.cache_dir={cache}", "--ckpt.interval=100000"]
    args += [f"--model.{k}={v}" for k, v in overrides.items()]
    main(args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/tokens_per_sec" in r][-1]
    return {"tokens_per_sec": last["train/tokens_per_sec"], "mfu_vs_loop_peak": last["train/mfu"], "steps": steps}


def bench_data(vocab_size: int, cache: str) -> dict:
    """Tokenizer training on the built-in corpus, tokenization MB/s, loader batches/s."""
    from data.prepare import prepare
    from data.shards import TokenLoader, open_prepared
    from data.sources import iter_texts, read_passes, tokenizer_texts
    from data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    texts = [t for batch in iter_texts(read_passes("stdlib", splits=("train",))[0]) for t in batch if t]
    load_s = time.perf_counter() - t0
    mb = sum(len(s.encode("utf-8")) for s in texts) / 1e6
    sample = tokenizer_texts("stdlib", "text", 8_000_000)  # the trainer's default 8 MB budget and rule
    t0 = time.perf_counter()
    tok = train_tokenizer(sample, vocab_size)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok.encode_batch(texts)
    encode_s = time.perf_counter() - t0
    shard_dir = Path(cache) / "bench-shards"
    t0 = time.perf_counter()
    prepare("stdlib", tok, shard_dir, splits=("train",), verbose=False, overwrite=True)
    prepare_s = time.perf_counter() - t0
    loader = TokenLoader(open_prepared(shard_dir).chunks("train"), 32, 256, seed=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        loader.next_batch()
        n += 1
    return {
        "corpus_mb": mb, "corpus_load_s": load_s, "tokenizer_train_mb": sum(len(s.encode()) for s in sample) / 1e6,
        "tokenizer_train_s": train_s, "encode_mb_per_s": mb / encode_s, "prepare_mb_per_s": mb / prepare_s,
        "loader_batches_per_s_32x256": n / (time.perf_counter() - t0), "threads": torch.get_num_threads(),
    }


# ---- preparation at scale (--prepare) ------------------------------------------------------------------------
PREP_REPEATS = 12  # copies of the stdlib's training files (~9.6 MB on CPython 3.11): ~115 MB of JSONL
PREP_FILES = 8  # JSONL files the copies are spread over
PREP_VOCAB = 2048  # the tiny preset's vocabulary
ENCODE_BATCH_DOCS = 1024  # documents per encode_batch_fast call of the baseline

# Run in a fresh interpreter per thread count: RAYON_NUM_THREADS fixes the size of the tokenizer's thread pool when
# the library first uses it. Prints {"seconds", "bytes", "tokens"} of the encode calls alone (reading the JSONL and
# loading the tokenizer excluded).
ENCODE_PROBE = """
import json, sys, time
from pathlib import Path
import tokenizers
folder, tokenizer_json, batch_docs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
texts = [json.loads(line)["text"] for f in sorted(folder.glob("*.jsonl")) for line in open(f, encoding="utf-8")]
tok = tokenizers.Tokenizer.from_file(tokenizer_json)
seconds = tokens = 0
for i in range(0, len(texts), batch_docs):
    t0 = time.perf_counter()
    out = tok.encode_batch_fast(texts[i:i + batch_docs], add_special_tokens=False)
    seconds += time.perf_counter() - t0
    tokens += sum(len(e.ids) for e in out)
print(json.dumps({"seconds": seconds, "bytes": sum(len(t.encode()) for t in texts), "tokens": tokens}))
"""


def rotated(text: str, copy: int, copies: int) -> str:
    """``text`` with its lines rotated by copy/copies of their number (copy 0: the text itself)."""
    lines = text.splitlines(keepends=True)
    k = len(lines) * copy // copies
    return "".join(lines[k:] + lines[:k])


def bench_corpus(root: Path, copies: int = PREP_REPEATS) -> Path:
    """A JSONL folder of ``copies`` copies of the stdlib's training files, each copy's lines rotated by another
    offset, so that documents differ (and each falls on its own side of the validation hash). Built once under
    ``root`` and reused (written to a temporary folder, renamed into place when complete)."""
    from data.sources import stdlib_files

    folder = root / f"stdlib-x{copies}-py{sys.version_info.major}.{sys.version_info.minor}"
    if folder.is_dir():
        return folder
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files("train")]
    tmp = Path(tempfile.mkdtemp(prefix=".corpus-", dir=root))
    files = [open(tmp / f"part-{i:02d}.jsonl", "w", encoding="utf-8") for i in range(PREP_FILES)]
    for copy in range(copies):
        for i, text in enumerate(texts):
            files[(copy * len(texts) + i) % PREP_FILES].write(json.dumps({"text": rotated(text, copy, copies)}) + "\n")
    for f in files:
        f.close()
    tmp.rename(folder)
    return folder


def bench_tokenizer(corpus: Path) -> tuple[Path, float]:
    """The tiny preset's tokenizer trained by the trainer's rule (the first 8 MB of the stream), cached beside the
    corpus; and the seconds it took (0 when reused)."""
    from data.sources import tokenizer_texts
    from data.tokenizer import train_tokenizer

    path = corpus.with_name(corpus.name + f"-tokenizer-{PREP_VOCAB}.json")
    if path.exists():
        return path, 0.0
    t0 = time.perf_counter()
    train_tokenizer(tokenizer_texts(str(corpus), "text", 8_000_000), PREP_VOCAB).save(path)
    return path, time.perf_counter() - t0


def encode_speed(corpus: Path, tokenizer: Path, threads: int) -> dict:
    """encode_batch_fast alone on every document of the corpus, in a subprocess with ``threads`` Rayon threads."""
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", ENCODE_PROBE, str(corpus), str(tokenizer), str(ENCODE_BATCH_DOCS)],
                         env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    return {**r, "mb_per_s": r["bytes"] / 1e6 / r["seconds"]}


def prepare_speed(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    """data.prepare.prepare with a pool of ``workers`` processes. Timed: from the moment the first encoded batch
    reaches the writer to prepare's return (the rest of the reading, tokenizing, writing, the final renames and
    manifest), over the bytes of every batch but the first: the pool's start, the opening of the stream and the
    first batch's latency are left out. The whole call is reported too (``wall_s``)."""
    import data.prepare as prep
    from data.tokenizer import Tokenizer

    shutil.rmtree(out, ignore_errors=True)  # a fresh preparation, never a reuse or a resume
    tok = Tokenizer.load(tokenizer)
    first: dict = {}
    update = prep._Progress.update

    def timed_update(self, enc):  # the first batch's arrival: the start of the timed part
        if not first:
            first.update(t=time.perf_counter(), bytes=int(enc.doc_bytes.sum()))
        update(self, enc)

    prep._Progress.update = timed_update
    try:
        t0 = time.perf_counter()
        manifest = prep.prepare(str(corpus), tok, out, workers=workers, in_process=False, verbose=False,
                                overwrite=True)
        t1 = time.perf_counter()
    finally:
        prep._Progress.update = update
    total = sum(v["bytes"] for v in manifest["splits"].values())
    return {"workers": workers, "wall_s": t1 - t0, "timed_s": t1 - first["t"], "bytes": total,
            "tokens": sum(v["tokens"] for v in manifest["splits"].values()),
            "mb_per_s": (total - first["bytes"]) / 1e6 / (t1 - first["t"]), "files_sha256": shard_digest(out, manifest)}


def shard_digest(out: Path, manifest: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for v in manifest["splits"].values():
        for c in v["chunks"]:
            h.update((out / c["file"]).read_bytes())
    return h.hexdigest()


def loader_memory(root: Path, n_chunks: int, chunk_tokens: int = 2**22, batch_size: int = 32,
                  block_size: int = 256) -> dict:
    """tracemalloc peak of building a TokenLoader over ``n_chunks`` chunks of ``chunk_tokens`` uint16 ids and
    drawing one whole epoch of batches. The chunk files are sparse (zeros, no disk): what the loader allocates does
    not depend on the ids, and memory-mapped pages are not Python allocations."""
    import tracemalloc

    from data.shards import Chunk, TokenLoader

    root.mkdir(parents=True, exist_ok=True)
    chunks = []
    for i in range(n_chunks):
        path = root / f"train-{i:05d}.bin"
        with open(path, "wb") as f:
            f.truncate(2 * chunk_tokens)
        chunks.append(Chunk(path, chunk_tokens, "uint16"))
    tracemalloc.start()
    loader = TokenLoader(chunks, batch_size, block_size, seed=0)
    for _ in range(loader.steps_per_epoch):
        loader.next_batch()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"chunks": n_chunks, "chunk_tokens": chunk_tokens, "tokens": n_chunks * chunk_tokens,
            "blocks": loader.n_blocks, "steps": loader.steps_per_epoch, "tracemalloc_peak_mb": peak / 2**20,
            "one_permutation_over_all_blocks_mb": 8 * loader.n_blocks / 2**20}


def best_of(runs: list[dict]) -> dict:
    """The fastest of repeated readings (on a shared machine the others lost time to other processes), with every
    reading's MB/s kept beside it."""
    return {**max(runs, key=lambda r: r["mb_per_s"]), "all_mb_per_s": [r["mb_per_s"] for r in runs]}


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def bench_prepare(root: Path, repeats: int) -> dict:
    """Preparation MB/s beside encode_batch_fast MB/s on the same text and tokenizer, 1 and 2 workers/threads, each
    the best of ``repeats`` interleaved readings; the loader's memory for a corpus of 3 chunks and one of 30."""
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = bench_corpus(root)
    corpus_s = time.perf_counter() - t0
    tokenizer, tokenizer_s = bench_tokenizer(corpus)
    runs: dict = {("encode", n): [] for n in (1, 2)} | {("prepare", n): [] for n in (1, 2)}
    loads = [load_average()]
    for _ in range(repeats):
        for n in (1, 2):
            runs["encode", n].append(encode_speed(corpus, tokenizer, n))
        for n in (1, 2):
            runs["prepare", n].append(prepare_speed(corpus, tokenizer, root / f"prepared-{n}", n))
            shutil.rmtree(root / f"prepared-{n}")
        loads.append(load_average())
    encode = {n: best_of(runs["encode", n]) for n in (1, 2)}
    prep = {n: best_of(runs["prepare", n]) for n in (1, 2)}
    digests = {r["files_sha256"] for n in (1, 2) for r in runs["prepare", n]}
    memory = [loader_memory(root / f"loader-{n}", n) for n in (3, 30)]
    for n in (3, 30):
        shutil.rmtree(root / f"loader-{n}")
    speedup_prepare = prep[2]["mb_per_s"] / prep[1]["mb_per_s"]
    speedup_encode = encode[2]["mb_per_s"] / encode[1]["mb_per_s"]
    return {
        "corpus": str(corpus), "corpus_mb": encode[1]["bytes"] / 1e6, "corpus_build_s": corpus_s,
        "tokenizer_train_s": tokenizer_s, "vocab_size": PREP_VOCAB, "repeats": repeats,
        "load_average_1min": loads, "encode": {str(n): r for n, r in encode.items()},
        "prepare": {str(n): r for n, r in prep.items()}, "identical_1_vs_2_workers": len(digests) == 1,
        "prepare_vs_encode_2": prep[2]["mb_per_s"] / encode[2]["mb_per_s"],
        "speedup_prepare_1_to_2": speedup_prepare, "speedup_encode_1_to_2": speedup_encode,
        "speedup_ratio": speedup_prepare / speedup_encode, "loader_memory": memory,
    }


def print_prepare(r: dict) -> None:
    loads = ", ".join(f"{x:.2f}" for x in r["load_average_1min"] if x is not None)
    print(f"preparation: {r['corpus_mb']:.0f} MB of JSONL ({r['corpus']}), vocab {r['vocab_size']}, best of "
          f"{r['repeats']} readings (1-minute load average before and after each round: {loads})")
    print(f"{'':28s} {'1 worker/thread':>16s} {'2 workers/threads':>18s} {'speed-up':>9s}")
    for name, rows in (("encode_batch_fast MB/s", r["encode"]), ("prepare MB/s (timed part)", r["prepare"])):
        a, b = rows["1"]["mb_per_s"], rows["2"]["mb_per_s"]
        print(f"{name:28s} {a:16.2f} {b:18.2f} {b / a:9.2f}")
    walls = [r["prepare"][n]["wall_s"] for n in ("1", "2")]
    print(f"{'prepare wall s (whole call)':28s} {walls[0]:16.1f} {walls[1]:18.1f}")
    print(f"prepare(2) / encode(2) = {r['prepare_vs_encode_2']:.3f} (target >= 0.85); speed-up prepare / encode = "
          f"{r['speedup_ratio']:.3f} (target >= 0.9); shards identical for 1 and 2 workers: "
          f"{r['identical_1_vs_2_workers']}")
    for m in r["loader_memory"]:
        print(f"loader, {m['chunks']:3d} chunks x {m['chunk_tokens']:,} tokens ({m['blocks']:,} blocks, one epoch of "
              f"{m['steps']:,} batches of 32x256): tracemalloc peak {m['tracemalloc_peak_mb']:.2f} MB (one int64 "
              f"permutation over all blocks would be {m['one_permutation_over_all_blocks_mb']:.1f} MB)")


def decode_without_cache(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, steps: int) -> None:
    """Greedy decoding that recomputes the whole sequence for every new token (the cost a KV cache avoids)."""
    for _ in range(steps):
        nxt = model(ids, positions=pos, pad_mask=mask)[:, -1].argmax(-1, keepdim=True)  # (N, 1)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt, dtype=torch.bool)], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)


def bench_rl(init_from: str, steps: int, device: torch.device) -> dict:
    """The RL step split into its parts (module docstring), over `steps` steps after one warm-up step."""
    from data.tokenizer import PAD_ID
    from model.generation import generate_rollouts, left_pad
    from training import distributed, loop
    from training.config import parse_args
    from training.faults import StopSignal

    steps = max(steps, 1)
    out = tempfile.mkdtemp(prefix="gptrain-bench-rl-")
    cfg = parse_args(["--stage", "rl", "--init-from", init_from, "--out", out,
                      "--train.device", device.type, "--eval.interval=0", "--log.tensorboard=false",
                      f"--train.max_steps={steps + 1}"])
    inputs = loop.prepare_inputs(cfg)
    run, state = loop.setup(cfg, distributed.init(cfg.dist, cfg.train.device), StopSignal(), inputs)
    stage, parts = run.stage, {"generation": 0.0, "scoring": 0.0, "reference": 0.0, "update": 0.0}
    for step in range(steps + 1):
        torch.manual_seed(step)
        before, tokens_before = dict(stage.timings), stage.generated_tokens
        batches, count = loop.step_batches(run, state)
        t0 = time.perf_counter()
        loop.train_step(run, state, batches, count)
        sync(device)
        if step == 0:  # warm-up
            continue
        parts["update"] += time.perf_counter() - t0
        for k in ("generation", "scoring", "reference"):
            parts[k] += stage.timings[k] - before[k]
        parts.setdefault("generated_tokens", 0)
        parts["generated_tokens"] += stage.generated_tokens - tokens_before
    # one micro-batch's prompts decoded greedily for max_new_tokens tokens, with and without the cache
    r = cfg.rl
    prompts = [p.ids for p in stage.train_prompts[: cfg.train.batch_size] for _ in range(r.num_generations)]
    timings = []
    for cached in (True, False):
        t0 = time.perf_counter()
        with torch.no_grad():
            if cached:
                generate_rollouts(run.raw, prompts, r.max_new_tokens, 0.0, torch.zeros(len(prompts), dtype=torch.long),
                                  -1, PAD_ID, fixed_length=True)  # no stop token: all max_new_tokens steps
            else:
                decode_without_cache(run.raw, *left_pad(prompts, PAD_ID, device), r.max_new_tokens)
        sync(device)
        timings.append(time.perf_counter() - t0)
    shutil.rmtree(out, ignore_errors=True)
    total = sum(parts[k] for k in ("generation", "scoring", "reference", "update"))
    return {"steps": steps, "seconds_per_step": {k: parts[k] / steps for k in ("generation", "scoring", "reference",
                                                                                "update")},
            "share": {k: parts[k] / total for k in ("generation", "scoring", "reference", "update")},
            "generated_tokens_per_sec": parts["generated_tokens"] / parts["generation"],
            "rows": len(prompts), "max_new_tokens": r.max_new_tokens,
            "decode_s_with_cache": timings[0], "decode_s_without_cache": timings[1],
            "cache_speedup": timings[1] / timings[0]}


def print_rl(r: dict) -> None:
    s, share = r["seconds_per_step"], r["share"]
    print(f"rl step ({r['steps']} steps): " + ", ".join(f"{k} {1000 * s[k]:.0f} ms ({100 * share[k]:.0f}%)"
                                                      for k in s)
          + f"; generated {r['generated_tokens_per_sec']:,.0f} tok/s")
    print(f"rl decoding of {r['rows']} rows x {r['max_new_tokens']} tokens: {r['decode_s_with_cache']:.2f}s with the "
          f"KV cache, {r['decode_s_without_cache']:.2f}s recomputing every prefix ({r['cache_speedup']:.1f}x)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", nargs="+", default=None, help="fp32 bf16 fp16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help=f"default: the default run's batch on CPU ({stage_defaults('pretrain')['train.batch_size']}),"
                         " 16 for gpt2/medium on GPU, else 32")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"),
                    help="adamw (fused), or muon as the default CPU run uses (its Newton-Schulz matmuls are not model "
                         "FLOPs, so they lower MFU)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager measurement")
    ap.add_argument("--no-loop", action="store_true", help="skip the train.py loop measurement")
    ap.add_argument("--no-data", action="store_true", help="skip the data-side measurements")
    ap.add_argument("--prepare", action="store_true",
                    help="also measure preparation at scale (minutes; see `prepare` above)")
    ap.add_argument("--prepare-dir", default=str(Path(tempfile.gettempdir()) / "gptrain-bench-prepare"),
                    help="where --prepare builds (once) and keeps its corpus and tokenizer")
    ap.add_argument("--prepare-repeats", type=int, default=3,
                    help="--prepare: readings of each measurement, interleaved; the fastest is reported")
    ap.add_argument("--rl", default=None, metavar="RUN_DIR", help="also measure the RL step split, from this SFT run")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model overrides, e.g. n_layer=6")
    ap.add_argument("--peak-n", type=int, default=None, help="size of the peak's square matmuls (8192 GPU, 2048 CPU)")
    ap.add_argument("--peak-seconds", type=float, default=2.0, help="seconds of each matmul peak reading")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after each step measurement, profile this many steps (torch.profiler): the top kernels/ops")
    ap.add_argument("--scaling", action="store_true",
                    help="only the sweep of `scaling` above (eager and compiled unless --no-eager / --no-compile)")
    ap.add_argument("--scaling-widths", type=int, nargs="+", default=list(SCALING_WIDTHS))
    ap.add_argument("--scaling-contexts", type=int, nargs="+", default=list(SCALING_CONTEXTS))
    ap.add_argument("--scaling-at-width", type=int, default=SCALING_AT_WIDTH, help="the width of the context sweep")
    ap.add_argument("--scaling-at-context", type=int, default=SCALING_AT_CONTEXT, help="the context of the width sweep")
    ap.add_argument("--scaling-layers", type=int, default=SCALING_LAYERS)
    ap.add_argument("--scaling-head-size", type=int, default=SCALING_HEAD_SIZE)
    ap.add_argument("--scaling-tokens", type=int, default=SCALING_TOKENS, help="tokens per step")
    ap.add_argument("--scaling-steps", type=int, default=10, help="timed steps per row (twice: split, then whole)")
    ap.add_argument("--scaling-warmup", type=int, default=2)
    ap.add_argument("--profile-below", type=float, default=0.5,
                    help="--scaling: profile the rows whose MFU is below this share of the measured matmul peak")
    ap.add_argument("--profile-steps", type=int, default=3, help="--scaling: steps of each row's profile")
    ap.add_argument("--markdown", default=None, help="--scaling: write the table here (default: the --json path, .md)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    precisions = args.precision or (["bf16"] if device.type == "cuda" else ["fp32"])
    if args.no_eager and args.no_compile:
        precisions = []  # no step to measure: no peak to measure it against
    host_malloc_tuned = keep_freed_memory() if device.type == "cpu" else False  # as train.py does on CPU
    overrides = {}
    for kv in args.model:
        k, _, v = kv.partition("=")
        overrides[k] = type(getattr(GPTConfig(), k))(v) if not isinstance(getattr(GPTConfig(), k), bool) else \
            v.lower() in ("1", "true")
    batch_size = args.batch_size or (stage_defaults("pretrain")["train.batch_size"] if device.type == "cpu" else
                                     16 if args.preset in ("gpt2", "medium") else 32)
    args.peak_n = args.peak_n or (8192 if device.type == "cuda" else 2048)
    env = environment_info()
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "gpu": env["gpu"], "torch": env["packages"]["torch"], "python": env["python"],
                           "git_revision": env["git_revision"], "host_malloc_tuned": host_malloc_tuned},
               "peak": {}, "step": [], "loop": None, "data": None, "prepare": None, "rl": None, "complete": False}
    if args.scaling:
        return run_scaling(args, device, precisions, overrides, results)
    cache = tempfile.mkdtemp(prefix="gptrain-bench-cache-")

    for prec in precisions:
        dtype = DTYPES[prec]
        n = args.peak_n
        # The peak is measured before and after each step measurement: on a shared machine whose speed drifts, MFU
        # is taken against the mean of the two readings around it, and both are kept.
        measured = matmul_peak(device, dtype, n=n, seconds=args.peak_seconds)
        readings = [measured]
        results["peak"][prec] = {"measured_tflops": measured / 1e12, "vendor_tflops": (vendor_peak(device, prec) or 0)
                                 / 1e12 or None, "matmul_n": n}
        for compile_ in [c for c, skip in ((False, args.no_eager), (True, args.no_compile)) if not skip]:
            r = bench_step(args.preset, device, prec, compile_, batch_size, args.steps, args.warmup, overrides,
                           args.optimizer, args.profile)
            after = matmul_peak(device, dtype, n=n, seconds=args.peak_seconds)
            r["peak_before_after_tflops"] = [readings[-1] / 1e12, after / 1e12]
            vp = vendor_peak(device, prec)
            for suffix in ("", "_causal"):  # 6N + 12LdT (train/mfu's convention), 6N + 6LdT
                r[f"mfu_measured_peak{suffix}"] = r[f"achieved_tflops{suffix}"] * 1e12 / ((readings[-1] + after) / 2)
                r[f"mfu_vendor_peak{suffix}"] = r[f"achieved_tflops{suffix}"] * 1e12 / vp if vp else None
            readings.append(after)
            results["step"].append(r)
            results["peak"][prec]["readings_tflops"] = [x / 1e12 for x in readings]
            save_partial(args.json, results)  # a stage killed by its timeout (gpu_check.sh) keeps what it measured
            print(f"step {prec} {'compiled' if compile_ else 'eager':8s}: {r['tokens_per_sec']:,.0f} tok/s, "
                  f"{r['achieved_tflops'] * 1000:.1f} GFLOP/s, MFU {100 * r['mfu_measured_peak']:.1f}% of measured "
                  f"peak (6N + 12LdT; causal 6N + 6LdT: {100 * r['mfu_measured_peak_causal']:.1f}%)", flush=True)
        results["peak"][prec]["readings_tflops"] = [x / 1e12 for x in readings]
    if not args.no_loop:
        results["loop"] = bench_loop(args.preset, device, batch_size, max(4 * args.steps, 20), overrides, cache,
                                     args.optimizer)
        save_partial(args.json, results)
    if not args.no_data:
        vocab = GPTConfig.from_preset(args.preset, **overrides).vocab_size
        results["data"] = bench_data(min(vocab, 65536), cache)
        save_partial(args.json, results)
    if args.prepare:
        results["prepare"] = bench_prepare(Path(args.prepare_dir), args.prepare_repeats)
        save_partial(args.json, results)
    if args.rl:
        results["rl"] = bench_rl(args.rl, args.steps, device)

    # ---- table
    print(f"\nmachine: {results['machine']['processor'] or platform.machine()}, {os.cpu_count()} cores, "
          f"gpu {results['machine']['gpu']}, torch {results['machine']['torch']}")
    for prec, p in results["peak"].items():
        vendor = f", vendor {p['vendor_tflops']:.0f}" if p["vendor_tflops"] else ""
        seen = ", ".join(f"{x * 1000:.1f}" for x in p["readings_tflops"])
        print(f"matmul peak {prec}: {seen} GFLOP/s measured (before, and after each step measurement){vendor}")
    print("MFU: model FLOPs 6N + 12LdT (full attention, the PaLM / nanoGPT convention, as train/mfu); causal: "
          "6N + 6LdT (as the kernels compute it)")
    print(f"{'preset':8s} {'prec':5s} {'mode':9s} {'tok/s':>10s} {'GFLOP/s':>9s} {'MFU(meas)':>9s} {'MFU(vend)':>9s} "
          f"{'causal(meas)':>12s} {'causal(vend)':>12s} {'fwd ms':>8s} {'bwd ms':>8s} {'opt ms':>8s} {'mem MB':>8s}")
    for r in results["step"]:
        mv, cv = (f"{100 * r[k]:.1f}%" if r[k] else "-" for k in ("mfu_vendor_peak", "mfu_vendor_peak_causal"))
        print(f"{r['preset']:8s} {r['precision']:5s} {'compiled' if r['compile'] else 'eager':9s} "
              f"{r['tokens_per_sec']:10,.0f} {r['achieved_tflops'] * 1000:9.1f} {100 * r['mfu_measured_peak']:8.1f}% "
              f"{mv:>9s} {100 * r['mfu_measured_peak_causal']:11.1f}% {cv:>12s} {r['forward_ms']:8.1f} "
              f"{r['backward_ms']:8.1f} {r['optimizer_ms']:8.1f} {r['peak_memory_mb']:8.0f}")
    for r in results["step"]:
        if r["profile"]:
            print(f"profile {r['precision']} {'compiled' if r['compile'] else 'eager'} ({r['profile']['what']}): "
                  + "; ".join(f"{t['name'][:60]} {100 * t['share']:.0f}%" for t in r["profile"]["top"][:5]))
    if results["loop"]:
        print(f"train.py loop: {results['loop']['tokens_per_sec']:,.0f} tok/s")
    if results["data"]:
        d = results["data"]
        print(f"data: tokenizer training {d['tokenizer_train_s']:.1f}s on {d['tokenizer_train_mb']:.1f} MB, "
              f"encode {d['encode_mb_per_s']:.1f} MB/s, shard preparation {d['prepare_mb_per_s']:.1f} MB/s, "
              f"loader {d['loader_batches_per_s_32x256']:,.0f} batches/s (32x256)")
    if results["prepare"]:
        print_prepare(results["prepare"])
    if results["rl"]:
        print_rl(results["rl"])
    if args.json:
        results["complete"] = True
        save_partial(args.json, results)
        print(f"wrote {args.json}")
    return results


def save_partial(path: str | None, results: dict) -> None:
    """Write the results so far to --json, atomically (a temporary file renamed into place): a run stopped part way
    leaves every measurement it finished and never a half-written file. "complete": true marks a finished run."""
    if path:
        checkpoint.atomic_write_bytes(Path(path), json.dumps(results, indent=2).encode())


def run_scaling(args, device: torch.device, precisions: list[str], overrides: dict, results: dict) -> dict:
    """--scaling: the sweep in the precision asked (default: the device's), printed and written."""
    if len(precisions) != 1:
        raise ValueError(f"--scaling measures one precision per run, not --precision {' '.join(precisions)}: run "
                         "the sweep once for each")
    modes = [c for c, skip in ((False, args.no_eager), (True, args.no_compile)) if not skip]
    if not modes:
        raise ValueError("--scaling with both --no-eager and --no-compile: no step to measure")
    for key in ("step", "loop", "data", "prepare", "rl", "peak", "complete"):
        del results[key]
    results["scaling"] = bench_scaling(args, device, precisions[0], modes, overrides)
    table = scaling_markdown(results)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    markdown = args.markdown or (str(Path(args.json).with_suffix(".md")) if args.json else None)
    if markdown:
        Path(markdown).write_text(table)
        print(f"wrote {markdown}")
    return results


if __name__ == "__main__":
    main()
