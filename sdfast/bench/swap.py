"""LoRA swap time: how long a loaded pipeline takes to apply, rescale and remove a LoRA (``sdfast bench --lora-rank``).

The LoRA is random, of the given rank, on the modules trainers target (attention, projections, feed-forward of the
U-Net; attention and MLP of the text encoders): its values do not matter for the time, only its shapes. Each figure
is the median of ``repeat`` synchronised swaps after one untimed one.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..lora import LoRA, Patch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_lora(shapes: dict[str, dict[str, tuple[int, ...]]], rank: int, seed: int = 0) -> LoRA:
    """A rank-``rank`` LoRA (fp16, on the CPU as a file's would be) for every targeted Linear / 1x1 conv."""
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for network, paths in shapes.items():
        for path, shape in paths.items():
            if not path.endswith(TARGETS) or (len(shape) == 4 and tuple(shape[2:]) != (1, 1)):
                continue
            ones = (1, 1) if len(shape) == 4 else ()
            down = torch.randn(rank, shape[1], *ones, generator=g).div_(shape[1] ** 0.5).half()
            up = torch.randn(shape[0], rank, *ones, generator=g).mul_(0.01).half()
            patches[(network, path)] = Patch(down, up)
    return LoRA(Path(f"random-rank{rank}.safetensors"), "random", patches)


def measure_swap(pipe, rank: int, repeat: int = 5) -> dict:
    """Milliseconds to add the LoRA (first merge, base copies included), switch it on and off (``apply``) and to
    change its scale, on the pipeline's device."""
    device = pipe.device

    def timed(action) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        action()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    lora = random_lora(pipe.loras.shapes(), rank)
    add_ms = timed(lambda: pipe.loras.add(lora, 1.0, "bench"))
    on, off, rescale = [], [], []
    try:
        for i in range(repeat + 1):
            times = (timed(lambda: pipe.loras.apply({})), timed(lambda: pipe.loras.apply({"bench": 1.0})),
                     timed(lambda: pipe.loras.apply({"bench": 0.5})))
            if i:  # the first round warms up
                for series, ms in zip((off, on, rescale), times):
                    series.append(ms)
    finally:
        pipe.loras.unload("bench")
    return {"rank": rank, "modules": len(lora.patches), "lora_mb": round(lora.nbytes() / 2**20, 2),
            "add_ms": round(add_ms, 3), "on_ms": round(statistics.median(on), 3),
            "off_ms": round(statistics.median(off), 3), "rescale_ms": round(statistics.median(rescale), 3)}
