"""Backends: model -> model steps that replace a pipeline's three networks, behind the same call signatures.

| backend | module | what runs | needs |
|---|---|---|---|
| ``torch`` | ``eager`` | the PyTorch modules as loaded (eager, SDPA): the reference the others are checked against | - |
| ``triton`` | ``triton`` | the torch modules with sdfast's Triton kernels at the seams, fused QKV, CUDA graphs | ``triton`` |
| ``compile`` | ``compile`` | the same prepared U-Net through ``torch.compile`` | - |
| ``onnxruntime`` | ``onnxruntime`` | the exported ONNX graphs on ONNX Runtime (CUDA provider, IO binding, CUDA graphs; or CPU) | ``sdfast[onnx]`` |
| ``tensorrt`` | ``tensorrt`` | TensorRT engines built from those graphs, on a CUDA GPU | ``tensorrt`` or TensorRT-RTX |

Every backend module has the same interface (``Backend``): ``IN_PLACE`` says whether it runs the torch modules
themselves (so ``load`` builds them on the target device) or graphs exported from a CPU copy; ``default_dtype``
is the dtype a checkpoint loads in when none is asked for; ``prepare(pipe, device, **options)`` returns the
pipeline with the backend's networks, checking its own options. The export backends (``exported.py``) also read a
folder written by ``sdfast export`` (``from_folder``). ``sdfast.load`` names no backend: it asks ``get(name)``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch

MODULES = {"torch": "eager", "triton": "triton", "compile": "compile", "onnxruntime": "onnxruntime",
           "tensorrt": "tensorrt"}
BACKENDS = tuple(MODULES)


class Backend(Protocol):
    """What ``sdfast.load`` needs of a backend module."""

    IN_PLACE: bool

    def default_dtype(self, device: torch.device) -> torch.dtype: ...

    def prepare(self, pipe, device: torch.device, **options): ...


def get(name: str) -> Backend | ModuleType:
    """The backend module called ``name``, or a one-line error listing them."""
    if not isinstance(name, str) or name not in MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{MODULES[name]}")


def control_options(name: str, controlnets: bool) -> dict:
    """``sdfast.load`` options for backend ``name`` when the pipeline will run ControlNets (``controlnets``): the
    export backends' ``controlnet=True`` (a checkpoint's export then holds the U-Net graph that takes their
    residuals); none for the backends that run torch modules."""
    return {"controlnet": True} if controlnets and not get(name).IN_PLACE else {}


def cache_dir() -> Path:
    """Where checkpoints exported on the fly are kept: ``$SDFAST_CACHE``, else ``~/.cache/sdfast``."""
    return Path(os.environ.get("SDFAST_CACHE") or "~/.cache/sdfast").expanduser()
