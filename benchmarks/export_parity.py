"""The onnxruntime backend against the torch backend on a full-size export: a model at SD 1.5's released shapes
(random weights, the model ``sdfast bench --arch sd15`` writes), exported in fp32, generating a few steps at 256 px on
this machine's CPU. Reports the latents' relative L2 error and the pixels' largest difference; exits 1 past 1e-4 or
1/255, so the path from `sdfast export` to the onnxruntime backend cannot regress unseen at full size.

    python benchmarks/export_parity.py --export /tmp/sd15-onnx --out benchmarks/results/cpu-export-parity-sd15

Exports into ``--export`` first unless it already holds an export of the same weights (``sdfast export`` checks
each graph as it goes). Writes OUT.json and OUT.md.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sdfast
from sdfast.backends import cache_dir
from sdfast.bench.arch import random_model

LATENT_TOL = 1e-4
PIXEL_TOL = 1  # out of 255


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15", help="the released shapes to use (sdfast bench --arch)")
    p.add_argument("--model", type=Path, default=None, help="a model of your own instead of --arch's (e.g. the "
                   "folder `sdfast bench --arch sd15` wrote, sd15-seed0)")
    p.add_argument("--export", type=Path, required=True, help="the fp32 export folder (written if need be)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    from sdfast.export.errors import ExportError
    from sdfast.export.manifest import read_manifest, weights_hash
    from sdfast.export.onnx import export_pipeline

    model = args.model or random_model(args.arch, cache_dir() / "random")
    torch_pipe = sdfast.load(model)
    try:
        exported = read_manifest(args.export)["model_hash"] == weights_hash(torch_pipe)
    except ExportError:
        exported = False
    export_s = None
    if not exported:
        start = time.perf_counter()
        export_pipeline(torch_pipe, args.export, log=print)
        export_s = time.perf_counter() - start
    request = {"steps": args.steps, "seed": args.seed, "width": args.size, "height": args.size}
    prompt = "a photograph of an astronaut riding a horse"
    start = time.perf_counter()
    want = torch_pipe.generate(prompt, **request)
    torch_s = time.perf_counter() - start
    del torch_pipe  # the fp32 U-Net and the ONNX Runtime sessions do not need to share the memory
    ort_pipe = sdfast.load(args.export, backend="onnxruntime")
    start = time.perf_counter()
    got = ort_pipe.generate(prompt, **request)
    ort_s = time.perf_counter() - start
    latent_err = rel_err(got.latents, want.latents)
    pixel_diff = int(np.abs(np.stack(got.images).astype(int) - np.stack(want.images).astype(int)).max())
    ok = latent_err < LATENT_TOL and pixel_diff <= PIXEL_TOL
    result = {"model": Path(model).name, "export": str(args.export),
              "request": {"prompt": prompt, **request}, "latent_rel_err": latent_err, "pixel_max_diff": pixel_diff,
              "tolerances": {"latent_rel_err": LATENT_TOL, "pixel_max_diff": PIXEL_TOL}, "ok": ok,
              "seconds": {"export": export_s and round(export_s, 1), "torch": round(torch_s, 1),
                          "onnxruntime": round(ort_s, 1)},
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__}
    lines = [f"## onnxruntime backend vs torch backend, {result['model']} (fp32 export, CPU)", "",
             "| size | steps | latents rel. error | largest pixel difference | torch s | onnxruntime s | ok |",
             "|---|---|---|---|---|---|---|",
             (f"| {args.size} px | {args.steps} | {latent_err:.1e} | {pixel_diff}/255 | {torch_s:.1f} | {ort_s:.1f} | "
              f"{'yes' if ok else 'NO'} |"), "",
             (f"Tolerances: latents {LATENT_TOL:g}, pixels {PIXEL_TOL}/255. {result['machine']}, "
              f"torch {torch.__version__}.")]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
