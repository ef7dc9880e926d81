"""An export folder's ``manifest.json``: what the export wrote (format, model hash, dtype, opset, the networks'
configs, each graph's files with their size and sha256, what onnxslim and the check measured), which lets the
folder load with no checkpoint; and reading it back, each graph verified against it (``read_manifest``).
``sdfast.export.onnx.export_pipeline`` writes it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from .errors import ExportError
from .files import file_hash

MANIFEST = "manifest.json"
FORMAT = "sdfast-onnx/1"  # bump when the graphs' signatures change: older folders are then refused


def module_hash(net) -> str:
    """sha256 over one network's config and parameters, as ``weights_hash`` hashes each of a pipeline's (a
    ControlNet's in the manifest's ``controlnets``)."""
    h = hashlib.sha256()
    _hash_into(h, "net", net)
    return h.hexdigest()


def _hash_into(h, name: str, net) -> None:
    h.update(json.dumps([name, dataclasses.asdict(net.config)], sort_keys=True).encode())
    for key, t in sorted(net.state_dict().items()):
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())


def weights_hash(pipe) -> str:
    """sha256 over the three networks' configs and parameters (names, dtypes, shapes, bytes): the model hash of
    the manifest and the key of the on-the-fly export cache. Independent of where or how the weights were stored."""
    h = hashlib.sha256()
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        net = getattr(pipe, name)
        if net is None:  # SD 1.x / 2.x: no second encoder; the SDXL refiner: no first
            continue
        _hash_into(h, name, net)
    return h.hexdigest()


def read_manifest(folder, *, verify: bool = True) -> dict:
    """The manifest of an export folder, checked for the format and the files it names, and (``verify``) each
    graph's files against the size and sha256 the manifest recorded when they were written: an ExportError names a
    graph that was changed, truncated or overwritten since (``verify_graphs``)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder} has no {MANIFEST}: not a folder written by `sdfast export` (or the export "
                          "did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): export the model again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise ExportError(f"{path} has format {found!r:.60}, this sdfast reads {FORMAT!r}: export the model again")
    try:
        files = [net["file"] for net in manifest["networks"].values()] + [manifest["scheduler_config"]]
        for net in manifest["networks"].values():
            if not (isinstance(net["sha256"], str) and isinstance(net["bytes"], int)):
                raise TypeError("sha256 / bytes")
        for name, control in manifest.get("controlnets", {}).items():  # each ControlNet's graph is in networks
            if control["network"] not in manifest["networks"]:
                raise KeyError(f"controlnets.{name}.network {control['network']}")
    except (KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{path} is malformed ({type(e).__name__}: {e}): export the model again") from e
    for file in files:
        if not (folder / file).exists():
            raise ExportError(f"{folder / file} is missing (named in {path}): export the model again")
    try:  # the scheduler config within sdfast.checkpoint.BOUNDS, as when a checkpoint loads
        from sdfast.checkpoint import check_scheduler_config, read_json

        check_scheduler_config(read_json(folder / manifest["scheduler_config"]), str(folder / manifest[
            "scheduler_config"]), "correct it in that file, or export the model again")
    except ValueError as e:
        raise ExportError(str(e)) from e
    if verify:
        verify_graphs(folder, manifest)
    return manifest


def graph_files(folder: Path, net: dict) -> list[Path]:
    """A graph's files as its manifest entry names them: NAME.onnx, and NAME.onnx.data when weights went there."""
    path = Path(folder) / net["file"]
    return [path] + ([path.with_name(net["external_data"])] if net.get("external_data") else [])


def verify_graphs(folder, manifest: dict) -> None:
    """Each graph's files against the manifest: their total size (a cheap first look that catches truncation),
    then their sha256, read once per process (``file_hash``). An ExportError names the file and the fix."""
    folder = Path(folder)
    for name, net in manifest["networks"].items():
        files = graph_files(folder, net)
        named = " + ".join(f.name for f in files)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{missing[0]} is missing (named in {folder / MANIFEST}): export the model again "
                              f"(sdfast export MODEL -o {folder})")
        size = sum(f.stat().st_size for f in files)
        if size != net["bytes"]:
            raise ExportError(f"{folder / net['file']}: {named} {'hold' if len(files) > 1 else 'holds'} "
                              f"{size:,} bytes, not the {net['bytes']:,} that "
                              f"{MANIFEST} recorded (truncated or overwritten since the export): export the model "
                              f"again (sdfast export MODEL -o {folder})")
        if file_hash(files[0]) != net["sha256"]:
            raise ExportError(f"{folder / net['file']}: the sha256 of {named} is not the one {MANIFEST} recorded "
                              f"(changed since the export): export the model again (sdfast export MODEL -o "
                              f"{folder})")
