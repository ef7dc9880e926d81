"""``sdfast serve``: an HTTP service on Ray Serve; see ``sdfast.serve``."""

from __future__ import annotations

import os
from pathlib import Path


def add_parsers(sub) -> None:
    srv = sub.add_parser("serve", help="an HTTP service on Ray Serve (POST /v1/txt2img, /v1/img2img)")
    srv.set_defaults(handler=run_serve)
    srv.add_argument("model", nargs="?", default=os.environ.get("SDFAST_MODEL"),
                     help="diffusers folder or .safetensors/.ckpt on this machine (default: $SDFAST_MODEL, else "
                          "the shipped shapes model); requests can never name another")
    srv.add_argument("--backend", default="torch", help="torch, triton, compile, onnxruntime or tensorrt")
    srv.add_argument("--replicas", type=int, default=1, help="pipeline replicas, one GPU each where there are GPUs")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs $SDFAST_API_KEY)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--address", default=None, help="join this Ray cluster (e.g. 10.0.0.1:6379) instead of "
                     "starting a local one")
    srv.add_argument("--gpus", default="auto", help="auto (one per replica when the cluster has GPUs), 0 or 1")
    srv.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on a GPU, fp32 on the CPU)")
    srv.add_argument("--max-batch", type=int, default=4, help="images per batched call (1: no batching)")
    srv.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for batch-mates")
    srv.add_argument("--max-queued", type=int, default=16, help="requests waiting for a replica before 503s")
    srv.add_argument("--lora-dir", default=None, help="folder of .safetensors LoRAs requests may name by file stem "
                     '({"loras": {"NAME": SCALE}})')
    srv.add_argument("--max-loaded-loras", type=int, default=8, help="LoRAs each replica keeps loaded")
    srv.add_argument("--controlnet-dir", default=None, help="folder of ControlNets requests may name (diffusers "
                     'sub-folders by name, .safetensors / .pth files by stem: {"controls": [{"model": "NAME", '
                     '"image": BASE64}]}); each replica loads them all at start')
    srv.add_argument("--max-controlnets", type=int, default=8, help="refuse a --controlnet-dir holding more "
                     "(every replica holds each one on its device)")


def run_serve(args) -> None:
    import signal
    import threading

    from ..serve import require_serve
    from ..serve.options import ServeOptions

    require_serve()
    if args.model and not Path(args.model).exists():
        raise ValueError(f"model {args.model} does not exist")
    options = ServeOptions(model=args.model, backend=args.backend, replicas=args.replicas, host=args.host,
                           port=args.port, gpus=args.gpus, dtype=args.dtype, max_batch=args.max_batch,
                           batch_wait_s=args.batch_wait_ms / 1e3, max_queued_requests=args.max_queued,
                           lora_dir=args.lora_dir, max_loaded_loras=args.max_loaded_loras,
                           controlnet_dir=args.controlnet_dir, max_controlnets=args.max_controlnets)
    from ray import serve

    from ..serve.app import APP_NAME, start

    try:
        start(options, address=args.address)
    except RuntimeError as e:  # Ray Serve's "Deploying application ... failed", with the replica's traceback
        raise ValueError(f"the application did not start: {str(e).strip().splitlines()[-1]}") from e
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    print(f"sdfast serve: http://{args.host}:{args.port} ({args.replicas} replica(s) of "
          f"{args.model or 'the default model'}, backend {args.backend}); Ctrl-C drains and stops", flush=True)
    stop.wait()
    print("sdfast serve: draining in-flight requests, then stopping", flush=True)
    serve.delete(APP_NAME)  # replicas finish what they hold while the proxy still delivers the answers
    serve.shutdown()
