"""The ``sdfast`` command. One module per group of subcommands, each adding its parsers and handlers:

| module | commands |
|---|---|
| ``images`` | ``generate``, ``img2img``, ``interpolate`` |
| ``noise`` | ``noise`` |
| ``deploy`` | ``export``, ``build`` |
| ``serve`` | ``serve`` |
| ``bench`` | ``bench`` |

Without ``--model`` (or ``$SDFAST_MODEL``) the image commands run the small shapes model that ships with sdfast.
Bad input prints one line naming the problem and exits with code 2; nothing reaches the user as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, deploy, images, noise, serve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfast", description="Fast, measured Stable Diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (images, noise, deploy, serve, bench):
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..request import RequestError

    args = _parser().parse_args(argv)
    try:
        status = args.handler(args)
    except RequestError as e:  # in the command line's words: --steps 0, not steps=0
        print(f"sdfast {args.command}: error: {e.worded(images.FLAGS)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # CheckpointError is a ValueError
        print(f"sdfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed (disk full, a file-size limit): the old file is left as it was
        print(f"sdfast {args.command}: error: {e}", file=sys.stderr)
        return 1
    return status or 0  # a command may return its own exit code (bench --compare: 1 on a regression)
