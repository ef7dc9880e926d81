"""Triton kernels for the U-Net hot loop (installed as ``sdfast.kernels``).

| module | kernel | replaces |
|---|---|---|
| ``group_norm`` | (x + time-embedding shift) -> GroupNorm (+ SiLU), fp32 statistics, NCHW or channels-last | ``x + t``, ``F.group_norm``, ``F.silu`` |
| ``attention`` | flash-attention forward (online softmax), token-major (B, N, H*D) | ``F.scaled_dot_product_attention`` |

Each module holds its private ``_kernel``s, the launcher (the public function, with the model seam's signature) and
the plain-torch ``*_reference`` it is tested against. Importing ``sdfast.kernels`` itself never imports Triton, so
``import sdfast`` works without it; ``HAS_TRITON`` says whether the submodules can load.

No CUDA C++ lives here: no profile has shown a kernel that Triton cannot write well (issue #5, item 5).
"""

from __future__ import annotations

import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read when a kernel module is
    first imported): the tests' mode on machines without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require(what: str) -> None:
    """Raise a one-line error naming the fix when Triton is missing."""
    if not HAS_TRITON:
        raise RuntimeError(f"{what} needs Triton, which is not installed: pip install triton "
                           "(CUDA builds of torch ship it)")
