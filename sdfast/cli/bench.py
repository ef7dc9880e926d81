"""``sdfast bench``: the latency of every backend beside diffusers' pipeline, and comparing two runs; see
``sdfast.bench``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..files import write_atomically


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="latency per network and step across backends, beside diffusers'")
    bench.set_defaults(handler=run_bench)
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
    bench.add_argument("--lora-rank", type=int, default=0,
                       help="also time applying / removing a random LoRA of this rank on each backend (e.g. 64)")
    bench.add_argument("--controlnet", action="store_true",
                       help="every row with one ControlNet (a random copy of the U-Net's encoder), the baseline "
                       "with diffusers' ControlNet pipeline")
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

    from ..bench import report
    from ..bench.arch import preset, random_model
    from ..bench.run import Settings
    from ..bench.run import run as benchmark

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
        peak=args.peak, lora_rank=args.lora_rank,
        controlnet=args.controlnet)
    settings.check()
    if args.arch:
        preset(args.arch)  # an unknown name fails before anything is written
        from ..backends import cache_dir

        model, label = random_model(args.arch, cache_dir() / "random"), f"{args.arch} (random weights)"
    else:
        from ..loading import DEFAULT_MODEL

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

    def save_report(result: dict) -> None:  # after every backend, so a run that is killed keeps what it measured
        write_atomically(args.out, json.dumps(result, indent=1))

    result = benchmark(model, settings, label=label, command=command, on_rows=save_report)
    save_report(result)
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
