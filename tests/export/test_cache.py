"""The on-the-fly export cache ($SDFAST_CACHE/onnx) and the engine cache: entries are verified against their manifest
(per-graph size and sha256) before use, a corrupt entry is exported again once with a warning, exports are written
under unique temporary names and renamed into place, and a file lock makes concurrent processes export (or build)
once. Export folders a user made are verified too: a mismatch there is an error naming the file and the fix."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest

from conftest import rel_err

onnx = pytest.importorskip("onnx", reason='the onnx extra is not installed: pip install -e ".[onnx]"')

import sdfast  # noqa: E402
from sdfast.export import cache as onnx_cache  # noqa: E402
from sdfast.export import files  # noqa: E402
from sdfast.export import tensorrt as trt  # noqa: E402
from sdfast.export.errors import ExportError  # noqa: E402
from sdfast.export.flavour import HAS_TENSORRT  # noqa: E402
from sdfast.export.manifest import FORMAT, read_manifest, weights_hash  # noqa: E402
from sdfast.export.onnx import DEFAULT_OPSET  # noqa: E402
from sdfast.export.profiles import Shapes, profiles  # noqa: E402

LATENT_TOL = 1e-4
NO_ENGINES = shutil.ignore_patterns("engines", "*.lock")


@pytest.fixture
def cache(sd1_onnx, tmp_path) -> Path:
    """A private copy of the session's export cache: one verified entry of the sd1 model."""
    return shutil.copytree(sd1_onnx.cache, tmp_path / "cache", ignore=NO_ENGINES)


def entry(cache: Path) -> Path:
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return folder


@pytest.fixture
def reexport(sd1_onnx, monkeypatch) -> list[Path]:
    """``export_pipeline`` replaced by a copy of the session's export of the same model (what a real export writes,
    without its 45 s on two cores); the folders it was asked to write are recorded."""
    calls = []

    def copy(pipe, folder, **kwargs):
        calls.append(Path(folder))
        assert not (Path(folder) / "manifest.json").exists()
        shutil.copytree(sd1_onnx.folder, folder, ignore=NO_ENGINES, dirs_exist_ok=True)
        return json.loads((Path(folder) / "manifest.json").read_text())

    monkeypatch.setattr(onnx_cache, "export_pipeline", copy)
    return calls


