"""Backends: model -> model steps that replace a pipeline's three networks, behind the same call signatures.

| backend | what runs | needs |
|---|---|---|
| ``torch`` | the PyTorch modules (the identity step) | - |
| ``onnxruntime`` | the exported ONNX graphs on ONNX Runtime (CUDA provider + IO binding + CUDA graphs, or CPU) | ``sdfast[onnx]`` |
| ``tensorrt`` | TensorRT engines built from those graphs, on a CUDA GPU | ``tensorrt`` or TensorRT-RTX |
| ``triton`` | the torch modules with sdfast's Triton kernels at the seams, fused QKV, CUDA graphs (``triton.py``) | ``triton`` |
| ``compile`` | the same prepared U-Net through ``torch.compile(mode="max-autotune")`` (``compile.py``) | - |

``apply(name, pipe)`` exports a loaded torch pipeline (once: the graphs are cached by the weights' hash) and swaps in
the backend's networks; ``load_export(folder, name)`` loads a folder written by ``sdfast export`` with no torch
weights at all. Either way ``Pipeline.generate``, the sampler and the CLI run unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint import read_json
from ..models import CLIPTextConfig, UNetConfig, VAEConfig
from ..tokenizer import Tokenizer
from . import graphs

BACKENDS = ("torch", "onnxruntime", "tensorrt", "triton", "compile")
# Backends that run the torch modules themselves, so load() builds them on the target device (the others export
# their graphs from a CPU copy).
IN_PLACE = ("torch", "triton", "compile")


def cache_dir() -> Path:
    """Where checkpoints exported on the fly are kept: ``$SDFAST_CACHE``, else ``~/.cache/sdfast``."""
    return Path(os.environ.get("SDFAST_CACHE") or "~/.cache/sdfast").expanduser()


def check(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def apply(name: str, pipe, *, device=None, cache: str | Path | None = None, opset: int | None = None,
          **options):
    """``pipe`` (torch, on the CPU) with its networks replaced by backend ``name``'s, on ``device`` (default: the
    pipeline's). The graphs are exported once into ``cache`` (default ``cache_dir()/onnx``) under the weights'
    hash and reused after; the tensorrt backend also builds its engines there, for the model's own size at batch 1
    unless told otherwise (``sizes``, ``batch``). ``options`` go to the backend. ``torch`` returns ``pipe``."""
    check(name)
    if name == "torch":
        if options or cache is not None or opset is not None:
            raise ValueError(f"the torch backend takes no options (got {sorted(options) or 'cache/opset'})")
        if device is not None and torch.device(device) != pipe.device:
            raise ValueError(f"the pipeline is on {pipe.device}, not {device}: load it there")
        return pipe
    if name in ("triton", "compile"):
        if device is not None and torch.device(device) != pipe.device:
            raise ValueError(f"the pipeline is on {pipe.device}, not {device}: load it there")
        if cache is not None or opset is not None:
            raise ValueError(f"the {name} backend exports nothing: it takes no cache or opset")
        if name == "triton":
            from . import triton as backend
        else:
            from . import compile as backend
        return backend.apply(pipe, **options)
    from sdfast.export import onnx as export

    folder = export.cached_export(pipe, cache or cache_dir() / "onnx", opset=opset or export.DEFAULT_OPSET)
    if name == "tensorrt":
        options.setdefault("build", True)
    return load_export(folder, name, device=device or pipe.device, **options)


def load_export(folder, name: str = "onnxruntime", *, device="cpu", dtype=None, **options):
    """A ``Pipeline`` from an export folder (``manifest.json``, the graphs, the tokenizer and the scheduler config)
    on backend ``name`` ("onnxruntime" or "tensorrt"). ``dtype``, when given, must be the export's."""
    from sdfast.export.onnx import read_manifest

    from ..pipeline import Pipeline

    check(name)
    if name in IN_PLACE:
        raise ValueError(f"{folder} is an ONNX export (no torch weights): load it with backend='onnxruntime' or "
                         f"'tensorrt', or load the original checkpoint for the {name} backend")
    folder = Path(folder)
    manifest = read_manifest(folder)
    exported = {"fp32": torch.float32, "fp16": torch.float16}[manifest["dtype"]]
    if dtype is not None and dtype != exported:
        raise ValueError(f"{folder} was exported in {manifest['dtype']}, so it runs in {exported}, not {dtype}: "
                         "export again with `sdfast export --dtype` for another precision")
    device = torch.device(device)
    if name == "onnxruntime":
        from . import onnxruntime as backend
    else:
        from . import tensorrt as backend
    run = backend.runners(folder, manifest, device, **options)
    configs = manifest["configs"]
    # the text encoders the model has (SD: one; SDXL: two; the SDXL refiner: the second), each with its tokenizer
    encoders = [name for name in ("text_encoder", "text_encoder_2") if name in configs]
    missing = [n for n in (*encoders, "unet", "vae_decoder", "vae_encoder") if n not in run]
    if missing:
        raise ValueError(f"{folder} lacks the {', '.join(missing)} graph(s): export all of the model's networks")
    final_norm = manifest.get("text_final_norm", True)  # SDXL's graphs hold raw hidden states
    text = {name: graphs.TextEncoder(run[name], graphs.config(CLIPTextConfig, configs[name]), final_norm)
            for name in encoders}
    tokenizers = {name: Tokenizer.from_folder(folder / manifest[tok])
                  for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
                  if name in encoders}
    return Pipeline(
        tokenizer=tokenizers.get("text_encoder"), text_encoder=text.get("text_encoder"),
        unet=graphs.UNet(run["unet"], graphs.config(UNetConfig, configs["unet"])),
        vae=graphs.VAE(run["vae_encoder"], run["vae_decoder"], graphs.config(VAEConfig, configs["vae"])),
        scheduler_config=read_json(folder / manifest["scheduler_config"]), device=device, dtype=exported,
        text_encoder_2=text.get("text_encoder_2"), tokenizer_2=tokenizers.get("text_encoder_2"),
        options=manifest.get("options", {}))
