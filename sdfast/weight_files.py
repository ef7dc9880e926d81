"""Weight files read one tensor at a time: safetensors memory-mapped (never read whole), pickled checkpoints through
``weights_only=True`` only. Every failure is a ``CheckpointError`` naming the file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unknown layout, corrupt, or not matching the network."""


class WeightFile:
    """Tensors of one or more files, read one tensor at a time (safetensors: memory-mapped, never read whole)."""

    def __init__(self, paths: Iterable[Path]):
        self._where: dict[str, object] = {}  # key -> open safe_open handle or a loaded dict
        self.paths = list(paths)
        for path in self.paths:
            if not path.is_file():
                raise CheckpointError(f"weight file {path} does not exist")
            if path.suffix == ".safetensors":
                try:
                    handle = safe_open(str(path), framework="pt", device="cpu")
                except (SafetensorError, OSError, ValueError) as e:
                    raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
                for key in handle.keys():
                    self._where[key] = handle
            elif path.suffix in (".bin", ".ckpt", ".pt", ".pth"):
                state = _torch_load(path)
                for key in state:
                    self._where[key] = state
            else:
                raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; "
                                      "expected .safetensors, .bin, .ckpt, .pt or .pth")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        where = self._where[key]
        if isinstance(where, dict):
            return tuple(where[key].shape)
        return tuple(where.get_slice(key).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.shape(key) for key in self._where}

    def get(self, key: str) -> torch.Tensor:
        where = self._where[key]
        if isinstance(where, dict):
            return where[key]
        try:
            return where.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.paths[0]} (truncated or corrupt?): {e}") from e


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint, through ``weights_only=True`` only: it can hold no code. Memory-mapped when possible."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"{path} cannot be read as a weights-only torch checkpoint "
                              f"(corrupt, truncated, or it contains code objects): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    step = state.get("global_step")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # CompVis .ckpt files wrap the weights, with the training step beside them
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if isinstance(step, int) and "global_step" not in tensors:
        tensors["global_step"] = torch.tensor(step)  # read back by _global_step (SD 2.x epsilon vs v)
    return tensors
