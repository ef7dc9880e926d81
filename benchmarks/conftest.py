"""Fixtures for the pipeline benchmarks: one model (random weights at a preset's shapes), loaded by sdfast and by
diffusers, on the GPU when there is one.

    python -m pytest benchmarks --benchmark-disable            # CI smoke run: each benchmark once, tiny model, CPU
    python -m pytest benchmarks/test_pipeline.py --sdfast-arch sd15 --sdfast-size 512 --sdfast-batch 1

The tiny model is written to a temporary folder; sd15 / sd21 (~2 GB) once under ``$SDFAST_CACHE/random``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("sdfast", "sdfast pipeline benchmarks")
    group.addoption("--sdfast-arch", default="tiny", help="model shapes: tiny (default), sd15 or sd21")
    group.addoption("--sdfast-size", type=int, default=None, help="image side in pixels (default: the model's)")
    group.addoption("--sdfast-batch", type=int, default=1, help="images per call")
    group.addoption("--sdfast-steps", type=int, default=4, help="denoising steps of the end-to-end benchmark")


@dataclass(frozen=True)
class Case:
    """What the pipeline benchmarks run: the model folder, where, in which dtype, at which shape."""

    model: Path
    arch: str
    device: torch.device
    dtype: torch.dtype
    size: int
    batch: int
    steps: int


@pytest.fixture(scope="session")
def case(request, tmp_path_factory) -> Case:
    from sdfast.backends import cache_dir
    from sdfast.bench.arch import preset, random_model

    name = request.config.getoption("--sdfast-arch")
    arch = preset(name)
    cache = tmp_path_factory.mktemp("bench-model") if name == "tiny" else cache_dir() / "random"
    cuda = torch.cuda.is_available()
    return Case(model=random_model(name, cache), arch=name, device=torch.device("cuda" if cuda else "cpu"),
                dtype=torch.float16 if cuda else torch.float32,
                size=request.config.getoption("--sdfast-size") or arch.size,
                batch=request.config.getoption("--sdfast-batch"), steps=request.config.getoption("--sdfast-steps"))


@pytest.fixture(scope="session")
def pipe(case):
    import sdfast

    return sdfast.load(case.model, case.device, case.dtype)


@pytest.fixture(scope="session")
def diffusers_pipe(case):
    pytest.importorskip("diffusers", reason='the diffusers baseline needs pip install "sdfast[bench]"')
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(case.model, dtype=case.dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(case.device)


@pytest.fixture
def synced(case):
    """``synced(fn)``: ``fn`` followed by a device synchronisation, so a round times the work, not its launch."""

    def wrap(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            if case.device.type == "cuda":
                torch.cuda.synchronize(case.device)
            return out

        return call

    return wrap
