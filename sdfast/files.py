"""Files written whole or not at all: the one temp-file-and-rename every writer in sdfast uses."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

Content = Union[bytes, bytearray, memoryview, str, Callable[[BinaryIO], object]]


def write_atomically(path: Path, content: Content) -> None:
    """Write ``content`` to ``path``: bytes-like, a str (as UTF-8), or a function ``write(file)`` given the open
    binary file. It goes to a uniquely named temporary file beside ``path`` (parent folders made), which is then
    renamed onto ``path``: a reader (or a kill, or a failed write) sees the old file or the whole new one, never
    part of it; two writers never share a temporary; a symlink at ``path`` is replaced, never written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
        umask = os.umask(0)  # mkstemp makes the file private (0600): give it a new file's usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
