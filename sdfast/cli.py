"""The ``sdfast`` command: ``generate`` (text to image), ``img2img`` and ``interpolate`` (a strip of frames
morphing one prompt's image into another's).

Without ``--model`` (or ``$SDFAST_MODEL``) it runs the small shapes model that ships with sdfast.

Bad input (size, steps, scheduler, strength, unreadable image, missing or broken model) prints one line naming
the problem and exits with code 2; nothing reaches the user as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfast", description="Fast, measured Stable Diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    base = _base_options("out.png", "output PNG (with --batch N: out-0.png, ...)", None,
                         "default: random (printed, to reproduce)")
    common = argparse.ArgumentParser(add_help=False, parents=[base])
    common.add_argument("--batch", type=int, default=1, help="images per prompt")
    common.add_argument("--clip-skip", type=int, default=1, help="1 = last CLIP layer, 2 = penultimate, ...")
    common.add_argument("--long-prompts", action="store_true", help="encode prompts over 75 tokens in chunks")
    common.add_argument("--previews", type=Path, default=None, help="folder for step-by-step previews")
    common.add_argument("--preview-every", type=int, default=1, help="with --previews: every N steps")
    common.add_argument("--timings", type=Path, default=None, help="write the per-step timings as JSON here")
    common.add_argument("--backend", default="torch", help="torch, triton, compile, onnxruntime or tensorrt "
                        "(for the last two --model may be a folder written by `sdfast export`)")

    gen = sub.add_parser("generate", parents=[common], help="text to image")
    gen.add_argument("prompt")
    i2i = sub.add_parser("img2img", parents=[common], help="image to image")
    i2i.add_argument("image", type=Path)
    i2i.add_argument("prompt")
    i2i.add_argument("--strength", type=float, default=0.8, help="0: keep the image, 1: ignore it")
    # a fixed default seed: the same command redraws the same strip
    inter = sub.add_parser("interpolate", parents=[_base_options("strip.png", "output PNG", 0, "noise of the first "
                           "frame (default: 0)")], help="a strip of frames from one prompt to another")
    inter.add_argument("prompt_a")
    inter.add_argument("prompt_b")
    inter.add_argument("--frames", type=int, default=8, help="frames in the strip, both ends included")
    inter.add_argument("--seed-b", type=int, default=None, help="noise of the last frame (default: --seed's)")
    _deployment_parsers(sub)
    _serve_parser(sub)
    _bench_parser(sub)
    return parser


def _base_options(output: str, output_help: str, seed: int | None, seed_help: str) -> argparse.ArgumentParser:
    """The options every image command takes, as a parent parser. One fresh parser per command: argparse shares a
    parent's option objects between its children, so a default set for one command would change the others'."""
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("-o", "--output", default=output, help=output_help)
    base.add_argument("--model", default=os.environ.get("SDFAST_MODEL"),
                      help="diffusers folder or original-layout .safetensors/.ckpt (default: $SDFAST_MODEL, "
                           "else the shapes model that ships with sdfast)")
    base.add_argument("--negative", default=None, help="negative prompt")
    base.add_argument("--steps", type=int, default=30)
    base.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    base.add_argument("--scheduler", default="euler")
    base.add_argument("--seed", type=int, default=seed, help=seed_help)
    base.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's size)")
    base.add_argument("--height", type=int, default=None)
    base.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    base.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    return base


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _check_args(args) -> None:
    """Everything that can be checked before the (slow) model load."""
    from .interpolate import STOCHASTIC_SCHEDULERS
    from .schedulers import SCHEDULERS

    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--{name} {value} is not a positive multiple of 8")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: need at least 1")
    if getattr(args, "batch", 1) < 1:
        raise ValueError(f"--batch {args.batch}: need at least 1")
    suffix = Path(args.output).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"-o {args.output}: the file name must end in one of {', '.join(IMAGE_SUFFIXES)} "
                         "(it picks the image format)")
    if getattr(args, "previews", None) and args.preview_every < 1:
        raise ValueError(f"--preview-every {args.preview_every} with --previews: need a step interval >= 1")
    if args.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown --scheduler {args.scheduler!r}; choose one of {', '.join(sorted(SCHEDULERS))}")
    if args.command == "interpolate":
        if args.frames < 2:
            raise ValueError(f"--frames {args.frames}: need at least 2 (the two ends)")
        if args.scheduler in STOCHASTIC_SCHEDULERS:
            raise ValueError(f"--scheduler {args.scheduler} adds fresh noise at every step; interpolate with a "
                             "deterministic one (euler, ddim, dpmpp_2m, ...)")
    if args.command == "img2img":
        if not 0.0 <= args.strength <= 1.0:
            raise ValueError(f"--strength {args.strength} is outside [0, 1]")
        if not args.image.is_file():
            raise ValueError(f"input image {args.image} does not exist")
        try:
            with Image.open(args.image) as im:
                im.verify()
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot read image {args.image}: {e}") from e
    if args.model and not Path(args.model).exists():
        raise ValueError(f"model {args.model} does not exist")


def _outputs(path: str, n: int) -> list[Path]:
    p = Path(path)
    return [p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]


def run(args) -> None:
    import torch

    import sdfast

    _check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    exported = args.model and (Path(args.model) / "manifest.json").is_file()  # runs in its export's dtype
    dtype = args.dtype or (None if exported else "fp16" if device.startswith("cuda") else "fp32")
    pipe = sdfast.load(args.model or None, device=device, dtype=dtype, backend=getattr(args, "backend", "torch"))
    if args.command == "interpolate":
        run_interpolate(pipe, args)
        return
    image = args.image if args.command == "img2img" else None
    # no total: img2img and two-evaluation schedulers (heun) run a different number of model calls than --steps
    bar = tqdm(desc="denoising", unit="step", file=sys.stderr, leave=False)

    def progress(step, t, latents):
        bar.update(1)

    try:
        result = pipe.generate(
            args.prompt, args.negative, width=args.width, height=args.height, steps=args.steps,
            guidance_scale=args.guidance, scheduler=args.scheduler, seed=args.seed, batch_size=args.batch,
            clip_skip=args.clip_skip, image=image, strength=getattr(args, "strength", 0.8),
            long_prompts=args.long_prompts, preview_every=args.preview_every if args.previews else 0,
            callback=progress)
    finally:
        bar.close()
    outputs = _outputs(args.output, len(result.images))
    for im, path in zip(result.images, outputs):
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    if args.previews:
        args.previews.mkdir(parents=True, exist_ok=True)
        for step, images in result.previews:
            for i, im in enumerate(images):
                im.save(args.previews / f"step{step:03d}" f"{'' if len(images) == 1 else f'-{i}'}.png")
    if args.timings:
        args.timings.write_text(json.dumps({"seed": result.seed, **result.timings.to_dict()}, indent=1))
    print(f"{', '.join(map(str, outputs))} (seed {result.seed}): {result.timings.summary()}")


def run_interpolate(pipe, args) -> None:
    from .interpolate import interpolate, strip

    start = time.perf_counter()
    frames = interpolate(pipe, args.prompt_a, args.prompt_b, args.frames, seed=args.seed, seed_b=args.seed_b,
                         steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                         negative_prompt=args.negative, width=args.width, height=args.height)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    strip(frames).save(output)
    print(f"{output}: {len(frames)} frames, {args.prompt_a!r} -> {args.prompt_b!r} (seed {args.seed}"
          f"{'' if args.seed_b is None else f', {args.seed_b}'}), {time.perf_counter() - start:.1f} s")


# -- deployment: `sdfast export` (ONNX graphs) and `sdfast build` (TensorRT engines); see sdfast.export --


def _deployment_parsers(sub) -> None:
    exp = sub.add_parser("export", help="ONNX graphs of the three networks, checked on ONNX Runtime")
    exp.add_argument("model", help="diffusers folder or original-layout .safetensors/.ckpt")
    exp.add_argument("-o", "--output", type=Path, required=True, help="folder for the graphs and manifest.json")
    exp.add_argument("--dtype", default="fp32", help="fp32 or fp16 graphs (default fp32)")
    exp.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21: GroupNormalization)")
    build = sub.add_parser("build", help="TensorRT engines from a folder written by `sdfast export`")
    build.add_argument("folder", type=Path)
    build.add_argument("--sizes", nargs="+", default=None,
                       help="image sizes, one optimisation profile each: WxH or a WxH-WxH range "
                            "(default: the model's own size)")
    build.add_argument("--batch", nargs="+", type=int, default=[1], help="smallest and largest batch (default 1)")
    build.add_argument("--prompt-chunks", type=int, default=1, help="77-token chunks per prompt, for long prompts")
    build.add_argument("--fp16", action="store_true", help="fp16 engines (from an fp16 export, or full "
                       "TensorRT's mixed precision on fp32 graphs)")


def run_export(args) -> None:
    import sdfast
    from sdfast.export.onnx import export_pipeline

    if args.dtype not in ("fp32", "fp16"):
        raise ValueError(f"--dtype {args.dtype}: ONNX export writes fp32 or fp16 graphs")
    if not Path(args.model).exists():
        raise ValueError(f"model {args.model} does not exist")
    start = time.perf_counter()
    pipe = sdfast.load(args.model, device="cpu", dtype=args.dtype)
    manifest = export_pipeline(pipe, args.output, opset=args.opset, log=print)
    worst = max(err for net in manifest["networks"].values() for err in net["check"]["rel_err"].values())
    print(f"{args.output}: {len(manifest['networks'])} graphs ({args.dtype}, opset {args.opset}) and manifest.json "
          f"in {time.perf_counter() - start:.0f} s; largest relative error on ONNX Runtime {worst:.1e}")


def run_build(args) -> None:
    from sdfast.export.onnx import read_manifest
    from sdfast.export.tensorrt import Shapes, build_engines, flavour, gpu

    if not args.folder.is_dir():
        raise ValueError(f"export folder {args.folder} does not exist: run `sdfast export MODEL -o FOLDER` first")
    configs = read_manifest(args.folder)["configs"]
    side = configs["unet"]["sample_size"] * 2 ** (len(configs["vae"]["block_channels"]) - 1)
    shapes = Shapes.parse(args.sizes or [f"{side}x{side}"], args.batch, args.prompt_chunks)
    start = time.perf_counter()
    engines = build_engines(args.folder, shapes, fp16=args.fp16, log=print)
    info = flavour()
    built = sum(not e.cached for e in engines.values())
    print(f"{args.folder / 'engines'}: {built} built, {len(engines) - built} from the cache, with "
          f"{info['flavour']} {info['version']} (GPU: {gpu()}), in {time.perf_counter() - start:.1f} s")


# -- `sdfast serve`: an HTTP service on Ray Serve; see sdfast.serve --


def _serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="an HTTP service on Ray Serve (POST /v1/txt2img, /v1/img2img)")
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


def run_serve(args) -> None:
    import signal
    import threading

    from .serve import require_serve
    from .serve.options import ServeOptions

    require_serve()
    if args.model and not Path(args.model).exists():
        raise ValueError(f"model {args.model} does not exist")
    options = ServeOptions(model=args.model, backend=args.backend, replicas=args.replicas, host=args.host,
                           port=args.port, gpus=args.gpus, dtype=args.dtype, max_batch=args.max_batch,
                           batch_wait_s=args.batch_wait_ms / 1e3, max_queued_requests=args.max_queued)
    from ray import serve

    from .serve.app import APP_NAME, start

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


# -- `sdfast bench`: latency of every backend beside diffusers' pipeline, and comparing runs; see sdfast.bench --


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="latency per network and step across backends, beside diffusers'")
    which = bench.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="diffusers folder, .safetensors/.ckpt or `sdfast export` "
                       "folder (default: $SDFAST_MODEL, else the shipped shapes model)")
    which.add_argument("--arch", default=None, help="sd15, sd21, sdxl, tiny or tiny-sdxl: random weights at those "
                       "shapes, no checkpoint needed (written once under $SDFAST_CACHE/random, ~2 GB for sd15, "
                       "~7 GB for sdxl)")
    which.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                       help="two --out JSON files: ratios new/old; exit code 1 on a regression")
    bench.add_argument("--threshold", type=float, default=0.05,
                       help="with --compare: a median step or end to end slower by more than this is a regression")
    bench.add_argument("--backends", default="torch", help="comma-separated: torch, triton, compile, onnxruntime, "
                       "tensorrt (one that cannot run here is reported as skipped, with the reason); options as "
                       "NAME:OPTION=VALUE, e.g. triton:kernels=off (CUDA graphs without the kernels), "
                       "triton:autotune=full")
    bench.add_argument("--sizes", default=None, help="comma-separated image sizes, 512 or WxH (default: the "
                       "model's own)")
    bench.add_argument("--batch", default="1", help="comma-separated images per call, e.g. 1,4")
    bench.add_argument("--steps", type=int, default=30)
    bench.add_argument("--scheduler", default="euler")
    bench.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on cuda, fp32 on cpu)")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed generations per configuration")
    bench.add_argument("--repeat", type=int, default=3, help="timed generations per configuration")
    bench.add_argument("--no-baseline", action="store_true", help="leave out diffusers' StableDiffusionPipeline")
    bench.add_argument("--compiled-baseline", action="store_true",
                       help="also time diffusers with its U-Net compiled (channels-last, fused QKV, torch.compile)")
    bench.add_argument("--compile-mode", default=None,
                       help="torch.compile mode of the compile backend and the compiled baseline (default: the "
                       "compile backend's max-autotune; reduce-overhead compiles in a fraction of its time)")
    bench.add_argument("--compiler", default="inductor",
                       help="torch.compile backend (inductor; eager only traces, for smoke runs on a CPU)")
    bench.add_argument("--peak", default="datasheet", help="what fraction_of_peak divides by: datasheet (the GPU's "
                       "published dense fp16 rate), measure (a matmul timed at the start), or TFLOP/s")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", type=Path, default=Path("bench.json"),
                       help="the JSON report; the markdown table (.md) and the chart (.png) are written beside it")
    bench.add_argument("--no-chart", action="store_true", help="skip the PNG chart (it needs matplotlib)")


def _bench_list(text: str, parse, what: str) -> tuple:
    try:
        return tuple(parse(item.strip()) for item in text.split(",") if item.strip())
    except ValueError as e:
        raise ValueError(f"--{what} {text!r}: {e}") from e


def _bench_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def run_bench(args) -> int:
    import shlex

    import torch

    from .bench import report
    from .bench.arch import preset, random_model
    from .bench.run import Settings
    from .bench.run import run as benchmark

    if args.compare:
        table, regressions = report.compare(*(report.read(p) for p in args.compare), threshold=args.threshold)
        print(table)
        print("\n".join(f"regression: {r}" for r in regressions) or "no regression")
        return 1 if regressions else 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(
        backends=_bench_list(args.backends, str, "backends"), batches=_bench_list(args.batch, int, "batch"),
        sizes=_bench_list(args.sizes, _bench_size, "sizes") if args.sizes else (), steps=args.steps,
        scheduler=args.scheduler, dtype=args.dtype or ("fp16" if device.startswith("cuda") else "fp32"),
        device=device, warmup=args.warmup, repeat=args.repeat, baseline=not args.no_baseline, seed=args.seed,
        compiled_baseline=args.compiled_baseline, compile_mode=args.compile_mode, compiler=args.compiler,
        peak=args.peak)
    settings.check()
    if args.arch:
        preset(args.arch)  # an unknown name fails before anything is written
        from .backends import cache_dir

        model, label = random_model(args.arch, cache_dir() / "random"), f"{args.arch} (random weights)"
    else:
        from .pipeline import DEFAULT_MODEL

        model = Path(args.model or os.environ.get("SDFAST_MODEL") or DEFAULT_MODEL)
        label = model.name
    source = ["--arch", args.arch] if args.arch else ["--model", str(model)]
    command = shlex.join(["sdfast", "bench", *source, "--backends", ",".join(settings.backends),
                          *(["--sizes", args.sizes] if args.sizes else []), "--batch", args.batch,
                          "--steps", str(settings.steps), "--scheduler", settings.scheduler,
                          "--dtype", settings.dtype, "--device", device, "--warmup", str(settings.warmup),
                          "--repeat", str(settings.repeat), "--seed", str(settings.seed),
                          *(["--no-baseline"] if args.no_baseline else []),
                          *(["--compiled-baseline"] if args.compiled_baseline else []),
                          *(["--compile-mode", args.compile_mode] if args.compile_mode else []),
                          *(["--compiler", args.compiler] if args.compiler != "inductor" else []),
                          *(["--peak", args.peak] if args.peak != "datasheet" else [])])
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:  # after every backend, so a run that is killed keeps what it measured
        partial = args.out.with_name(f".{args.out.name}.partial")
        partial.write_text(json.dumps(result, indent=1))
        partial.replace(args.out)

    result = benchmark(model, settings, label=label, command=command, on_rows=save)
    save(result)
    table = report.markdown(result)
    args.out.with_suffix(".md").write_text(table)
    written = [args.out, args.out.with_suffix(".md")]
    if not args.no_chart:
        if report.HAS_MATPLOTLIB:
            written.append(report.chart(result, args.out.with_suffix(".png")))
        else:
            print('sdfast bench: no chart: matplotlib is not installed (pip install "sdfast[bench]")',
                  file=sys.stderr)
    print(table)
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = {"export": run_export, "build": run_build, "serve": run_serve,
                  "bench": run_bench}.get(args.command, run)(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # CheckpointError is a ValueError
        print(f"sdfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return status or 0  # a command may return its own exit code (bench --compare: 1 on a regression)


if __name__ == "__main__":
    sys.exit(main())
