"""Timing statistics: nearest-rank percentiles, CPU spans."""

import time

import pytest
import torch

from sdfast.timing import Recorder, Timings


@pytest.mark.parametrize("n, p90, p99", [(1, 0, 0), (10, 8, 9), (20, 17, 19), (100, 89, 98), (101, 90, 99)])
def test_percentiles_are_nearest_rank(n, p90, p99):
    values = [float(v) for v in reversed(range(n))]  # order must not matter
    t = Timings.from_spans({"step": values, "unet": values, "scheduler": values}, torch.device("cpu"))
    assert t.stats["step_ms"]["p90"] == p90 and t.stats["step_ms"]["p99"] == p99
    assert t.stats["step_ms"]["min"] == 0 and t.stats["step_ms"]["p50"] == (n - 1) / 2


def test_cpu_spans_measure_wall_time():
    rec = Recorder(torch.device("cpu"))
    for _ in range(2):
        with rec.span("step"):
            time.sleep(0.02)
    spans = rec.resolve()
    assert len(spans["step"]) == 2 and all(15 < ms < 1000 for ms in spans["step"])
