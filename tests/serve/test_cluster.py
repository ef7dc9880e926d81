"""`sdfast serve` from the command line on a two-node Ray cluster on loopback (`ray start --head` plus a second
node): both nodes' replicas answer, and Ctrl-C (SIGINT) stops the service."""

import base64
import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from sdfast.serve import HAS_SERVE

pytestmark = pytest.mark.skipif(not HAS_SERVE, reason='needs the serve extra: pip install -e ".[serve]"')
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.poll() is None, f"{what}: {p.args[:4]} exited with {p.returncode}"
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_two_nodes_serve_one_app(tmp_path):
    import httpx

    gcs, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    joined = {**env, "RAY_AUTH_MODE": "token"}  # the head made the token (~/.ray/auth_token); the others read it
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats", "--block"]
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("head", "worker", "serve")]
    head = subprocess.Popen(RAY + ["start", "--head", "--port", str(gcs), "--include-dashboard", "false", *node],
                            env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    procs = [head]
    try:
        wait_for(lambda: "block forever" in (tmp_path / "head.log").read_text(), 120, "head node", procs)
        procs.append(subprocess.Popen(RAY + ["start", "--address", f"127.0.0.1:{gcs}", *node], env=joined,
                                      stdout=logs[1], stderr=subprocess.STDOUT))
        wait_for(lambda: "block forever" in (tmp_path / "worker.log").read_text(), 120, "second node", procs)
        serve = subprocess.Popen([sys.executable, "-m", "sdfast.cli", "serve", "--address",  # the default model
                                  f"127.0.0.1:{gcs}", "--replicas", "2", "--port", str(http)], env=joined,
                                 stdout=logs[2], stderr=subprocess.STDOUT)
        procs.append(serve)
        wait_for(lambda: "sdfast serve: http://" in (tmp_path / "serve.log").read_text(), 180, "sdfast serve", procs)

        def post(i):  # 20 in flight: more than one replica's max_ongoing_requests, so both nodes get work
            for _ in range(5):  # a busy server says when to come back (503 + Retry-After): a client obeys
                r = httpx.post(f"http://127.0.0.1:{http}/v1/txt2img", json={"prompt": "x", "steps": 20, "seed": i},
                               timeout=120)
                if r.status_code != 503:
                    break
                time.sleep(float(r.headers["retry-after"]))
            return r.status_code, r.json()

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(post, range(20)))
        assert all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:3]
        assert len({body["node"] for _, body in answers}) == 2, "one node's replica never answered"
        first = next(body for _, body in answers if body["seed"] == 3)
        # the same seed on either node: the same image. The first may have run in a batch with others and this one
        # alone, so the pixels agree within one level (a batch row equals a lone call's to 1/255), not the bytes.
        again = post(3)[1]
        assert np.abs(decode(again["images"][0]) - decode(first["images"][0])).max() <= 1
        with ThreadPoolExecutor(1) as pool:  # Ctrl-C while a long request is in flight: it still gets its image
            late = pool.submit(httpx.post, f"http://127.0.0.1:{http}/v1/txt2img",
                               json={"prompt": "x", "steps": 150, "seed": 1}, timeout=120)
            time.sleep(0.5)
            stop(serve, signal.SIGINT)
            assert late.result().status_code == 200
        assert serve.returncode == 0 and "draining in-flight requests" in (tmp_path / "serve.log").read_text()
    finally:
        for proc in reversed(procs):  # only the processes this test started, by their handles
            stop(proc)
        for log in logs:
            log.close()
