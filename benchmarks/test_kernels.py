"""Microbenchmarks: sdfast's Triton kernels against the best torch op, at Stable Diffusion shapes (CUDA only).

    python -m pytest benchmarks/test_kernels.py --benchmark-only --benchmark-group-by=group

Each group is one shape; pytest-benchmark's table then gives every implementation's time and its ratio to the
fastest in the group, and ``extra_info`` holds the derived rate (GB/s for GroupNorm, from the minimal traffic of
one read and one write; TFLOP/s for attention, 4*B*H*N*M*D) and the GPU's name. A round runs the op ``REPEAT``
times between two synchronisations, so launch latency is averaged out rather than dominating. Timings are reported,
never asserted.

Baselines: GroupNorm+SiLU is ``F.group_norm`` then ``F.silu`` (eager, what the torch backend runs), with the ResNet
block's time-embedding add ``x + t[:, :, None, None]`` before it in the ``+temb`` groups (the add the kernel fuses);
attention is
``F.scaled_dot_product_attention`` on (B, H, N, D) tensors pinned to each of its fused backends (flash,
memory-efficient, cuDNN) in turn, so the best of them is in the table; the head-major transposes the model would
add around it are not counted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")
REPEAT = 20

# GroupNorm inputs (B, C, H, W) of SD 1.5's U-Net: batch 2 = one image with guidance at 512 px (64x64 latents, three
# levels), 768 px, and batch 8 = four images with guidance; plus the VAE decoder's largest at 512 px.
GROUP_NORM_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 320, 96, 96), (8, 320, 64, 64),
                     (1, 128, 512, 512)]
# SDXL at 1024 px (128x128 latents): its U-Net's three levels with guidance, and the VAE decoder's largest.
GROUP_NORM_SHAPES += [(2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32), (1, 128, 1024, 1024)]
# Attention (B, N, M, heads, head dim): SD 1.5 512 px self-attention per level, its cross-attention on 77 tokens,
# SD 2.x 768 px (head dim 64), 1024 px (16,384 tokens), and head dim 160 at SD 2.x's deepest level.
ATTENTION_SHAPES = [(2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 256, 256, 8, 160), (2, 4096, 77, 8, 40),
                    (2, 9216, 9216, 5, 64), (2, 16384, 16384, 8, 40), (2, 576, 576, 10, 64)]
# SDXL at 1024 px, head dim 64: self-attention on 4,096 tokens (10 heads) and 1,024 tokens (20 heads, the 10-deep
# stacks), and cross-attention on 77 text tokens; the 2048-wide context only widens the to_k / to_v GEMMs, so the
# kernel sees the same (B, 77, H*D) keys as for any context width.
ATTENTION_SHAPES += [(2, 4096, 4096, 10, 64), (2, 1024, 1024, 20, 64), (2, 4096, 77, 10, 64), (2, 1024, 77, 20, 64)]


def _time(benchmark, fn, info: dict) -> None:
    def run():
        for _ in range(REPEAT):
            fn()
        torch.cuda.synchronize()

    run()  # compile / autotune outside the timed rounds
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    seconds = benchmark.stats.stats.median / REPEAT
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), ms=seconds * 1e3,
                                **{k: v / seconds for k, v in info.items()})


@pytest.mark.parametrize("shape", GROUP_NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("temb", [False, True], ids=["plain", "temb"])
@pytest.mark.parametrize("impl", ["sdfast", "torch"])
def test_group_norm_silu(benchmark, shape, channels_last, temb, impl):
    from sdfast.kernels.group_norm import group_norm

    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))
    shift = torch.randn(shape[:2], device="cuda", dtype=torch.float16) if temb else None  # (B, C)
    if impl == "sdfast":
        def fn():
            return group_norm(x, weight, bias, 32, 1e-5, True, shift)
    else:
        def fn():
            h = x + shift[:, :, None, None] if temb else x
            return F.silu(F.group_norm(h, 32, weight, bias, 1e-5))
    layout = "nhwc" if channels_last else "nchw"
    benchmark.group = f"group_norm_silu{'+temb' if temb else ''} {'x'.join(map(str, shape))} {layout}"
    _time(benchmark, fn, {"GB/s": 2 * x.numel() * x.element_size() / 1e9})


SDPA_BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "b{}-n{}-m{}-h{}-d{}".format(*s))
@pytest.mark.parametrize("impl", ["sdfast", *SDPA_BACKENDS])
def test_attention(benchmark, shape, impl):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sdfast.kernels.attention import attention

    b, n, m, heads, d = shape
    q = torch.randn(b, n, heads * d, device="cuda", dtype=torch.float16)  # (B, N, H*D)
    k, v = (torch.randn(b, m, heads * d, device="cuda", dtype=torch.float16) for _ in range(2))  # (B, M, H*D)
    if impl == "sdfast":
        def fn():
            return attention(q, k, v, heads)
    else:
        qh = q.view(b, n, heads, d).transpose(1, 2).contiguous()  # (B, H, N, D)
        kh, vh = (t.view(b, m, heads, d).transpose(1, 2).contiguous() for t in (k, v))  # (B, H, M, D)
        backend = getattr(SDPBackend, impl)

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qh, kh, vh)
        try:
            fn()
        except RuntimeError as e:  # e.g. a head dim this fused kernel does not take
            pytest.skip(f"SDPA {impl} cannot run this shape: {str(e).splitlines()[0]}")
    benchmark.group = "attention b{}-n{}-m{}-h{}-d{}".format(*shape)
    _time(benchmark, fn, {"TFLOP/s": 4 * b * heads * n * m * d / 1e12})
