"""The ``triton`` backend: sdfast's Triton kernels behind the model's seams, fused QKV projections, channels-last
weights and, on a GPU, one CUDA graph of the U-Net step per shape.

A model -> model step over a loaded torch pipeline (``sdfast.load(..., backend="triton")`` calls ``prepare``):
- every ``GroupNorm.kernel`` becomes ``sdfast.kernels.group_norm.group_norm`` (fp32 statistics, fused SiLU and
  time-embedding add);
- every ``Attention.kernel`` whose head dim the kernel takes (<= 256: all U-Net heads) becomes
  ``sdfast.kernels.attention.attention`` (the VAE's single 512-wide head stays on torch's SDPA);
- ``prepare_modules`` (shared with the ``compile`` backend) makes the conv weights channels-last and fuses self-attention's
  q / k / v projections into one GEMM;
- ``CudaGraphUNet`` replays the U-Net, with the step's ControlNets, from a CUDA graph captured per set of input
  shapes and ControlNets.
Each step is an option (``TritonOptions``): ``kernels=False`` keeps torch's ops at the seams, so a benchmark can
tell the kernels' share from the graphs'.
Nothing global is patched and no parameter is renamed: ``state_dict()`` keeps the checkpoint's keys.
On CPU the kernels only run in Triton's interpreter (``TRITON_INTERPRET=1``, for tests), without graphs.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import Attention, GroupNorm
from ..models.unet import TransformerBlock
from ..sampler import control_residuals


@dataclass(frozen=True)
class TritonOptions:
    """What the backend does, and what each step costs.

    channels_last: convs run NHWC, the tensor cores' layout; a one-time copy of the conv weights. The GroupNorm
        kernel reads either layout, and the transformer's (B, C, H, W) -> (B, HW, C) permute becomes a free view.
    fuse_qkv: self-attention's q / k / v projections run as one GEMM (one read of the tokens, one launch); the
        fused weight is a new tensor and to_q / to_k / to_v.weight become views of it, so no memory is added.
    cuda_graph: the U-Net step is replayed from a CUDA graph (about a thousand launches become one); each captured
        shape holds its own activations in GPU memory, and the first call per shape captures (a few U-Net runs).
    kernels: the Triton kernels behind the GroupNorm and attention seams; False keeps torch's ops there, so the
        other steps (channels-last, fused QKV, CUDA graphs) can be measured without them.
    autotune: "quick" tries a few configs per kernel and shape on the first call (the winners a GPU run saved in
        ``kernels/tuned/``, else a fallback guess); "full" tries every config: the best kernels, but minutes on
        the first call per shape.
    """

    channels_last: bool = True
    fuse_qkv: bool = True
    cuda_graph: bool = True
    kernels: bool = True
    autotune: str = "quick"


class FusedSelfAttention(Attention):
    """Self-attention whose projections are one (3*H*D, dim) GEMM. Built from a loaded ``Attention`` by ``fuse``:
    ``to_q`` / ``to_k`` / ``to_v`` keep their parameters, now views of ``qkv_weight`` (a non-persistent buffer),
    so the checkpoint's names and in-place weight updates (e.g. LoRA merges) still apply. Convert dtype or device
    before fusing: ``.to()`` afterwards would copy the views apart."""

    @classmethod
    def fuse(cls, attn: Attention) -> "FusedSelfAttention":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.heads, fused.upcast, fused.kernel = attn.heads, attn.upcast, attn.kernel
        fused.to_q, fused.to_k, fused.to_v, fused.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        projections = (attn.to_q, attn.to_k, attn.to_v)
        inner = attn.to_q.out_features
        weight = torch.cat([p.weight.detach() for p in projections])  # (3*H*D, dim)
        fused.register_buffer("qkv_weight", weight, persistent=False)
        for p, part in zip(projections, weight.split(inner)):
            p.weight = nn.Parameter(part, requires_grad=False)
        bias = None
        if attn.to_q.bias is not None:
            bias = torch.cat([p.bias.detach() for p in projections])  # (3*H*D,)
            for p, part in zip(projections, bias.split(inner)):
                p.bias = nn.Parameter(part, requires_grad=False)
        fused.register_buffer("qkv_bias", bias, persistent=False)
        return fused

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            raise ValueError("FusedSelfAttention is self-attention: it takes no context")
        inner = self.to_q.out_features
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # (B, N, 3*H*D)
        q, k, v = qkv.split(inner, dim=-1)  # 3 x (B, N, H*D) views, row stride 3*H*D: the kernel reads them in place
        return self.to_out[0](self.kernel(q, k, v, self.heads, self.upcast))


def prepare_modules(net: nn.Module, *, channels_last: bool, fuse_qkv: bool) -> nn.Module:
    """The model changes both GPU backends share (in place): channels-last conv weights, fused self-attention QKV
    (a ``TransformerBlock``'s ``attn1``, diffusers' self-attention slot)."""
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if fuse_qkv:
        for block in net.modules():
            if isinstance(block, TransformerBlock) and type(block.attn1) is Attention:
                block.attn1 = FusedSelfAttention.fuse(block.attn1)
    return net


def use_kernels(net: nn.Module, autotune: str = "quick") -> nn.Module:
    """Put the Triton kernels behind ``net``'s GroupNorm and Attention seams (in place), autotuned from the
    ``autotune`` list ("quick" or "full")."""
    from sdfast.kernels.attention import attention, supports
    from sdfast.kernels.group_norm import group_norm

    for module in net.modules():
        if isinstance(module, GroupNorm):
            module.kernel = functools.partial(group_norm, autotune=autotune)
        elif isinstance(module, Attention) and supports(module.to_q.out_features // module.heads):
            module.kernel = functools.partial(attention, autotune=autotune)
    return net


class CudaGraphUNet(nn.Module):
    """``unet(x, t, context, controls=(), **extra)`` replayed from CUDA graphs, one captured per set of input shapes
    and dtypes and of ControlNets (``extra``: the SDXL U-Net's ``text_embeds`` / ``time_ids``, or residuals a caller
    computed, ``down_residuals`` (a list) and ``mid_residual``; None ones are left out).

    ``controls`` (``sdfast.control.Active``: ControlNet, image, scale) run inside the U-Net's graph
    (``runs_controls``: the sampler hands them over rather than their residuals), so one replay runs a whole
    controlled step and no residual crosses the graph's edge. The image is an input like the latents; the scale is
    a 0-dim tensor the graph reads, so a new scale replays the same graph. The steps outside a control's window
    replay the graph without it. A ControlNet that is dropped, or converted by the backend after a call ran it as it
    was (``forget``), takes its graphs with it: they read its weights where they were.

    The graphs share one memory pool: calls are serialised and each output is copied out at once, so no graph reads
    another's memory, and each set of ControlNets costs its activations once, not once per graph.

    A call copies its inputs into the graph's static buffers, replays, and returns a copy of the static output (so
    the next call cannot overwrite a result still in use). ``t`` is kept as fp32 (B,), as the U-Net reads it.
    ``config`` and the wrapped ``unet`` stay reachable for the pipeline."""

    runs_controls = True

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        # key -> (graph, static input buffers by name, static scales, static output)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], list[torch.Tensor],
                                       torch.Tensor]] = {}
        self._pool = None  # the graphs' memory pool, made at the first capture
        self._watched: set[int] = set()  # ids of the ControlNets whose end drops their graphs

    @property
    def config(self):
        return self.unet.config

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, controls=(), **extra) -> torch.Tensor:
        if controls and ("down_residuals" in extra or "mid_residual" in extra):
            raise ValueError("give the U-Net either controls or residuals, not both")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        inputs = {"x": x, "t": t, "context": context}
        for name, value in extra.items():  # a residuals list: one static buffer per tensor
            if isinstance(value, (list, tuple)):
                inputs.update({f"{name}.{i}": v for i, v in enumerate(value)})
            elif value is not None:
                inputs[name] = value
        inputs.update({f"control.{i}": c.image for i, c in enumerate(controls)})
        nets = tuple(c.net for c in controls)
        key = (tuple(id(net) for net in nets), tuple((name, tuple(v.shape), v.dtype) for name, v in inputs.items()))
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs, nets)
        graph, static, scales, out = self.graphs[key]
        for name, buffer in static.items():
            buffer.copy_(inputs[name])
        for buffer, c in zip(scales, controls):
            buffer.fill_(c.scale)
        graph.replay()
        return out.clone()

    def _capture(self, inputs: dict[str, torch.Tensor], nets: tuple[nn.Module, ...]):
        static = {name: v.clone() for name, v in inputs.items()}
        static["t"] = static["t"].to(torch.float32)
        scales = [torch.ones((), device=static["x"].device) for _ in nets]
        images = [static[f"control.{i}"] for i in range(len(nets))]
        extra: dict[str, object] = {}
        for name, v in static.items():
            base, dot, _ = name.partition(".")
            if base == "control" or name in ("x", "t", "context"):
                continue
            if dot:  # down_residuals.0, .1, ...: the list again, in order
                extra.setdefault(base, []).append(v)
            else:
                extra[name] = v
        x, t, context = static["x"], static["t"], static["context"]

        def step() -> torch.Tensor:
            residuals = control_residuals(zip(nets, images, scales), x, t, context, extra)
            return self.unet(x, t, context, **extra, **residuals)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: autotuning, cuDNN plans, lazy allocations
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()  # (B, C, h, w), lives in the graphs' pool
        for net in nets:  # the graph reads the ControlNet's weights: it must not outlive them
            if id(net) not in self._watched:
                self._watched.add(id(net))
                weakref.finalize(net, _net_gone, weakref.ref(self), id(net)).atexit = False
        return graph, static, scales, out

    def forget(self, net: nn.Module) -> None:
        """Drop the graphs that run ``net`` (its weights are about to move: the backend converts it)."""
        self._drop(id(net))

    def _drop(self, net_id: int) -> None:
        for key in [key for key in list(self.graphs) if net_id in key[0]]:  # list(): a snapshot, whatever the thread
            del self.graphs[key]


def _net_gone(ref: weakref.ref, net_id: int) -> None:
    """Drop the graphs of a ControlNet that is gone (its id may be reused)."""
    owner = ref()
    if owner is not None:
        owner._watched.discard(net_id)
        owner._drop(net_id)


IN_PLACE = True  # converts the torch modules, which load() builds on the target device


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on a GPU (the kernels and tensor cores are built around it), fp32 elsewhere (the interpreter)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def prepare(pipe, device: torch.device | None = None, **options):
    """The pipeline with its U-Net and VAE on the Triton kernels (modules converted in place); ``options`` are
    ``TritonOptions`` fields. Needs a CUDA device, or the CPU under ``TRITON_INTERPRET=1`` (tests only: slow)."""
    from sdfast.kernels import interpreted, require, tuning

    require("the triton backend")
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TritonOptions)})
    if unknown:
        raise ValueError(f"the triton backend has no option(s) {unknown}; it takes "
                         f"{[f.name for f in dataclasses.fields(TritonOptions)]}")
    opts = TritonOptions(**options)
    tuning.check_mode(opts.autotune)
    if pipe.device.type != "cuda" and not interpreted():
        raise ValueError(f"the triton backend runs on a CUDA GPU, not {pipe.device}: load with device='cuda' "
                         "(on a CPU, TRITON_INTERPRET=1 runs its kernels in Triton's slow interpreter, for tests)")
    for net in (pipe.unet, pipe.vae):
        convert(net, opts)
    unet = CudaGraphUNet(pipe.unet) if opts.cuda_graph and pipe.device.type == "cuda" else pipe.unet

    def control_step(net: nn.Module) -> nn.Module:
        if isinstance(unet, CudaGraphUNet):  # a call may have run it unconverted: those graphs read its old weights
            unet.forget(net)
        return convert(net, opts)

    return dataclasses.replace(pipe, unet=unet, control_step=control_step)


def convert(net: nn.Module, opts: TritonOptions) -> nn.Module:
    """``net`` (a U-Net, VAE or ControlNet) with the backend's module changes and, unless ``opts.kernels`` is off,
    the Triton kernels at its seams (in place). A ControlNet runs inside the U-Net's CUDA graphs
    (``CudaGraphUNet``)."""
    prepare_modules(net, channels_last=opts.channels_last, fuse_qkv=opts.fuse_qkv)
    return use_kernels(net, opts.autotune) if opts.kernels else net
