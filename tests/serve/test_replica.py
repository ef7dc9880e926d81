"""The pipeline replica without Ray or a model: a request whose caller gave up (cancelled, or past its deadline)
frees the device within a step, while batch-mates still waiting keep their call going."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from sdfast.serve import HAS_SERVE
from sdfast.serve.requests import GenerationRequest

pytestmark = [pytest.mark.skipif(not HAS_SERVE, reason='needs the serve extra: pip install -e ".[serve]"'),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray's own pydantic-v1-style fields
STEP_S = 0.02


class SlowPipe:
    """``generate`` as the pipeline runs it, minus the networks: ``steps`` steps of ``STEP_S`` each, with the
    callback after each."""

    def __init__(self):
        self.steps_run = 0

    def initial_noise(self, seed, width, height, n=1):
        return torch.randn(n, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))

    def generate(self, prompt, negative_prompt, *, width, height, steps, seed, batch_size=1, callback=None, **_):
        for step in range(1, steps + 1):
            time.sleep(STEP_S)
            self.steps_run += 1
            if callback is not None and callback(step, None, None) is False:
                break
        n = len(prompt) if isinstance(prompt, list) else batch_size
        timings = SimpleNamespace(stats={}, text_encoder_ms=0.0, unet_ms=[], scheduler_ms=[], vae_encode_ms=0.0,
                                  vae_decode_ms=0.0, total_ms=0.0, step_ms=[0.0] * steps, device="cpu")
        return SimpleNamespace(images=[Image.new("RGB", (width, height))] * n, seed=seed, timings=timings)


def replica(pipe, max_batch=1):
    from sdfast.serve.app import PipelineReplica
    from sdfast.serve.batching import pipeline_limits
    from sdfast.serve.loras import LoRACache
    from sdfast.serve.requests import Limits

    r = PipelineReplica.__new__(PipelineReplica)  # without __init__: no model to load, no Ray replica context
    r.pipe, r.size, r.max_batch, r.batch_wait_s, r.queues = pipe, (64, 64), max_batch, 0.0, {}
    r.device, r.where = ThreadPoolExecutor(1), {"replica": "r", "node": "n"}
    r.limits = pipeline_limits(Limits(), max_batch)
    r.loras = LoRACache(pipe, {}, capacity=1)  # no --lora-dir
    return r


def request(steps, seed=1):
    return GenerationRequest("a red circle", "", steps, 7.5, 64, 64, seed, "euler", 1, "json")


async def until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the timeout"
        await asyncio.sleep(0.002)


def test_a_cancelled_request_frees_the_device_within_a_step():
    pipe = SlowPipe()
    rep = replica(pipe)

    async def main():
        task = asyncio.create_task(rep.generate(request(steps=500)))  # 10 s if nothing stops it
        await until(lambda: pipe.steps_run >= 5)
        task.cancel()  # what Ray Serve does to the replica's call when the front times out or the client leaves
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_at = pipe.steps_run
        start = time.monotonic()
        answer = await rep.generate(request(steps=3))  # the device is free again at once
        return cancelled_at, answer, time.monotonic() - start

    cancelled_at, answer, next_s = asyncio.run(main())
    assert pipe.steps_run <= cancelled_at + 1 + 3, (cancelled_at, pipe.steps_run)
    assert len(answer["pngs"]) == 1 and next_s < 50 * STEP_S, next_s


def test_a_request_past_its_deadline_stops_on_the_replica():
    from sdfast.serve.batching import Cancelled

    pipe = SlowPipe()
    rep = replica(pipe)
    start = time.time()
    with pytest.raises(Cancelled, match="no one waits for these images"):
        asyncio.run(rep.generate(request(steps=500), start + 10 * STEP_S))
    assert pipe.steps_run < 60 and time.time() - start < 60 * STEP_S, pipe.steps_run
    with pytest.raises(Cancelled, match="before the first step"):
        asyncio.run(rep.generate(request(steps=500), start))
    assert pipe.steps_run < 60


def test_a_batch_runs_on_while_one_of_its_requests_waits():
    from sdfast.serve.app import Job
    from sdfast.serve.batching import Cancelled

    pipe = SlowPipe()
    rep = replica(pipe, max_batch=4)

    async def main(cancel: int):
        jobs = [Job(request(steps=40, seed=1), None), Job(request(steps=40, seed=2), None)]
        before = pipe.steps_run
        task = asyncio.create_task(rep._run(jobs))
        await until(lambda: pipe.steps_run >= before + 3)
        for job in jobs[:cancel]:
            job.cancelled.set()
        try:
            return len(await task), pipe.steps_run - before
        except Cancelled:
            return 0, pipe.steps_run - before

    assert asyncio.run(main(cancel=1)) == (2, 40)  # the other request still gets its image
    answers, steps = asyncio.run(main(cancel=2))
    assert answers == 0 and steps < 10, steps
