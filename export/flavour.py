"""Which TensorRT is installed and which GPUs its engines are for: the engine builder (``sdfast.export.tensorrt``)
and the ``tensorrt`` backend both ask here.

Works with either TensorRT flavour, found in this order (same Python API):
- ``tensorrt``: full TensorRT; building needs a CUDA GPU, and engines are specific to it.
- ``tensorrt_rtx`` / ``tensorrt_rtx_bindings`` (TensorRT-RTX; the PyPI wheels ``tensorrt-rtx-cu13-libs`` and
  ``-bindings`` install the latter): builds ahead of time on any machine, GPU or not, and compiles kernels for the
  GPU when the engine is loaded. It cannot target every GPU (1.7: not sm_90, the H100 / H200): on one of those,
  builds and loads are refused up front (``check_target``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from .errors import EngineError

FLAVOURS = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")  # preference order
HAS_TENSORRT = any(importlib.util.find_spec(name) is not None for name in FLAVOURS)
# TensorRT-RTX's compute capabilities (75: sm_75) for a module without a ComputeCapability enum to read them from
RTX_TARGETS = (75, 80, 86, 89, 120)


@functools.cache
def tensorrt():
    """The TensorRT Python module (the first flavour of FLAVOURS that imports), or a clear EngineError."""
    for name in FLAVOURS:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise EngineError("no TensorRT Python module is installed: pip install tensorrt-rtx-cu13-libs "
                      "tensorrt-rtx-cu13-bindings (TensorRT-RTX, builds without a GPU), or NVIDIA's tensorrt")


def flavour() -> dict[str, str]:
    """{"flavour": "tensorrt" | "tensorrt_rtx", "version": ...} of the module ``tensorrt()`` found."""
    trt = tensorrt()
    return {"flavour": "tensorrt" if trt.__name__ == "tensorrt" else "tensorrt_rtx", "version": trt.__version__}


def gpu() -> str:
    """The GPU(s) an engine is built for; engines are keyed by it. Full TensorRT tunes an engine for the GPU that
    builds it, and the engine runs only there. TensorRT-RTX builds a portable engine for its default targets (sm_80,
    sm_86, sm_89, sm_120 and later), GPU or not, and compiles it for the actual GPU when it loads, so an engine
    built on a CPU-only machine serves any of those GPUs and this machine's GPU is not part of its key."""
    if flavour()["flavour"] == "tensorrt_rtx":
        return "portable (TensorRT-RTX default targets)"
    if not torch.cuda.is_available():
        return "none"
    return device_name()


def device_name(device=None) -> str:
    """A CUDA GPU as keys and messages name it, e.g. ``NVIDIA H200 (sm_90)``."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def rtx_targets(trt) -> tuple[int, ...]:
    """The compute capabilities TensorRT-RTX module ``trt`` can compile for (89: sm_89): the SM members of its
    ComputeCapability enum, or RTX_TARGETS where it has none."""
    members = getattr(getattr(trt, "ComputeCapability", None), "__members__", {})
    return tuple(sorted(int(v) for name, v in members.items() if name[:2] == "SM" and name[2:].isdigit())) \
        or RTX_TARGETS


def check_target(device=None) -> None:
    """TensorRT-RTX compiles only for the GPUs of its ComputeCapability enum (1.7: no sm_90, so no H100 / H200), so
    its engines cannot run on any other: say so in one line, before an engine is built or loaded."""
    info = flavour()
    if info["flavour"] != "tensorrt_rtx" or not torch.cuda.is_available():
        return
    major, minor = torch.cuda.get_device_capability(device)
    targets = rtx_targets(tensorrt())
    if major * 10 + minor not in targets:
        raise EngineError(f"TensorRT-RTX {info['version']} cannot run engines on {device_name(device)}: its targets "
                          f"are {', '.join(f'sm_{t}' for t in targets)}; on this GPU use backend='triton', 'compile' "
                          "or 'onnxruntime' (onnxruntime-gpu), or NVIDIA's full `tensorrt` package (pip install "
                          "tensorrt; sdfast prefers it to TensorRT-RTX)")
