"""Flash-attention forward over the token-major layout the projections produce: q (B, N, H*D), k / v (B, M, H*D).

Why a kernel: SD's first-level self-attention has 4,096 (512 px) to 16,384 (1024 px) tokens; materialising the
N x N logits costs N^2 memory traffic per head. Here each program owns BLOCK_M queries of one head and streams the
keys in BLOCK_N blocks with an online softmax (Dao et al. 2022, "FlashAttention", Algorithm 1; the layout of the
Triton fused-attention tutorial), so logits never leave registers.

Layout: head h of token n sits at columns h*D .. h*D+D-1 of row n, so the kernel addresses q, k, v and the output
through (batch, token) strides plus a head offset: no (B, H, N, D) transposes around it, and q / k / v may be
column slices of one fused QKV projection (row stride 3*H*D).

Head dims that are not powers of two (40, 80, 160 in SD 1.x / 2.x) are padded to the next one inside the kernel
(masked loads), so any D <= 256 works. Keys past M (77 or 154 text tokens, odd token counts) are masked to -inf.
Logits and softmax statistics are always fp32; ``upcast`` also keeps the probabilities and P @ V in fp32 (what the
torch seam does by running everything in fp32), otherwise P is rounded to the input dtype for the tensor cores.
``attention_reference`` is the same maths in plain torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sdfast.models.layers import attention as torch_attention

from . import interpreted, tuning

MAX_HEAD_DIM = 256  # a (BLOCK_M, 256) fp32 accumulator is the most one program holds in registers


def _configs() -> list[triton.Config]:
    """Query / key block sizes, warps and pipeline stages for sm_90 (pruned per head dim below)."""
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm in (64, 128) for bn in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4)]


FULL_CONFIGS = _configs()
# Until a GPU run saves measured winners (kernels/tuned/): the Triton fused-attention tutorial's Hopper choices for
# 64-wide heads (128 x 64 tiles, 3 stages) plus smaller tiles that the pruning keeps for 160-wide heads. A guess.
QUICK_FALLBACK = [{"kwargs": {"BLOCK_M": bm, "BLOCK_N": bn}, "num_warps": warps, "num_stages": stages}
                  for bm, bn, warps, stages in ((128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2))]


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose fp32 accumulator and K / V blocks would spill at large head dims."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    keep = [c for c in configs if block_d <= 64 or (c.kwargs["BLOCK_M"] * block_d <= 128 * 128
                                                    and c.kwargs["BLOCK_N"] * block_d <= 64 * 256)]
    return keep or configs[:1]


@triton.jit
def _attention_kernel(
    Q, K, V, O,  # q, out: (B, N, H*D); k, v: (B, M, H*D); last dim contiguous
    N, M, H,  # query tokens, key tokens, heads
    qk_scale,  # softmax scale 1/sqrt(D) times log2(e): the kernel works in base 2 (exp2)
    stride_qb, stride_qn, stride_kb, stride_km, stride_vb, stride_vm, stride_ob, stride_on,
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    UPCAST: tl.constexpr,  # keep P and P @ V in fp32
    QK_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr,  # "ieee" where a dot has fp32 operands, else "tf32"
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # queries per program, keys per step (autotuned)
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    head = (bh % H) * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < N

    q_ptrs = Q + b * stride_qb + offs_m[:, None] * stride_qn + head + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + head
    v_base = V + b * stride_vb + head

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running numerator P @ V
    for start in range(0, M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < M
        k = tl.load(k_base + offs_n[None, :] * stride_km + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k, input_precision=QK_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        s = tl.where(n_mask[None, :], s, float("-inf"))  # padded / out-of-range keys get no weight
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vm + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            pv = tl.dot(p, v.to(tl.float32), input_precision=PV_PRECISION)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PV_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + offs_m[:, None] * stride_on + head + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _autotuned(configs: list[triton.Config]):
    return triton.autotune(configs=configs, key=["N", "M", "HEAD_DIM", "UPCAST"],
                           prune_configs_by={"early_config_prune": _prune})(_attention_kernel)


# One autotuner per list over the same kernel, each with its own cache of winners per key.
AUTOTUNERS = tuning.Autotuners({
    "attention:quick": lambda: _autotuned(tuning.quick("attention", FULL_CONFIGS, QUICK_FALLBACK)),
    "attention:full": lambda: _autotuned(FULL_CONFIGS),
})


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head dim (the SD VAE's single 512-wide head stays on the torch op)."""
    return head_dim <= MAX_HEAD_DIM


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False, *,
              autotune: str = "quick") -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) v per head: q (B, N, H*D), k and v (B, M, H*D) -> (B, N, H*D), q's dtype.

    The seam signature of ``sdfast.models.layers.attention``; q, k, v may be strided views (e.g. slices of a
    fused QKV projection) as long as their last dim is contiguous. ``autotune``: "quick" or "full" config list
    (``sdfast.kernels.tuning``).
    """
    kernel = AUTOTUNERS[f"attention:{tuning.check_mode(autotune)}"]
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention takes q (B, N, H*D), k and v (B, M, H*D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    bsz, n, inner = q.shape
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[2] != inner:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be ({bsz}, M, {inner}) for q "
                         f"{tuple(q.shape)}")
    if inner % heads:
        raise ValueError(f"width {inner} does not split into {heads} heads")
    head_dim = inner // heads
    if not supports(head_dim):
        raise ValueError(f"head dim {head_dim} is over the kernel's {MAX_HEAD_DIM}: use the torch attention")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention takes one dtype of fp16 / bf16 / fp32 for q, k, v; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    m = k.shape[1]
    out = torch.empty(bsz, n, inner, device=q.device, dtype=q.dtype)  # (B, N, H*D)
    fp32 = q.dtype == torch.float32

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_M"]), bsz * heads

    kernel[grid](
        q, k, v, out, n, m, heads, math.log2(math.e) / math.sqrt(head_dim),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), 16), UPCAST=upcast,
        QK_PRECISION="ieee" if fp32 else "tf32", PV_PRECISION="ieee" if fp32 or upcast else "tf32")
    return out


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The torch seam (``sdfast.models.layers.attention``) all in fp32 (the kernel with ``upcast``; without it only
    P is rounded), cast to q's dtype."""
    return torch_attention(q.float(), k.float(), v.float(), heads).to(q.dtype)
