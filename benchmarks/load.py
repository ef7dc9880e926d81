"""Load test for a running ``sdfast serve`` on this machine: requests/s, images/s, p50/p95/p99 latency, errors,
lost requests and the batch sizes the replicas formed; ``--kill-after S`` kills one pipeline replica mid-run.

    sdfast serve MODEL --replicas 2 &
    python benchmarks/load.py --requests 200 --concurrency 16 --steps 30 --out benchmarks/results/cpu-2rep
    python benchmarks/load.py --requests 200 --kill-after 5 --out benchmarks/results/cpu-2rep-kill

Writes OUT.json and OUT.md (see sdfast.serve.loadtest for what each count means).
"""

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from sdfast.serve.loadtest import kill_replica, markdown, run_load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--requests", type=int, default=100, help="requests to send at most")
    p.add_argument("--duration", type=float, default=120.0, help="seconds to keep sending at most")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--kill-after", type=float, default=None, help="kill one pipeline replica after S seconds")
    p.add_argument("--ray-address", default="auto", help="the server's Ray cluster, for --kill-after")
    p.add_argument("--bad-every", type=int, default=None, help="soak: every K-th request is a careless or hostile "
                   "one (sdfast.serve.loadtest.BAD_REQUESTS), which must be refused with a 4xx")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    p.add_argument("--title", default="sdfast serve load test")
    args = p.parse_args(argv)
    payload = {"steps": args.steps, "scheduler": args.scheduler,
               **{k: v for k, v in (("width", args.width), ("height", args.height)) if v}}
    result = asyncio.run(run_load(
        args.url, requests=args.requests, concurrency=args.concurrency, duration_s=args.duration, payload=payload,
        api_key=os.environ.get("SDFAST_API_KEY"), kill_after_s=args.kill_after,
        kill=lambda replica: kill_replica(replica, args.ray_address), bad_every=args.bad_every))
    text = markdown(result, args.title)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"payload": payload, **result}, indent=1))
        args.out.with_suffix(".md").write_text(text)
    return 0 if result["lost"] == 0 and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
