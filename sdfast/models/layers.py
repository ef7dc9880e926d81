"""The two seams every backend fills: attention and GroupNorm(+SiLU).

Model code never calls ``F.scaled_dot_product_attention`` or ``F.group_norm`` itself: it goes through the
``Attention`` core and ``GroupNorm`` modules below, whose ``kernel`` attribute is a plain function. A backend is a
model -> model step that sets ``kernel`` on those modules (see ``sdfast.backends``); nothing global is patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Multi-head attention over token-major tensors, the layout the projections produce.

    q: (B, N, H*D), k and v: (B, M, H*D) -> (B, N, H*D). ``upcast`` runs it in fp32 (SD 2.1-v's
    config asks for it: its fp16 attention logits can overflow). diffusers' SDPA processor ignores the flag and relies
    on the fused kernels' fp32 softmax; sdfast honours it, and a kernel put behind this seam must too (fp32 logits and
    softmax statistics), so exported graphs stay finite on runtimes whose fp16 softmax is not fused.
    """
    b, n, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q = q.view(b, n, heads, d).transpose(1, 2)  # (B, H, N, D)
    k = k.view(b, -1, heads, d).transpose(1, 2)  # (B, H, M, D)
    v = v.view(b, -1, heads, d).transpose(1, 2)  # (B, H, M, D)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, silu: bool,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm over (B, C, H, W), optionally followed by SiLU; the reference the fused kernels must equal.

    ``shift`` (B, C), when given, is added to x per image and channel before normalising: the ResNet block's
    time-embedding add, which a kernel can fuse into its reads instead of writing x + shift out first.
    """
    if shift is not None:
        x = x + shift[:, :, None, None]  # (B, C, H, W)
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


class GroupNorm(nn.Module):
    """GroupNorm with an optional fused SiLU (and a per-channel ``shift`` added first, see ``group_norm``).
    Parameter names match ``nn.GroupNorm`` (``weight``, ``bias``)."""

    def __init__(self, groups: int, channels: int, eps: float, silu: bool = False):
        super().__init__()
        self.groups, self.eps, self.silu = groups, eps, silu
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.kernel = group_norm

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel(x, self.weight, self.bias, self.groups, self.eps, self.silu, shift)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, channels={self.weight.shape[0]}, eps={self.eps}, silu={self.silu}"


class Attention(nn.Module):
    """Multi-head (cross-)attention with diffusers' parameter names: to_q, to_k, to_v, to_out.0.

    ``context`` None is self-attention. ``bias`` is the q/k/v projections' bias (the VAE has one, the U-Net not).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.kernel = attention

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = self.kernel(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast)
        return self.to_out[0](out)
