"""A graph's weights outside its ``.onnx`` file, moved one tensor at a time so they are never held twice: the
exporter writes them to a scratch file, onnxslim works with them left there, and ``save`` streams them into
``NAME.onnx.data`` beside the saved graph (or inline, when the graph is small enough for one file)."""

from __future__ import annotations

from pathlib import Path

try:
    import onnx
except ImportError:  # the `onnx` extra (sdfast.export.onnx.require_onnx says so)
    pass

# Graphs whose weights pass this keep them in ``NAME.onnx.data``, streamed there one tensor at a time. A one-file
# graph is built and serialised whole in memory, twice its weights (measured: the SD 1.5 fp16 U-Net, 1.6 GiB in one
# file, peaked at 7.5 GiB; the 4.8 GiB SDXL U-Net with external data at 6.1 GiB), and protobuf cannot serialise one
# past 2 GiB at all; under 512 MiB (the SD 1.5 text encoder, the VAE halves) one file is simpler and costs little.
EXTERNAL_DATA_BYTES = 2**29


def save(model: onnx.ModelProto, path: Path, base_dir: Path | None = None,
         external_data_bytes: int = EXTERNAL_DATA_BYTES) -> str | None:
    """Write ``path``: one file when the weights total at most ``external_data_bytes``, else every tensor of 1 KiB or
    more in ``path.name + '.data'`` beside it. Weights that ``model`` keeps in external data under ``base_dir`` (as
    ``to_onnx`` leaves them) are copied from there one tensor at a time, never all in memory. Returns the external
    data file's name, or None."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    all_tensors = list(tensors(model))
    if sum(nbytes(t) for t in all_tensors) <= external_data_bytes:  # model.ByteSize() itself fails past 2 GiB
        for tensor in all_tensors:
            if is_external(tensor):
                _inline(tensor, base_dir)
        onnx.save(model, str(path))
        return None
    with open(data, "wb") as f:
        for tensor in all_tensors:
            if is_external(tensor):
                raw = _read_external(tensor, base_dir)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                raw = tensor.raw_data
            else:
                continue
            offset = f.tell()
            f.write(raw)
            # ONNX Runtime maps unaligned offsets too (onnx_ir packs densely for the same reason)
            _set_external(tensor, data.name, offset, len(raw))
            del raw
    onnx.save(model, str(path))
    return data.name


def tensors(model: onnx.ModelProto):
    """Every tensor of a graph: initializers and those in node attributes (``Constant``), subgraphs included."""
    return onnx.external_data_helper._get_all_tensors(model)


def is_external(tensor) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def nbytes(tensor) -> int:
    if is_external(tensor):
        return int(onnx.external_data_helper.ExternalDataInfo(tensor).length)
    return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()


def inline_below(model: onnx.ModelProto, base_dir: Path, limit: int) -> None:
    """Read the external tensors of fewer than ``limit`` bytes from their file under ``base_dir`` into the graph;
    the larger ones stay on disk."""
    for tensor in tensors(model):
        if is_external(tensor) and nbytes(tensor) < limit:
            _inline(tensor, base_dir)


def _inline(tensor, base_dir: Path) -> None:
    raw = _read_external(tensor, base_dir)
    del tensor.external_data[:]
    tensor.ClearField("data_location")  # unset, as a tensor the exporter wrote inline (not DEFAULT: 2 more bytes)
    tensor.raw_data = raw


def _read_external(tensor, base_dir: Path) -> bytes:
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    with open(Path(base_dir) / info.location, "rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length)


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
