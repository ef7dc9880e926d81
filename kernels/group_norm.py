"""GroupNorm with an optional fused SiLU, for NCHW and channels-last activations, fp16 / bf16 / fp32 in, and an
optional per-channel shift added first (the ResNet block's time embedding: GroupNorm(h + temb)).

Why a kernel: eager PyTorch runs the time-embedding add (a read and write of the whole activation), GroupNorm (one
pass for the statistics, one to normalise) and then SiLU (another read and write). Here the add happens as x is
loaded and the SiLU while normalising, so an activation is read twice and written once; the second read of a chunk
mostly hits L2.

How: each (batch, group) is a (C/G, H*W) region addressed through strides, which covers NCHW (positions
contiguous) and channels-last (channels contiguous) with one kernel and no layout copy. The positions are cut into
chunks so that a group is spread over many programs (B*G alone is 64 programs for SD at batch 2):
  1. ``_group_norm_stats_kernel``: per chunk, its mean and sum of squared deviations (two passes over the chunk,
     fp32), so a large mean cannot cancel the variance as E[x^2] - E[x]^2 would;
  2. ``_group_norm_apply_kernel``: combines its group's chunk statistics (Chan et al. 1979, the parallel variance
     formula), then y = (x - mean) * rstd * weight + bias, SiLU, store in the input's dtype.
``group_norm_reference`` is the same maths in plain torch (fp32), what the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import interpreted, tuning

# Elements of one chunk of a group (C/G channels x some positions), rounded up to a power of two of positions: ~4K
# spreads SD 1.5's 64x64-latent activations (2 x 320 x 4096 at batch 2) over 512 programs, ~4 per H100 SM, while
# each still streams >= 8 KiB of fp16. Untuned: no GPU has measured it yet.
CHUNK_ELEMENTS = 4096


def _configs() -> list[triton.Config]:
    """Tile sizes (elements) and warps for sm_90; the interpreter gets one small config (it cannot time any)."""
    if interpreted():
        return [triton.Config({"TILE": 256}, num_warps=1)]
    return [triton.Config({"TILE": tile}, num_warps=warps) for tile in (1024, 2048, 4096) for warps in (4, 8)]


FULL_CONFIGS = _configs()
# Until a GPU run saves measured winners (kernels/tuned/): a middle tile at both warp counts. A guess.
QUICK_FALLBACK = [{"kwargs": {"TILE": 2048}, "num_warps": 4, "num_stages": 3},
                  {"kwargs": {"TILE": 2048}, "num_warps": 8, "num_stages": 3},
                  {"kwargs": {"TILE": 4096}, "num_warps": 8, "num_stages": 3}]
# The largest tile a config uses: a chunk's positions must be a multiple of every config's positions per tile (the
# full list's bounds hold for the quick lists too, which are drawn from it).
MAX_TILE = max(config.kwargs["TILE"] for config in FULL_CONFIGS)
# A tile holds all of a group's channels for at least one position, so every config must fit BLOCK_C channels; wider
# groups (over 1,024 channels on a GPU, never in SD: its widest is 1280 / 32 = 40) take the torch path.
MIN_TILE = min(config.kwargs["TILE"] for config in FULL_CONFIGS)


@triton.jit
def _group_norm_stats_kernel(
    X,  # input, element (b, c, p) at X + b*stride_b + c*stride_c + p*stride_p (p: flattened H*W position)
    SHIFT,  # contiguous (B, C) added to x before anything else when HAS_SHIFT (else unused)
    MEAN, M2,  # fp32 (B*G, CHUNKS) outputs: each chunk's mean and sum of squared deviations from it
    HW, G, CPG,  # positions per image, groups, channels per group
    stride_b, stride_c, stride_p,
    HAS_SHIFT: tl.constexpr,
    CHUNK_HW: tl.constexpr,  # positions per chunk, a multiple of every config's positions per tile
    BLOCK_C: tl.constexpr,  # CPG rounded up to a power of two (a tile's channel extent)
    TILE: tl.constexpr,  # elements per tile (autotuned): BLOCK_C channels x TILE // BLOCK_C positions
):
    BLOCK_P: tl.constexpr = TILE // BLOCK_C
    bg = tl.program_id(0)
    chunk = tl.program_id(1)
    b = bg // G
    g = bg % G
    base = X + b.to(tl.int64) * stride_b + (g * CPG).to(tl.int64) * stride_c
    c = tl.arange(0, BLOCK_C)
    c_mask = c < CPG
    start = chunk * CHUNK_HW
    end = tl.minimum(start + CHUNK_HW, HW)
    count = CPG * (end - start)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_SHIFT:  # (B, C) is (B*G, CPG) too: this group's channels start at bg * CPG
        shift = tl.load(SHIFT + bg * CPG + c, mask=c_mask, other=0.0).to(tl.float32)

    total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for off in range(start, end, BLOCK_P):
        p = off + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < HW)[None, :]
        x = tl.load(base + c[:, None] * stride_c + p[None, :] * stride_p, mask=mask, other=0.0)
        total += tl.where(mask, x.to(tl.float32) + shift[:, None], 0.0)
    mean = tl.sum(total) / count

    squares = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for off in range(start, end, BLOCK_P):
        p = off + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < HW)[None, :]
        x = tl.load(base + c[:, None] * stride_c + p[None, :] * stride_p, mask=mask, other=0.0)
        d = tl.where(mask, x.to(tl.float32) + shift[:, None] - mean, 0.0)
        squares += d * d
    out = bg * tl.num_programs(1) + chunk
    tl.store(MEAN + out, mean)
    tl.store(M2 + out, tl.sum(squares))


@triton.jit
def _group_norm_apply_kernel(
    X, Y,  # input and output, addressed as in the stats kernel (each with its own strides)
    SHIFT,  # contiguous (B, C), as in the stats kernel
    W, BIAS,  # (C,) affine weight and bias, any float dtype
    MEAN, M2,  # fp32 (B*G, CHUNKS) from _group_norm_stats_kernel
    HW, G, CPG, eps,
    stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp,
    SILU: tl.constexpr,  # apply y * sigmoid(y) after the affine
    HAS_SHIFT: tl.constexpr,
    CHUNK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,  # CHUNKS rounded up to a power of two
    TILE: tl.constexpr,
):
    BLOCK_P: tl.constexpr = TILE // BLOCK_C
    bg = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    b = bg // G
    g = bg % G

    # the group's statistics from its chunks' (count, mean, M2), Chan's parallel formula
    i = tl.arange(0, BLOCK_CHUNKS)
    i_mask = i < chunks
    means = tl.load(MEAN + bg * chunks + i, mask=i_mask, other=0.0)
    m2s = tl.load(M2 + bg * chunks + i, mask=i_mask, other=0.0)
    counts = tl.where(i_mask, CPG * tl.minimum(HW - i * CHUNK_HW, CHUNK_HW), 0).to(tl.float32)
    n = (CPG * HW).to(tl.float32)
    mean = tl.sum(counts * means) / n
    spread = means - mean
    var = (tl.sum(m2s) + tl.sum(counts * spread * spread)) / n
    rstd = 1.0 / tl.sqrt(var + eps)

    c = tl.arange(0, BLOCK_C)
    c_mask = c < CPG
    w = tl.load(W + g * CPG + c, mask=c_mask, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + g * CPG + c, mask=c_mask, other=0.0).to(tl.float32)
    scale = w * rstd  # (BLOCK_C,); (x - mean) first: x * scale + offset would round away a tiny variance's signal
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_SHIFT:
        shift = tl.load(SHIFT + bg * CPG + c, mask=c_mask, other=0.0).to(tl.float32)
    centre = shift - mean  # (x + shift) - mean with one add per element

    x_base = X + b.to(tl.int64) * stride_xb + (g * CPG).to(tl.int64) * stride_xc
    y_base = Y + b.to(tl.int64) * stride_yb + (g * CPG).to(tl.int64) * stride_yc
    start = chunk * CHUNK_HW
    end = tl.minimum(start + CHUNK_HW, HW)
    for off in range(start, end, BLOCK_P):
        p = off + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < HW)[None, :]
        x = tl.load(x_base + c[:, None] * stride_xc + p[None, :] * stride_xp, mask=mask, other=0.0)
        y = (x.to(tl.float32) + centre[:, None]) * scale[:, None] + bias[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + c[:, None] * stride_yc + p[None, :] * stride_yp, y.to(Y.dtype.element_ty), mask=mask)


def _autotuners(name: str, kernel, key: list[str]) -> dict:
    """How to build the kernel's quick and full autotuners; its quick list comes from its own saved winners
    (``name``)."""
    def autotuned(configs: list[triton.Config]):
        return triton.autotune(configs=configs, key=key)(kernel)

    return {f"{name}:quick": lambda: autotuned(tuning.quick(name, FULL_CONFIGS, QUICK_FALLBACK)),
            f"{name}:full": lambda: autotuned(FULL_CONFIGS)}


# One autotuner per kernel and list, each with its own cache of winners per key.
AUTOTUNERS = tuning.Autotuners({
    **_autotuners("group_norm_stats", _group_norm_stats_kernel, ["CPG", "HW", "BLOCK_C", "HAS_SHIFT"]),
    **_autotuners("group_norm_apply", _group_norm_apply_kernel, ["CPG", "HW", "BLOCK_C", "SILU", "HAS_SHIFT"]),
})


def _position_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, position) strides of a (B, C, H, W) tensor whose H and W flatten to one position axis:
    NCHW-contiguous or channels-last."""
    if x.is_contiguous():
        return x.stride(0), x.stride(1), 1
    return x.stride(0), x.stride(1), x.stride(3)  # channels-last: position p = h*W + w at stride C


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
               silu: bool, shift: torch.Tensor | None = None, *, autotune: str = "quick") -> torch.Tensor:
    """GroupNorm over x (B, C, H, W) + shift (B, C) per channel, NCHW or channels-last, then SiLU when ``silu``;
    the add and the statistics in fp32.

    The seam signature of ``sdfast.models.layers.group_norm``. Returns a tensor in x's dtype and memory format.
    ``autotune``: "quick" or "full" config list (``sdfast.kernels.tuning``).
    """
    mode = tuning.check_mode(autotune)
    if x.ndim != 4:
        raise ValueError(f"group_norm takes (B, C, H, W) activations, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"group_norm supports fp16, bf16 and fp32 activations, not {x.dtype}: cast the model")
    bsz, channels, h, w = x.shape
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups: use a group count dividing C")
    if weight.shape != (channels,) or bias.shape != (channels,):
        raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must both be ({channels},)")
    if shift is not None and shift.shape != (bsz, channels):
        raise ValueError(f"shift {tuple(shift.shape)} must be ({bsz}, {channels}): one value per image and channel")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    cpg, hw = channels // groups, h * w
    block_c = triton.next_power_of_2(cpg)
    if block_c > MIN_TILE:
        return group_norm_reference(x, weight, bias, groups, eps, silu, shift)
    shift_arg = x if shift is None else shift.contiguous()  # never read without HAS_SHIFT
    y = torch.empty_like(x)  # keeps x's memory format, so y's strides mirror x's
    max_block_p = max(MAX_TILE // block_c, 1)
    chunk_hw = max(triton.next_power_of_2(max(CHUNK_ELEMENTS // cpg, 1)), max_block_p)
    chunks = triton.cdiv(hw, chunk_hw)
    mean = torch.empty(bsz * groups, chunks, device=x.device, dtype=torch.float32)  # (B*G, CHUNKS)
    m2 = torch.empty_like(mean)
    grid = (bsz * groups, chunks)
    stats, apply = AUTOTUNERS[f"group_norm_stats:{mode}"], AUTOTUNERS[f"group_norm_apply:{mode}"]
    stats[grid](x, shift_arg, mean, m2, hw, groups, cpg, *_position_strides(x),
                HAS_SHIFT=shift is not None, CHUNK_HW=chunk_hw, BLOCK_C=block_c)
    apply[grid](x, y, shift_arg, weight, bias, mean, m2, hw, groups, cpg, eps,
                *_position_strides(x), *_position_strides(y), SILU=silu,
                HAS_SHIFT=shift is not None, CHUNK_HW=chunk_hw, BLOCK_C=block_c,
                BLOCK_CHUNKS=triton.next_power_of_2(chunks))
    return y


def group_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         silu: bool, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch in fp32 for fp16 / bf16 / fp32 input (as the kernel computes), in fp64 for fp64 input (the
    exact answer the tests hold fp32 to), cast back to x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.to(dtype) if shift is None else x.to(dtype) + shift.to(dtype)[:, :, None, None]  # (B, C, H, W)
    y = F.group_norm(h, groups, weight.to(dtype), bias.to(dtype), eps)
    return (F.silu(y) if silu else y).to(x.dtype)
