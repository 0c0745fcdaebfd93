"""Benchmark: device matmul peak, training-step throughput and MFU, and the data side, in one run.

    python scripts/bench.py --json bench.json                        # tiny preset, CPU fp32 (eager + compiled)
    python scripts/bench.py --preset gpt2 --device cuda --precision bf16 fp16 --json bench_gpu.json
    python scripts/bench.py --preset tiny --no-compile --no-loop --json quick.json

What it measures, on the device it is given:
  peak      dense matmul FLOP/s of the device for each precision (square matmuls in a timed loop), measured before
            and after each step measurement; MFU is taken against the mean of the two readings around it
  step      the training step of the preset (same functions as train.py's loop): tokens/s, model FLOPs/token
            (model/gpt.py's one definition) in both conventions -- 6N + 12 L d T (full attention, PaLM / nanoGPT;
            the "MFU" columns and train/mfu) and 6N + 6 L d T (causal, as the kernels compute it; "causal"
            columns) -- MFU against the measured peak and the vendor peak where known,
            the step split into forward / backward / optimizer, and peak memory (RSS on CPU,
            torch.cuda.max_memory_allocated on GPU); eager and torch.compile
  loop      the real train.py loop on the built-in corpus for a few steps (tokens/s from its metrics.jsonl), so
            any overhead of data loading, logging or syncs shows against the bare step
  data      tokenizer training time, tokenization MB/s of the built-in corpus, and the loader's batches/s
It prints a table and writes JSON. No test asserts on these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import GPT, GPTConfig  # noqa: E402
from training.config import TrainSection, stage_defaults  # noqa: E402
from training.hostmem import keep_freed_memory  # noqa: E402
from training.loop import accumulate_gradients, apply_update, clip_gradients, unscale_gradients  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.runinfo import environment_info, matmul_peak, vendor_peak  # noqa: E402
from training.stages.pretrain import LanguageModeling  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_step(preset: str, device: torch.device, precision: str, compile_: bool, batch_size: int, steps: int,
               warmup: int, overrides: dict, optimizer: str = "adamw") -> dict:
    """Time the training step: forward, backward, optimizer, each synchronised, then whole steps unsynchronised."""
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
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    count = objective.count(batch).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    for _ in range(warmup):  # includes compilation
        accumulate_gradients(model, objective, [batch], count, 1, autocast, scaler, "ddp")
        unscale_gradients(opt, scaler)
        clip_gradients(params, 1.0)
        apply_update(opt, scaler)
        opt.zero_grad(set_to_none=True)
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
        accumulate_gradients(model, objective, [batch], count, 1, autocast, scaler, "ddp")
        unscale_gradients(opt, scaler)
        clip_gradients(params, 1.0)
        apply_update(opt, scaler)
        opt.zero_grad(set_to_none=True)
    sync(device)
    step_s = (time.perf_counter() - a) / steps
    tokens = batch_size * cfg.block_size
    return {
        "preset": preset, "precision": precision, "compile": compile_, "batch_size": batch_size, "optimizer": optimizer,
        "block_size": cfg.block_size, "params": raw.num_params(), "flops_per_token": raw.flops_per_token(),
        "flops_per_token_causal": raw.flops_per_token(causal=True),
        "step_ms": 1000 * step_s, "tokens_per_sec": tokens / step_s,
        "achieved_tflops": raw.flops_per_token() * tokens / step_s / 1e12,
        "achieved_tflops_causal": raw.flops_per_token(causal=True) * tokens / step_s / 1e12,
        "forward_ms": 1000 * fwd / steps, "backward_ms": 1000 * bwd / steps, "optimizer_ms": 1000 * upd / steps,
        "warmup_s": warmup_s, "peak_memory_mb": peak_memory_mb(device),
    }


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
    from data import shards
    from data.sources import load_source
    from data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    ds = load_source("stdlib", "train")
    texts = ds["text"]
    load_s = time.perf_counter() - t0
    mb = sum(len(s.encode("utf-8")) for s in texts) / 1e6
    sample, used = [], 0
    for s in texts:  # the same 8 MB budget the trainer uses by default
        sample.append(s)
        used += len(s.encode("utf-8"))
        if used >= 8e6:
            break
    t0 = time.perf_counter()
    tok = train_tokenizer(sample, vocab_size)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok.encode_batch(texts)
    encode_s = time.perf_counter() - t0
    shard_dir = Path(cache) / "bench-shards"
    t0 = time.perf_counter()
    shards.prepare("stdlib", tok, shard_dir, "train", verbose=False, force=True)
    prepare_s = time.perf_counter() - t0
    loader = shards.TokenLoader(shards.shard_paths(shard_dir, "train")[0], 32, 256, seed=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        loader.next_batch()
        n += 1
    return {
        "corpus_mb": mb, "corpus_load_s": load_s, "tokenizer_train_mb": used / 1e6, "tokenizer_train_s": train_s,
        "encode_mb_per_s": mb / encode_s, "prepare_mb_per_s": mb / prepare_s,
        "loader_batches_per_s_32x256": n / (time.perf_counter() - t0), "threads": torch.get_num_threads(),
    }


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
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model overrides, e.g. n_layer=6")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    precisions = args.precision or (["bf16"] if device.type == "cuda" else ["fp32"])
    host_malloc_tuned = keep_freed_memory() if device.type == "cpu" else False  # as train.py does on CPU
    overrides = {}
    for kv in args.model:
        k, _, v = kv.partition("=")
        overrides[k] = type(getattr(GPTConfig(), k))(v) if not isinstance(getattr(GPTConfig(), k), bool) else \
            v.lower() in ("1", "true")
    batch_size = args.batch_size or (stage_defaults("pretrain")["train.batch_size"] if device.type == "cpu" else
                                     16 if args.preset in ("gpt2", "medium") else 32)
    cache = tempfile.mkdtemp(prefix="gptrain-bench-cache-")
    env = environment_info()
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "gpu": env["gpu"], "torch": env["packages"]["torch"], "python": env["python"],
                           "git_revision": env["git_revision"], "host_malloc_tuned": host_malloc_tuned},
               "peak": {}, "step": [], "loop": None, "data": None}

    for prec in precisions:
        dtype = DTYPES[prec]
        n = 8192 if device.type == "cuda" else 2048
        # The peak is measured before and after each step measurement: on a shared machine whose speed drifts, MFU
        # is taken against the mean of the two readings around it, and both are kept.
        measured = matmul_peak(device, dtype, n=n, seconds=2.0)
        readings = [measured]
        results["peak"][prec] = {"measured_tflops": measured / 1e12, "vendor_tflops": (vendor_peak(device, prec) or 0)
                                 / 1e12 or None, "matmul_n": n}
        for compile_ in [c for c, skip in ((False, args.no_eager), (True, args.no_compile)) if not skip]:
            r = bench_step(args.preset, device, prec, compile_, batch_size, args.steps, args.warmup, overrides,
                           args.optimizer)
            after = matmul_peak(device, dtype, n=n, seconds=2.0)
            r["peak_before_after_tflops"] = [readings[-1] / 1e12, after / 1e12]
            vp = vendor_peak(device, prec)
            for suffix in ("", "_causal"):  # 6N + 12LdT (train/mfu's convention), 6N + 6LdT
                r[f"mfu_measured_peak{suffix}"] = r[f"achieved_tflops{suffix}"] * 1e12 / ((readings[-1] + after) / 2)
                r[f"mfu_vendor_peak{suffix}"] = r[f"achieved_tflops{suffix}"] * 1e12 / vp if vp else None
            readings.append(after)
            results["step"].append(r)
            print(f"step {prec} {'compiled' if compile_ else 'eager':8s}: {r['tokens_per_sec']:,.0f} tok/s, "
                  f"{r['achieved_tflops'] * 1000:.1f} GFLOP/s, MFU {100 * r['mfu_measured_peak']:.1f}% of measured "
                  f"peak (6N + 12LdT; causal 6N + 6LdT: {100 * r['mfu_measured_peak_causal']:.1f}%)", flush=True)
        results["peak"][prec]["readings_tflops"] = [x / 1e12 for x in readings]
    if not args.no_loop:
        results["loop"] = bench_loop(args.preset, device, batch_size, max(4 * args.steps, 20), overrides, cache,
                                     args.optimizer)
    if not args.no_data:
        vocab = GPTConfig.from_preset(args.preset, **overrides).vocab_size
        results["data"] = bench_data(min(vocab, 65536), cache)

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
    if results["loop"]:
        print(f"train.py loop: {results['loop']['tokens_per_sec']:,.0f} tok/s")
    if results["data"]:
        d = results["data"]
        print(f"data: tokenizer training {d['tokenizer_train_s']:.1f}s on {d['tokenizer_train_mb']:.1f} MB, "
              f"encode {d['encode_mb_per_s']:.1f} MB/s, shard preparation {d['prepare_mb_per_s']:.1f} MB/s, "
              f"loader {d['loader_batches_per_s_32x256']:,.0f} batches/s (32x256)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
