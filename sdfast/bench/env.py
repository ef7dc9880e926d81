"""Where a benchmark ran: the device, the software versions, and the device's peak throughput to measure against.

Numbers without their environment cannot be compared or reproduced, so every report carries this.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Peak:
    """A GPU's dense fp16 / bf16 tensor-core peak (fp32 accumulate, no structured sparsity) and where it is from."""

    match: str  # a substring of torch.cuda.get_device_name()
    tflops: float
    source: str


# Most specific names first. Datasheets print the sparse figure ("with sparsity"); dense is half of it.
PEAKS = (
    Peak("H100 PCIe", 756.5, "NVIDIA H100 Tensor Core GPU Architecture whitepaper: H100 PCIe, FP16 Tensor, dense"),
    Peak("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet: FP16 Tensor Core 1,671 TFLOPS with sparsity / 2"),
    Peak("H100", 989.4, "NVIDIA H100 Tensor Core GPU Architecture whitepaper: H100 SXM5, FP16 Tensor with FP32 "
                        "accumulate, dense (1,979 with sparsity)"),
    Peak("H200 NVL", 835.5, "NVIDIA H200 datasheet: H200 NVL, FP16 Tensor Core 1,671 TFLOPS with sparsity / 2"),
    Peak("H200", 989.4, "NVIDIA H200 datasheet: H200 SXM, FP16 Tensor Core 1,979 TFLOPS with sparsity / 2"),
    Peak("A100", 312.0, "NVIDIA A100 datasheet: FP16 / BF16 Tensor Core 312 TFLOPS, dense"),
    Peak("L40S", 362.05, "NVIDIA L40S datasheet: FP16 / BF16 Tensor Core 362.05 TFLOPS, dense"),
    Peak("L40", 181.05, "NVIDIA L40 datasheet: FP16 / BF16 Tensor Core 181.05 TFLOPS, dense"),
    Peak("L4", 121.0, "NVIDIA L4 datasheet: FP16 Tensor Core 242 TFLOPS with sparsity / 2"),
    Peak("RTX 4090", 165.2, "NVIDIA Ada GPU Architecture whitepaper: RTX 4090, FP16 Tensor with FP32 accumulate, "
                            "dense"),
)


def device_peak(gpu: str | None, dtype: torch.dtype) -> Peak | None:
    """The peak for ``gpu`` (a CUDA device name) at ``dtype``: fp16 / bf16 only (fp32 runs on other units), None
    for a CPU or a GPU the table does not know (add it to ``PEAKS``)."""
    if gpu is None or dtype not in (torch.float16, torch.bfloat16):
        return None
    return next((p for p in PEAKS if p.match in gpu), None)


# Distributions that provide each component, in order of preference: the version the run imported is the one
# installed under the first name found.
_PACKAGES = {
    "sdfast": ("sdfast",),
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton"),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-rtx-cu13-bindings",
                 "tensorrt-rtx-cu12-bindings"),
    "diffusers": ("diffusers",),
    "transformers": ("transformers",),
    "numpy": ("numpy",),
}


def _installed(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version if name == names[0] else f"{version} ({name})"
    return None


def _command(*args: str, cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=cwd, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """GPU, driver, CUDA, cuDNN, CPU, OS, Python and the versions of every package that can run in a benchmark
    (None where not installed), plus the sdfast source commit when running from a git checkout."""
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device": str(device),
        "gpu": props.name if cuda else None,
        "gpu_capability": f"sm_{props.major}{props.minor}" if cuda else None,
        "gpu_memory_gb": round(props.total_memory / 2**30, 1) if cuda else None,
        "driver": _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _installed(dists) for name, dists in _PACKAGES.items()},
        "git_commit": _command("git", "rev-parse", "--short", "HEAD", cwd=Path(__file__).parent),
    }


# -- the device's ceilings, measured: what a benchmark's rates are held to --


def _timed(device: torch.device, fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after three warm-ups: CUDA events on a GPU, the host clock
    after a synchronisation elsewhere."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int = 8192, repeat: int = 10) -> dict:
    """The matmul rate in ``dtype``: an n x n x n product on random data (zeros run faster than real data), median
    of ``repeat``. On a GPU, the tensor-core ceiling a U-Net's TFLOP/s is held to."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = _timed(device, lambda: a @ b, repeat)
    name = str(dtype).removeprefix("torch.")
    return {"tflops": float(f"{2 * n**3 / seconds / 1e12:.4g}"), "what": f"{n}x{n}x{n} {name} matmul, median of {repeat}"}


def measure_copy(device: torch.device, gib: float = 2.0, repeat: int = 10) -> dict:
    """Device memory bandwidth: a copy of ``gib`` GiB, counting the bytes read and the bytes written."""
    src = torch.randn(int(gib * 2**30) // 4, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(device, lambda: dst.copy_(src), repeat)
    return {"gb_per_s": float(f"{2 * src.numel() * 4 / seconds / 1e9:.4g}"),
            "what": f"{gib:g} GiB device copy (read + write), median of {repeat}"}


def clocks() -> dict | None:
    """The GPU's current and maximum SM and memory clocks (MHz) and its power limit, from nvidia-smi: a throttled
    or power-capped card explains a slow run. None without nvidia-smi."""
    fields = ("clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit", "temperature.gpu")
    line = _command("nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")
    if line is None:
        return None
    return dict(zip(fields, (v.strip() for v in line.split(","))))
