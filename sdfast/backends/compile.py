"""The ``compile`` backend: ``torch.compile`` of the U-Net, the strongest PyTorch-native peer of ``triton``.

The same model as the triton backend gets (``triton.prepare_modules``: channels-last weights, fused self-attention QKV),
with torch's own ops at the seams (SDPA, ``F.group_norm``), handed to TorchInductor. ``mode="max-autotune"``
(the default) benchmarks Triton GEMM / conv templates and wraps the step in CUDA graphs, so the comparison with the
triton backend is like for like. Compilation happens on the first call per shape (minutes on a GPU with
max-autotune); ``dynamic=False`` because a pipeline runs few distinct shapes and each gets its own graph.
Only the U-Net is compiled: it runs every step, while the VAE and text encoder run once per image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .triton import prepare_modules


@dataclass(frozen=True)
class CompileOptions:
    """mode: torch.compile's mode for Inductor ("max-autotune": slowest compile, fastest step; "default": quick).
    compiler: torch.compile's backend ("inductor"; "eager" / "aot_eager" only trace, for tests and debugging).
    channels_last, fuse_qkv: as ``TritonOptions``."""

    mode: str = "max-autotune"
    compiler: str = "inductor"
    channels_last: bool = True
    fuse_qkv: bool = True


IN_PLACE = True  # compiles the torch modules, which load() builds on the target device


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on a GPU, as the triton backend it is compared with; fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def prepare(pipe, device: torch.device | None = None, **options):
    """The pipeline with a compiled U-Net (the modules are prepared in place); ``options`` are ``CompileOptions``
    fields. ``fullgraph=True``: a graph break in the U-Net is a bug to fix, not a silent slowdown."""
    names = [f.name for f in dataclasses.fields(CompileOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"the compile backend has no option(s) {unknown}; it takes {names}")
    opts = CompileOptions(**options)
    unet = prepare_modules(pipe.unet, channels_last=opts.channels_last, fuse_qkv=opts.fuse_qkv)
    mode = opts.mode if opts.compiler == "inductor" else None  # modes are Inductor's; other compilers refuse one

    def compiled(net: nn.Module) -> nn.Module:
        return torch.compile(net, mode=mode, backend=opts.compiler, fullgraph=True, dynamic=False)

    def control_step(net: nn.Module) -> nn.Module:
        return CompiledControlNet(compiled(prepare_modules(net, channels_last=opts.channels_last,
                                                           fuse_qkv=opts.fuse_qkv)))

    return dataclasses.replace(pipe, unet=CompiledUNet(compiled(unet), unet.config), control_step=control_step)


class CompiledUNet(nn.Module):
    """The compiled U-Net, returning a copy of its output: under ``max-autotune`` Inductor replays CUDA graphs whose
    output buffer the next call overwrites, while schedulers keep earlier outputs (PNDM's and DPM-Solver's history).
    The copy is one (B, 4, h, w) tensor per step."""

    def __init__(self, compiled: nn.Module, config):
        super().__init__()
        self.compiled, self.config = compiled, config

    @property
    def unet(self) -> nn.Module:
        """The prepared torch U-Net whose parameters the compiled graph reads as inputs (LoRA merges write them in
        place: no recompilation)."""
        return self.compiled._orig_mod

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **extra) -> torch.Tensor:
        return self.compiled(x, t, context, **extra).clone()


class CompiledControlNet(nn.Module):
    """A compiled ControlNet: the scale is applied outside the graph (a Python float inside would be a guard, so
    every new scale a recompilation), and its residuals are copies, as ``CompiledUNet``'s output."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled, self.config = compiled, compiled._orig_mod.config

    def forward(self, x, t, context, image, scale: float = 1.0, **added):
        down, mid = self.compiled(x, t, context, image, 1.0, **added)
        return [d * scale for d in down], mid * scale
