"""What a run records about where it ran, and the device's matmul peak (for MFU when the vendor peak is unknown)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

# Dense peak FLOP/s by GPU name and precision (vendor figures, without sparsity).
VENDOR_PEAKS = {
    ("H100", "bf16"): 989e12, ("H200", "bf16"): 989e12, ("A100", "bf16"): 312e12,
    ("H100", "fp16"): 989e12, ("H200", "fp16"): 989e12, ("A100", "fp16"): 312e12,
    ("H100", "fp32"): 67e12, ("H200", "fp32"): 67e12, ("A100", "fp32"): 19.5e12,
}


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info() -> dict:
    versions = {}
    for pkg in ("torch", "numpy", "tokenizers", "datasets", "tensorboard", "transformers", "safetensors"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_revision": git_revision(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "command": sys.argv,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def vendor_peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for (gpu, prec), peak in VENDOR_PEAKS.items():
        if gpu in name and prec == precision:
            return peak
    return None


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """Measured dense matmul FLOP/s: square n x n matmuls in a short timed loop (after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def measure_peak_flops(device: torch.device, precision: str) -> float:
    """The peak MFU is measured against: the vendor's dense figure on known GPUs, else a measured matmul peak."""
    peak = vendor_peak(device, precision)
    if peak is not None:
        return peak
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # a low-precision CPU matmul is emulated; MFU against fp32 keeps figures comparable
    return matmul_peak(device, dtype, n=2048 if device.type == "cpu" else 8192, seconds=0.3)
