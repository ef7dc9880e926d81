"""The ``torch`` backend: the PyTorch modules as loaded, eager, with SDPA attention. The reference every other
backend is checked against; the identity step."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

IN_PLACE = True


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32


def prepare(pipe, device: torch.device, **options):
    if options:
        raise ValueError(f"the torch backend takes no options (got {sorted(options)})")
    return dataclasses.replace(pipe, control_step=as_loaded)


def as_loaded(net: nn.Module) -> nn.Module:
    """ControlNets run as loaded, like the other networks."""
    return net
