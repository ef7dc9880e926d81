"""LoRAs a server offers: the files of one folder (``sdfast serve --lora-dir``), named by clients, held per replica.

A request names LoRAs by file stem (``{"loras": {"pink": 0.8}}``), never by path: names are checked against the
folder's listing, made when the server starts, so no request can reach another file. Each replica keeps at most
``capacity`` LoRAs loaded (parsed and with their base weights copied; see ``sdfast.lora.merge``), evicting the one
used least recently that the current call does not need.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a file stem a client may name: no separators, no dot first
SUFFIX = ".safetensors"  # only safetensors: nothing a client names is unpickled


def listing(folder: str | Path | None) -> dict[str, Path]:
    """The LoRAs in ``folder``: {name: path} for each ``NAME.safetensors``; {} without a folder."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"lora_dir={str(folder)!r} is not a folder: name the folder that holds the .safetensors "
                         "LoRAs clients may ask for")
    return {p.stem: p for p in sorted(folder.glob(f"*{SUFFIX}")) if NAME.fullmatch(p.stem) and p.is_file()}


class LoRACache:
    """Loads the LoRAs a call names into ``pipe.loras`` (at scale 0: each call passes its own scales), keeping at
    most ``capacity`` of them."""

    def __init__(self, pipe, files: dict[str, Path], capacity: int):
        self.pipe, self.files, self.capacity = pipe, files, capacity
        self.used: OrderedDict[str, None] = OrderedDict()  # loaded names, least recently used first

    def ensure(self, names) -> None:
        """Have every one of ``names`` loaded (they are in the listing: the request was checked)."""
        names = list(dict.fromkeys(names))
        if len(names) > self.capacity:
            raise ValueError(f"{len(names)} LoRAs in one call, over max_loaded_loras={self.capacity}")
        for name in names:
            if name in self.used:
                self.used.move_to_end(name)
                continue
            while len(self.used) >= self.capacity:
                evict = next(n for n in self.used if n not in names)
                self.pipe.loras.unload(evict)
                del self.used[evict]
            self.pipe.loras.load(self.files[name], scale=0.0, name=name)
            self.used[name] = None