def negate_an_initializer(path: Path) -> None:
    """The largest float initializer of a graph, negated: a valid graph that computes something else."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensor = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
                 key=lambda t: len(t.raw_data) or len(t.float_data))
    tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
    onnx.save(model, str(path))


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.endswith((".partial", ".old")))


def test_a_verified_entry_is_used_as_it_is(cache, sd1_onnx, reexport):
    folder = entry(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert onnx_cache.cached_export(sd1_onnx.torch, cache) == folder
    assert reexport == []


def test_a_changed_graph_in_the_cache_is_exported_again_with_a_warning(cache, sd1_onnx, reexport):
    """Negating one initializer used to load silently (wrong images)."""
    folder = entry(cache)
    negate_an_initializer(folder / "unet.onnx")
    message = (rf"cached ONNX export {folder} is unusable \(.*unet.onnx: the sha256 of unet.onnx is not the one "
               r"manifest.json recorded .*\); exporting it again")
    with pytest.warns(RuntimeWarning, match=message):
        assert onnx_cache.cached_export(sd1_onnx.torch, cache) == folder
    assert len(reexport) == 1
    assert (folder / "unet.onnx").read_bytes() == (sd1_onnx.folder / "unet.onnx").read_bytes()
    read_manifest(folder)  # verifies
    assert leftovers(cache) == []


def test_a_truncated_graph_in_the_cache_is_exported_again(cache, sd1_onnx, reexport):
    """A truncated graph used to fail with InvalidProtobuf on every load until the folder was deleted by hand."""
    folder = entry(cache)
    graph = folder / "vae_decoder.onnx"
    size = graph.stat().st_size
    graph.write_bytes(graph.read_bytes()[: size // 2])
    with pytest.warns(RuntimeWarning, match=rf"vae_decoder.onnx holds {size // 2:,} bytes, not the {size:,} that "
                                            r"manifest.json recorded \(truncated"):
        onnx_cache.cached_export(sd1_onnx.torch, cache)
    assert len(reexport) == 1 and graph.stat().st_size == size


@pytest.mark.parametrize("damage, said", [
    (lambda f: (f / "manifest.json").write_text("{"), r"manifest.json is not valid JSON"),
    (lambda f: (f / "manifest.json").unlink(), r"has no manifest.json"),
    (lambda f: (f / "manifest.json").write_text(json.dumps({"format": FORMAT, "networks": [1]})),
     r"manifest.json is malformed"),
    (lambda f: (f / "text_encoder.onnx").unlink(), r"text_encoder.onnx is missing"),
])
def test_an_unreadable_entry_is_exported_again(cache, sd1_onnx, reexport, damage, said):
    damage(entry(cache))
    with pytest.warns(RuntimeWarning, match=said):
        folder = onnx_cache.cached_export(sd1_onnx.torch, cache)
    assert len(reexport) == 1 and read_manifest(folder)["networks"]


def test_an_entry_still_corrupt_after_the_new_export_is_an_error(cache, sd1_onnx, monkeypatch):
    folder = entry(cache)
    (folder / "unet.onnx").write_bytes(b"\x00" * 100)

    def broken(pipe, out, **kwargs):  # a disk that mangles what is written
        shutil.copytree(sd1_onnx.folder, out, ignore=NO_ENGINES, dirs_exist_ok=True)
        (Path(out) / "unet.onnx").write_bytes(b"\x00" * 100)

    monkeypatch.setattr(onnx_cache, "export_pipeline", broken)
    with pytest.warns(RuntimeWarning, match="exporting it again"), \
            pytest.raises(ExportError, match=rf"the cached ONNX export {folder} was exported again and is "
                                                    r"still unusable \(.*unet.onnx.*\): is the disk full"):
        onnx_cache.cached_export(sd1_onnx.torch, cache)


def test_an_export_is_written_aside_and_renamed_into_place(sd1_onnx, tmp_path, monkeypatch):
    """The entry's path never holds a partial export: the export writes a uniquely named folder beside it, and a
    failed export leaves nothing behind."""
    cache = tmp_path / "cache"
    final = onnx_cache.cache_folder(cache, weights_hash(sd1_onnx.torch), "fp32", DEFAULT_OPSET)
    seen = []

    def write(pipe, folder, **kwargs):
        seen.append((Path(folder), final.exists()))
        shutil.copytree(sd1_onnx.folder, folder, ignore=NO_ENGINES, dirs_exist_ok=True)

    monkeypatch.setattr(onnx_cache, "export_pipeline", write)
    assert onnx_cache.cached_export(sd1_onnx.torch, cache) == final
    (written, existed), = seen
    assert written.parent == cache and written.name.startswith(final.name + ".") and written.name.endswith(".partial")
    assert not existed and not written.exists() and leftovers(cache) == []

    def fail(pipe, folder, **kwargs):
        (Path(folder) / "unet.onnx").write_bytes(b"half")
        raise ExportError("unet.onnx does not match the torch model")

    shutil.rmtree(final)
    monkeypatch.setattr(onnx_cache, "export_pipeline", fail)
    with pytest.raises(ExportError, match="does not match"):
        onnx_cache.cached_export(sd1_onnx.torch, cache)
    assert not final.exists() and leftovers(cache) == []


def test_a_cached_load_hashes_each_graph_once(cache, sd1_onnx, monkeypatch):
    hashed = []
    real = files.sha256_files
    monkeypatch.setattr(files, "sha256_files", lambda *paths: hashed.append(paths) or real(*paths))
    folder = onnx_cache.cached_export(sd1_onnx.torch, cache)  # verifies the entry
    read_manifest(folder)  # what loading the folder does next: verified already, by the same files
    assert sorted(p[0].name for p in hashed) == ["text_encoder.onnx", "unet.onnx", "vae_decoder.onnx",
                                                 "vae_encoder.onnx"]


def test_a_user_folder_that_does_not_match_its_manifest_is_refused(sd1_onnx, tmp_path):
    """An export folder the user made cannot be rebuilt for them: a graph changed since the export is an error
    naming the file and the fix, before any session is made."""
    folder = shutil.copytree(sd1_onnx.folder, tmp_path / "onnx", ignore=NO_ENGINES)
    negate_an_initializer(folder / "unet.onnx")
    message = (rf"{folder / 'unet.onnx'}: the sha256 of unet.onnx is not the one manifest.json recorded \(changed "
               rf"since the export\): export the model again \(sdfast export MODEL -o {folder}\)")
    with pytest.raises(ExportError, match=message):
        read_manifest(folder)
    with pytest.raises(ValueError, match=message) as e:
        sdfast.load(folder, backend="onnxruntime")
    assert "\n" not in str(e.value)
    shutil.copy(sd1_onnx.folder / "unet.onnx", folder / "unet.onnx")
    sdfast.load(folder, backend="onnxruntime")  # as exported again
    (folder / "vae_encoder.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"vae_encoder.onnx: vae_encoder.onnx holds 0 bytes, not the [\d,]+ that "
                                         r"manifest.json recorded \(truncated or overwritten"):
        sdfast.load(folder, backend="onnxruntime")


def test_an_export_folders_scheduler_config_is_bounded(sd1_onnx, tmp_path):
    """The scheduler config an export folder carries is held to the same bounds as a checkpoint's (10^10 training
    steps used to load and then try a 40 GB allocation inside generate)."""
    folder = shutil.copytree(sd1_onnx.folder, tmp_path / "onnx", ignore=NO_ENGINES)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_train_timesteps": 10**10}))
    with pytest.raises(ValueError, match=rf"{path}: num_train_timesteps=10000000000 out of bounds: allowed an "
                                         r"integer 1\.\.100,000 .*; correct it in that file, or export the model "
                                         r"again"):
        sdfast.load(folder, backend="onnxruntime")


def test_a_checkpoint_loads_right_from_a_tampered_cache(sd1, sd1_onnx, cache, reexport):
    """End to end: sdfast.load(checkpoint, backend="onnxruntime") over a cache whose U-Net was changed gets the
    model's own graphs back (re-exported), not wrong images."""
    negate_an_initializer(entry(cache) / "unet.onnx")
    with pytest.warns(RuntimeWarning, match="unet.onnx.*exporting it again"):
        pipe = sdfast.load(sd1.path, backend="onnxruntime", cache=cache)
    got = pipe.generate("a cat", steps=2, seed=1).latents
    assert rel_err(got, sd1_onnx.torch.generate("a cat", steps=2, seed=1).latents) < LATENT_TOL


