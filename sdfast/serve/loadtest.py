"""A bounded load test for a running ``sdfast serve`` (loopback only): does it answer every request, and how fast?

``run_load`` keeps ``concurrency`` requests in flight until ``requests`` have been sent or ``duration_s`` has
passed, waits for every answer, and counts each request as exactly one of:

- ``ok``: 200 with its images;
- ``rejected``: 503 (or 429) with ``Retry-After``, the server's way of saying "busy, come back";
- ``errors``: any other HTTP answer (by status);
- ``lost``: no HTTP answer at all (connection dropped, or no answer within ``timeout_s``).

A server that behaves has ``errors == {}`` and ``lost == 0``. The fault mode kills one pipeline replica
``kill_after_s`` into the run (``kill_replica``) while it is computing a batch, to show that requests in flight on
it are retried, not lost. The soak mode (``bad_every``) makes every k-th request a careless or hostile one from
``BAD_REQUESTS``; each must be ``refused`` (a 4xx with a JSON message), and anything else it gets is an error.
``benchmarks/load.py`` is the command line around it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from urllib.parse import urlparse

from .options import is_loopback

# (path, raw body) of requests a client gets wrong or a probe sends on purpose: each must be a 4xx, never a 5xx.
BAD_REQUESTS = (
    ("/v1/txt2img", b'{"prompt": "a red circle", "steps": 0}'),
    ("/v1/txt2img", b'{"prompt": "a red circle", "height": 20000, "n": 4}'),
    ("/v1/txt2img", b'{"prompt": "a red circle", "seed": ' + b"9" * 5000 + b"}"),
    ("/v1/txt2img", b"[" * 100_000 + b"]" * 100_000),
    ("/v1/txt2img", rb'{"prompt": "\udcff"}'),  # a lone surrogate, JSON-escaped
    ("/v1/txt2img", b'{"prompt": "a red circle", "path": "/etc/passwd"}'),
    ("/v1/txt2img", b"not json"),
    ("/v1/img2img", b'{"prompt": "a red circle", "image": "aGVsbG8="}'),
)


async def run_load(url: str, *, requests: int = 100, concurrency: int = 8, duration_s: float = 60.0,
                   payload: dict | None = None, api_key: str | None = None, timeout_s: float = 120.0,
                   kill_after_s: float | None = None, kill=None, bad_every: int | None = None) -> dict:
    """POST ``payload`` (seed i for request i) to ``url``/v1/txt2img; ``kill(replica)`` runs (in a thread) once,
    ``kill_after_s`` in or soon after, on a replica in the middle of a batch; with ``bad_every`` k, request i is
    ``BAD_REQUESTS[i // k % len]`` when i % k == k - 1. Returns the report (see ``markdown``)."""
    import httpx

    host = urlparse(url).hostname or ""
    if not is_loopback(host):
        raise ValueError(f"the load test only targets loopback servers, not {host!r}: run it on the server's machine")
    payload = {"prompt": "a red circle at the top left", "steps": 20, **(payload or {})}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    outcomes: list[dict] = []
    answers: list[tuple[str, float]] = []  # (replica, its call's compute seconds) per 200, in arrival order
    killed: dict = {}
    start = time.perf_counter()
    deadline = start + duration_s
    issued = 0

    async def one(client, i: int) -> None:
        sent = time.perf_counter()
        bad = bad_every is not None and i % bad_every == bad_every - 1
        try:
            if bad:
                path, body = BAD_REQUESTS[i // bad_every % len(BAD_REQUESTS)]
                r = await client.post(path, content=body, headers={"Content-Type": "application/json"},
                                      timeout=timeout_s)
            else:
                r = await client.post("/v1/txt2img", json={**payload, "seed": i}, timeout=timeout_s)
        except httpx.HTTPError as e:  # nothing came back: the request is lost
            outcomes.append({"kind": "lost", "error": type(e).__name__})
            return
        latency = time.perf_counter() - sent
        if bad:
            refused = 400 <= r.status_code < 500 and "application/json" in r.headers.get("content-type", "")
            outcomes.append({"kind": "refused"} if refused else
                            {"kind": "error", "status": r.status_code, "message": r.text[:200]})
        elif r.status_code == 200:
            body = r.json()
            answers.append((body["replica"], body["timings"]["total_ms"] / 1e3))
            outcomes.append({"kind": "ok", "latency_s": latency, "images": len(body["images"]),
                             "batch_images": body["batch_images"], "attempts": body["attempts"]})
        elif r.status_code in (429, 503) and r.headers.get("retry-after"):
            outcomes.append({"kind": "rejected", "latency_s": latency})
        else:
            outcomes.append({"kind": "error", "status": r.status_code, "message": r.text[:200]})

    async def fault() -> None:
        # Killing the replica that answered last, at once, often hits it between batches (it has just finished one),
        # so nothing is in flight on it and the retry path goes untried. Instead: wait for the next answer, whose
        # replica is now taking the next queued requests, then a quarter of that answer's compute time.
        await asyncio.sleep(kill_after_s)
        seen = len(answers)
        while len(answers) == seen and len(outcomes) < requests and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if len(answers) > seen:
            replica, compute_s = answers[-1]
            await asyncio.sleep(compute_s / 4)
            killed.update(replica=replica, at_s=round(time.perf_counter() - start, 2))
            await asyncio.to_thread(kill, replica)

    async with httpx.AsyncClient(base_url=url, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        faults = [asyncio.create_task(fault())] if kill is not None and kill_after_s is not None else []
        running: set[asyncio.Task] = set()
        while issued < requests and time.perf_counter() < deadline:
            if len(running) >= concurrency:
                _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            running.add(asyncio.create_task(one(client, issued)))
            issued += 1
        await asyncio.gather(*running, *faults)
    return report(outcomes, issued, time.perf_counter() - start, concurrency, killed)


def report(outcomes: list[dict], issued: int, elapsed_s: float, concurrency: int, killed: dict) -> dict:
    ok = [o for o in outcomes if o["kind"] == "ok"]
    latencies = sorted(o["latency_s"] * 1e3 for o in ok)

    def pct(q: float) -> float:  # nearest-rank percentile
        return latencies[min(len(latencies) - 1, max(0, round(q * len(latencies) + 0.5) - 1))] if latencies else 0.0

    return {
        "issued": issued, "answered": sum(o["kind"] != "lost" for o in outcomes), "concurrency": concurrency,
        "elapsed_s": round(elapsed_s, 3), "ok": len(ok),
        "rejected": sum(o["kind"] == "rejected" for o in outcomes),
        "refused": sum(o["kind"] == "refused" for o in outcomes),
        "errors": dict(Counter(o["status"] for o in outcomes if o["kind"] == "error")),
        "lost": issued - len(outcomes) + sum(o["kind"] == "lost" for o in outcomes),
        "requests_per_s": round(len(ok) / elapsed_s, 3), "images_per_s": round(sum(o["images"] for o in ok) / elapsed_s, 3),
        "latency_ms": {"p50": round(statistics.median(latencies), 1) if latencies else 0.0,
                       "p95": round(pct(0.95), 1), "p99": round(pct(0.99), 1)},
        "batch_sizes": dict(sorted(Counter(o["batch_images"] for o in ok).items())),
        "attempts": dict(sorted(Counter(o["attempts"] for o in ok).items())),
        "killed": killed,
        "error_examples": [o.get("message") or o.get("error") for o in outcomes if o["kind"] in ("error", "lost")][:3],
    }


def markdown(result: dict, title: str = "sdfast serve load test") -> str:
    lat = result["latency_ms"]
    lines = [f"## {title}", "",
             "| requests | ok | 503 + Retry-After | bad ones refused (4xx) | other errors | lost | req/s | images/s "
             "| p50 ms | p95 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {result['issued']} | {result['ok']} | {result['rejected']} | {result['refused']} | "
             f"{result['errors'] or 0} | {result['lost']} "
             f"| {result['requests_per_s']} | {result['images_per_s']} | {lat['p50']} | {lat['p95']} | {lat['p99']} |",
             "", f"Concurrency {result['concurrency']}, {result['elapsed_s']} s. Images per batched call seen: "
             f"{result['batch_sizes']}. Attempts per answered request: {result['attempts']}."]
    if result["killed"]:
        lines.append(f"Fault: replica {result['killed']['replica']} killed at {result['killed']['at_s']} s.")
    return "\n".join(lines) + "\n"


def kill_replica(replica: str, address: str | None = None) -> None:
    """Kill the pipeline replica whose actor name ``replica`` a response named, as a crash would (no drain)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto", logging_level="warning")
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
