"""Latency of every stage and every step, without perturbing what is measured.

On CUDA each interval is a pair of CUDA events recorded on the stream: nothing synchronises inside the denoising
loop, and all intervals are read once at the end. On CPU the clock is ``time.perf_counter`` (monotonic).
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch


class Recorder:
    """Collects named intervals; ``resolve()`` turns them into milliseconds (one device sync, at the end)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._spans: list[tuple[str, object, object]] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))  # the stream the pipeline's work runs on
            return event
        return time.perf_counter()

    @contextmanager
    def span(self, name: str):
        start = self._mark()
        yield
        self._spans.append((name, start, self._mark()))

    def resolve(self) -> dict[str, list[float]]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out: dict[str, list[float]] = {}
        for name, start, end in self._spans:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            out.setdefault(name, []).append(ms)
        return out


@dataclass
class Timings:
    """Milliseconds per stage. ``unet_ms`` / ``scheduler_ms`` / ``step_ms`` hold one entry per denoising step:
    a step is the guided U-Net call, the scheduler update and the host work between them (previews excluded)."""

    text_encoder_ms: float
    unet_ms: list[float]
    scheduler_ms: list[float]
    step_ms: list[float]
    vae_decode_ms: float
    vae_encode_ms: float = 0.0  # img2img only
    preview_ms: float = 0.0  # total over all previews
    total_ms: float = 0.0
    device: str = "cpu"
    stats: dict = field(default_factory=dict)
    vae_dtype: str = ""  # the precision the VAE decoded in (SDXL's VAE: float32 in an fp16 pipeline)
    vae_fallback: bool = False  # the decode overflowed (NaN / Inf) in the model's dtype and ran again in float32
    steps: int = 0  # the steps asked for; a scheduler may make more U-Net calls (heun: 2n - 1) or fewer (img2img)

    @classmethod
    def from_spans(cls, spans: dict[str, list[float]], device: torch.device, steps: int = 0) -> "Timings":
        t = cls(
            text_encoder_ms=sum(spans.get("text_encoder", [0.0])),
            unet_ms=spans.get("unet", []),
            scheduler_ms=spans.get("scheduler", []),
            step_ms=spans.get("step", []),
            vae_decode_ms=sum(spans.get("vae_decode", [0.0])),
            vae_encode_ms=sum(spans.get("vae_encode", [0.0])),
            preview_ms=sum(spans.get("preview", [0.0])),
            total_ms=sum(spans.get("total", [0.0])),
            device=str(device),
            steps=steps,
        )
        t.stats = {name: latency_stats(getattr(t, name)) for name in ("unet_ms", "scheduler_ms", "step_ms")}
        return t

    def summary(self) -> str:
        """One line for a terminal: the steps asked for and the U-Net calls they took, median call and U-Net
        latency, then the stages and the total."""
        calls = len(self.step_ms)
        asked = f"{self.steps} steps" if self.steps else ""
        head = (f"{asked} ({calls} U-Net calls)" if asked and calls != self.steps else asked or f"{calls} U-Net calls")
        step = self.stats.get("step_ms", {})
        return (f"{head}: {step.get('p50', 0):.1f} ms/call (p90 {step.get('p90', 0):.1f}), "
                f"unet {self.stats.get('unet_ms', {}).get('p50', 0):.1f} ms, "
                f"text {self.text_encoder_ms:.1f} ms, vae {self.vae_decode_ms:.1f} ms, "
                f"total {self.total_ms:.0f} ms on {self.device}")

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / min / mean of a series of latencies (empty dict for none); benchmarks report the same."""
    if not values:
        return {}
    ordered = sorted(values)

    def pct(q: float) -> float:  # nearest-rank percentile: the smallest value with at least q of the values <= it
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": statistics.median(ordered), "p90": pct(0.9), "p99": pct(0.99), "min": ordered[0],
            "mean": statistics.fmean(ordered)}