def test_a_process_waiting_on_the_lock_gives_up_with_a_clear_error(sd1_onnx, tmp_path):
    cache = tmp_path / "cache"
    folder = onnx_cache.cache_folder(cache, weights_hash(sd1_onnx.torch), "fp32", DEFAULT_OPSET)
    message = (rf"waited 0.5 s for {folder}.lock: process {os.getpid()} on .* is still exporting .*; wait for it to "
               r"finish and try again")
    with files.file_lock(folder.with_name(folder.name + ".lock"), what="exporting"), \
            pytest.raises(ExportError, match=message):
        onnx_cache.cached_export(sd1_onnx.torch, cache, lock_timeout=0.5)
    assert not folder.exists()


RACER = textwrap.dedent("""
    import functools, json, sys
    import sdfast
    from sdfast.export import cache

    # one small graph keeps the test short; the cache's locking and renaming do not depend on which graphs
    cache.export_pipeline = functools.partial(cache.export_pipeline, networks=("text_encoder",))
    pipe = sdfast.load(sys.argv[1])
    lines = []
    folder = cache.cached_export(pipe, sys.argv[2], log=lines.append)
    print(json.dumps({"folder": str(folder), "exported": any("text_encoder.onnx:" in l for l in lines),
                      "waited": any(l.startswith("waiting for") for l in lines)}))
""")


