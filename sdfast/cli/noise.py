"""``sdfast noise IMAGE``: the forward process the sampler undoes, as a strip (``sdfast.noising``)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .images import _check_output, _save_image


def add_parsers(sub) -> None:
    noise = sub.add_parser("noise", help="an image noised as training sees it, at chosen timesteps (a strip)")
    noise.set_defaults(handler=run)
    noise.add_argument("image", type=Path)
    noise.add_argument("-o", "--output", default="noise.png", help="output PNG: one frame per timestep")
    noise.add_argument("--timesteps", default="0,100,250,500,750,999", type=_timesteps,
                       help="comma-separated training timesteps, 0 (the image) .. 999 (noise)")
    noise.add_argument("--model", default=os.environ.get("SDFAST_MODEL"),
                       help="whose VAE and schedule (default: $SDFAST_MODEL, else the shipped shapes model)")
    noise.add_argument("--seed", type=int, default=0, help="the noise (and the VAE's posterior sample)")


def _timesteps(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: need comma-separated integers, e.g. 0,250,500,999") from None
    if not values:
        raise argparse.ArgumentTypeError("need at least one timestep, e.g. 0,250,500,999")
    return values


def run(args) -> None:
    import sdfast

    from ..interpolate import strip
    from ..noising import forward_process

    output = Path(args.output)
    _check_output(output)
    if not args.image.is_file():
        raise ValueError(f"IMAGE {args.image}: no such file")
    start = time.perf_counter()
    frames = forward_process(sdfast.load(args.model or None), args.image, args.timesteps, seed=args.seed)
    _save_image(strip(frames), output)
    print(f"{output}: {len(frames)} frames at timesteps {', '.join(map(str, args.timesteps))} "
          f"({time.perf_counter() - start:.1f} s)")
