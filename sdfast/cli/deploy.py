"""``sdfast export`` (ONNX graphs, checked on ONNX Runtime) and ``sdfast build`` (TensorRT engines from them);
see ``sdfast.export``."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path


def add_parsers(sub) -> None:
    exp = sub.add_parser("export", help="ONNX graphs of the three networks, checked on ONNX Runtime")
    exp.set_defaults(handler=run_export)
    exp.add_argument("model", nargs="?", default=os.environ.get("SDFAST_MODEL"),
                     help="diffusers folder or original-layout .safetensors/.ckpt (default: $SDFAST_MODEL, else the "
                          "shapes model that ships with sdfast, as for generate)")
    exp.add_argument("-o", "--output", type=Path, required=True, help="folder for the graphs and manifest.json")
    exp.add_argument("--dtype", default="fp32", help="fp32 or fp16 graphs (default fp32)")
    exp.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21: GroupNormalization)")
    exp.add_argument("--controlnet", action="append", default=[], type=Path, metavar="PATH",
                     help="also export this ControlNet (diffusers folder or original file; repeatable) as "
                          "controlnet_NAME.onnx, NAME its file or folder name, and the U-Net that takes its "
                          "residuals (unet_control.onnx: a second copy of the U-Net's weights)")
    exp.add_argument("--no-check", dest="check", action="store_false",
                     help="skip the parity check of each graph on ONNX Runtime against the torch model (seconds per "
                          "network at small shapes): a graph that computes something else is then not caught here")
    build = sub.add_parser("build", help="TensorRT engines from a folder written by `sdfast export`")
    build.set_defaults(handler=run_build)
    build.add_argument("folder", type=Path)
    build.add_argument("--sizes", nargs="+", default=None,
                       help="image sizes, one optimisation profile each: WxH or a WxH-WxH range "
                            "(default: the model's own size)")
    build.add_argument("--batch", nargs="+", type=int, default=[1], help="smallest and largest batch (default 1)")
    build.add_argument("--prompt-chunks", type=int, default=1, help="77-token chunks per prompt, for long prompts")
    build.add_argument("--fp16", action="store_true", help="fp16 engines (from an fp16 export, or full "
                       "TensorRT's mixed precision on fp32 graphs)")
    build.add_argument("--networks", nargs="+", default=None,
                       help="build only these graphs, e.g. unet vae_decoder (default: every graph of the export)")


def run_export(args) -> None:
    import sdfast
    from sdfast.export.memory import peak_rss
    from sdfast.export.onnx import export_pipeline

    if args.dtype not in ("fp32", "fp16"):
        raise ValueError(f"--dtype {args.dtype}: ONNX export writes fp32 or fp16 graphs")
    if args.model and not Path(args.model).exists():
        raise ValueError(f"model {args.model} does not exist")
    start = time.perf_counter()
    names = [path.stem for path in args.controlnet]
    clash = next((name for name in names if names.count(name) > 1), None)
    if clash is not None:
        raise ValueError(f"--controlnet: two ControlNets are named {clash!r} (the graph's name is the file's or "
                         "folder's name): rename one")
    pipe = sdfast.load(args.model or None, device="cpu", dtype=args.dtype)
    if peak_rss():  # the rest of the command's peak is on each network's line
        print(f"{args.model or 'the shipped model'} loaded in {time.perf_counter() - start:.0f} s, "
              f"peak RSS {peak_rss() / 2**30:.1f} GiB")
    manifest = export_pipeline(pipe, args.output, opset=args.opset, check_graphs=args.check, log=print,
                               controlnets=_controlnets(pipe, args.controlnet))
    if args.check:
        checks = {name: net["check"] for name, net in manifest["networks"].items()}
        errors = [err for c in checks.values() if "rel_err" in c for err in c["rel_err"].values()]
        skipped = [name for name, c in checks.items() if "skipped" in c]
        checked = f"largest relative error on ONNX Runtime {max(errors):.1e}" if errors else ""
        if skipped:  # a check that would not have fit in memory (the line above each says how much it needed)
            checked += f"{'; ' if checked else ''}not checked for lack of memory: {', '.join(skipped)}"
    else:
        checked = ("not checked (--no-check): no graph was run against the torch model, so a wrong graph (an op "
                   "exported wrongly, a frozen axis, fp16 overflow) shows only when it is used")
    print(f"{args.output}: {len(manifest['networks'])} graphs ({args.dtype}, opset {args.opset}) and manifest.json "
          f"in {time.perf_counter() - start:.0f} s; {checked}")


def _controlnets(pipe, paths: list[Path]) -> Mapping | None:
    """``--controlnet`` as {name: ControlNet}, each loaded on the CPU in the export's dtype when its graph is
    exported (one in memory at a time), all checked first (each file's keys and shapes, and that it fits the model)
    without loading them; None when none is given (then no controlled U-Net is written)."""
    from sdfast.control.controls import check_fits
    from sdfast.control.loading import ControlNetFiles, check_controlnet

    if not paths:
        return None
    for path in paths:
        try:
            check_fits(pipe.unet.config, check_controlnet(path))
        except ValueError as e:
            raise ValueError(f"--controlnet {path}: {e}") from None
    return ControlNetFiles({path.stem: path for path in paths}, pipe.dtype)


def run_build(args) -> None:
    from sdfast.export.flavour import flavour, gpu
    from sdfast.export.manifest import read_manifest
    from sdfast.export.profiles import Shapes
    from sdfast.export.tensorrt import build_engines

    from ..models import image_side

    if not args.folder.is_dir():
        raise ValueError(f"export folder {args.folder} does not exist: run `sdfast export MODEL -o FOLDER` first")
    configs = read_manifest(args.folder)["configs"]
    side = image_side(configs["unet"]["sample_size"], len(configs["vae"]["block_channels"]))
    shapes = Shapes.parse(args.sizes or [f"{side}x{side}"], args.batch, args.prompt_chunks)
    start = time.perf_counter()
    engines = build_engines(args.folder, shapes, fp16=args.fp16, networks=args.networks, log=print)
    info = flavour()
    built = sum(not e.cached for e in engines.values())
    print(f"{args.folder / 'engines'}: {built} built, {len(engines) - built} from the cache, with "
          f"{info['flavour']} {info['version']} (GPU: {gpu()}), in {time.perf_counter() - start:.1f} s")
