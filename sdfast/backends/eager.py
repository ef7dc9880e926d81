"""The ``torch`` backend: the PyTorch modules as loaded, eager, with SDPA attention. The reference every other
backend is checked against; the identity step."""

from __future__ import annotations

import torch

IN_PLACE = True


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32


def prepare(pipe, device: torch.device, **options):
    if options:
        raise ValueError(f"the torch backend takes no options (got {sorted(options)})")
    return pipe