def test_two_processes_exporting_into_one_empty_cache_export_once(sd1, tmp_path):
    """Two real processes load one checkpoint into an empty cache at once: one exports, the other waits for it and
    uses its entry (this used to fail with FileNotFoundError in the shared NAME.partial folder)."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(sd1.path), str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["folder"] == results[1]["folder"]
    assert sorted(r["exported"] for r in results) == [False, True], results
    assert [r["waited"] for r in results if not r["exported"]] in ([True], [False])  # it may have come after
    manifest = read_manifest(results[0]["folder"])
    assert list(manifest["networks"]) == ["text_encoder"]
    assert leftovers(cache) == [] and sorted(p.suffix for p in cache.iterdir()) == ["", ".lock"]


# -- the engine cache --

needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="no TensorRT module: pip install "
                                                                 "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
SHAPES = Shapes.parse(["64x64"], [1])


@pytest.fixture
def folder_copy(sd1_onnx, tmp_path) -> Path:
    return shutil.copytree(sd1_onnx.folder, tmp_path / "onnx", ignore=NO_ENGINES)


@needs_tensorrt
def test_concurrent_builds_of_one_engine_build_it_once(folder_copy):
    """Two builders of the same engine at once: the second waits on the engine's lock, then loads what the first
    built; no temporary file is left behind (they used to share NAME.tmp)."""
    results, errors = [], []

    def build():
        try:
            results.append(trt.build_engines(folder_copy, SHAPES, networks=("text_encoder",),
                                             log=lambda _: None)["text_encoder"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert sorted(e.cached for e in results) == [False, True]
    assert results[0].path == results[1].path
    assert trt.find_engines(folder_copy, "text_encoder")[0].meta["engine_sha256"] == \
        files.sha256_files(results[0].path)
    assert not [p.name for p in (folder_copy / trt.ENGINES).iterdir() if p.name.endswith(".tmp")]


@needs_tensorrt
def test_a_build_waiting_on_an_engine_lock_gives_up_with_a_clear_error(folder_copy):
    manifest = read_manifest(folder_copy)
    network_profiles = profiles("text_encoder", manifest, SHAPES)
    key = trt.engine_key(trt._key_fields(folder_copy, "text_encoder", manifest, network_profiles, manifest["dtype"]))
    lock = folder_copy / trt.ENGINES / f"text_encoder-{key[:16]}.lock"
    with files.file_lock(lock, what="building"), \
            pytest.raises(ValueError, match=rf"waited 0.5 s for {lock}: process {os.getpid()} on .* is still building"):
        trt.build_engines(folder_copy, SHAPES, networks=("text_encoder",), lock_timeout=0.5)


def test_build_engines_refuses_a_graph_that_does_not_match_its_manifest(folder_copy):
    """An engine is never built from a graph changed since the export (finding engines still reports them as
    stale, naming the hashes)."""
    negate_an_initializer(folder_copy / "text_encoder.onnx")
    with pytest.raises(ValueError, match=r"text_encoder.onnx: the sha256 of text_encoder.onnx is not the one "
                                         r"manifest.json recorded"):
        trt.build_engines(folder_copy, SHAPES, networks=("text_encoder",))


def test_write_atomically_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "x.engine"
    trt.write_atomically(path, b"old")
    with pytest.raises(TypeError):
        trt.write_atomically(path, object())  # fails while writing
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.engine"]
    trt.write_atomically(path, memoryview(b"new"))
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.engine"]
