"""ControlNets a server offers: the entries of one folder (``sdfast serve --controlnet-dir``), named by clients.

A request names a ControlNet by its sub-folder name or file stem (``{"controls": [{"model": "canny", ...}]}``),
never by path: names are checked against the folder's listing, so no request can reach another file.

Every replica loads all of them when it starts, before it takes traffic, rather than on first use as LoRAs are
(``loras.LoRACache``): a ControlNet is about half a U-Net (SD 1.5's: 361 M parameters, 0.72 GB in fp16), so loading
one mid-traffic would hold the replica's one device thread, and every request queued on it, for the file read and
the backend's conversion (``torch.compile``, Triton's kernels); loaded at start, the device memory they take is
known before the first request, and a folder that does not fit fails then. Their count is bounded
(``ServeOptions.max_controlnets``), so the folder cannot grow a replica's memory without bound.
"""

from __future__ import annotations

from pathlib import Path

from .loras import NAME

SUFFIXES = (".safetensors", ".pth")  # original single files; .pth is read with weights_only=True, never unpickled


def listing(folder: str | Path | None, most: int) -> dict[str, Path]:
    """The ControlNets in ``folder``: {name: path} for each diffusers sub-folder (one holding ``config.json``,
    named by the folder) and each ``NAME.safetensors`` / ``NAME.pth`` file (named by its stem); {} without a
    folder. Refuses a folder of more than ``most``, and two entries with one name."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"controlnet_dir={str(folder)!r} is not a folder: name the folder that holds the "
                         "ControlNets clients may ask for (diffusers sub-folders, .safetensors or .pth files)")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir() and (path / "config.json").is_file():
            name = path.name
        elif path.is_file() and path.suffix in SUFFIXES:
            name = path.stem
        else:
            continue
        if not NAME.fullmatch(name):
            continue
        if name in found:
            raise ValueError(f"controlnet_dir={str(folder)!r} holds two ControlNets named {name!r} "
                             f"({found[name].name} and {path.name}): rename or remove one")
        found[name] = path
    if len(found) > most:
        raise ValueError(f"controlnet_dir={str(folder)!r} holds {len(found)} ControlNets, over max_controlnets="
                         f"{most}: every replica loads each one onto its device (SD 1.5's take 0.72 GB each in fp16); "
                         "offer fewer, or raise max_controlnets (--max-controlnets)")
    return found
