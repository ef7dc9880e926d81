"""TensorRT engines (sdfast.export.tensorrt, .profiles): real TensorRT-RTX builds of the tiny model's four networks,
without a GPU: their I/O and profiles, the engine cache (hit, stale, corrupt), and shapes outside the profiles.
Running engines needs a CUDA GPU: those tests are marked ``gpu``."""

import json
import shutil
import time

import pytest
import torch

from conftest import rel_err

pytest.importorskip("onnx", reason='the onnx extra is not installed: pip install -e ".[onnx]"')

from sdfast.export import tensorrt as trt  # noqa: E402
from sdfast.export.errors import EngineError  # noqa: E402
from sdfast.export.flavour import HAS_TENSORRT, flavour  # noqa: E402
from sdfast.export.profiles import Shapes, check_shapes, covering  # noqa: E402

if not HAS_TENSORRT:
    pytest.skip("no TensorRT module: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings",
                allow_module_level=True)

SHAPES = Shapes.parse(["64x64", "64x64-128x96"], [1, 2], prompt_chunks=2)


@pytest.fixture(scope="module")
def engines(sd1_onnx):
    start = time.perf_counter()
    built = trt.build_engines(sd1_onnx.folder, SHAPES, log=print)
    print(f"four engines in {time.perf_counter() - start:.1f} s:",
          {name: e.meta["build_s"] for name, e in built.items()})
    return built


@pytest.fixture
def folder_copy(sd1_onnx, tmp_path):
    """A private copy of the export folder (no engines), to damage."""
    return shutil.copytree(sd1_onnx.folder, tmp_path / "onnx", ignore=shutil.ignore_patterns("engines"))


def test_engines_have_the_graphs_io_and_the_asked_profiles(sd1_onnx, engines):
    manifest = json.loads((sd1_onnx.folder / "manifest.json").read_text())
    for name, engine in engines.items():
        assert engine.path.stat().st_size > 0 and engine.meta["build_s"] > 0
        io = {t["name"]: t for t in engine.meta["io"]}
        for mode in ("inputs", "outputs"):
            for graph_io in manifest["networks"][name][mode]:
                assert io[graph_io["name"]]["dtype"] == graph_io["dtype"]
                assert io[graph_io["name"]]["mode"] == mode[:-1]
        assert engine.meta["key_fields"]["flavour"] in ("tensorrt", "tensorrt_rtx")
    # text encoder: one profile, prompts + negatives in up to 2 chunks each at batch 2
    assert engines["text_encoder"].meta["profiles"] == [{"input_ids": [[1, 77], [2, 77], [8, 77]]}]
    # U-Net: one profile per size; the batch doubles under guidance; the context takes up to 2 chunks
    unet = engines["unet"].meta["profiles"]
    assert len(unet) == 2
    assert unet[0]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 8, 8]]
    assert unet[1]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 12, 16]]
    assert unet[1]["context"] == [[1, 77, 32], [2, 77, 32], [4, 154, 32]]
    assert engines["vae_decoder"].meta["profiles"][1]["latent"] == [[1, 4, 8, 8], [1, 4, 8, 8], [2, 4, 12, 16]]
    assert engines["vae_encoder"].meta["profiles"][1]["image"] == [[1, 3, 64, 64], [1, 3, 64, 64], [2, 3, 96, 128]]


def test_the_weights_loras_write_are_built_refittable_where_a_gpu_is(sd1_onnx, engines):
    """With a GPU, the text encoder's and U-Net's LoRA-patchable weights (the manifest's map) are marked refittable,
    so a LoRA is a refit, never a rebuild. TensorRT-RTX cannot build refittable engines without one (its JIT needs
    CUDA): there the engines have none, and a LoRA is refused naming the fix."""
    from sdfast.backends.tensorrt import EngineSet

    manifest = json.loads((sd1_onnx.folder / "manifest.json").read_text())
    for name in ("text_encoder", "unet"):
        located = sorted({init for init, _, _ in manifest["networks"][name]["weights"].values()})
        expected = located if torch.cuda.is_available() else []
        assert located and engines[name].meta["key_fields"]["refit"] == expected
        assert engines[name].meta["refittable"] == len(expected)
    assert engines["vae_decoder"].meta["refittable"] == 0
    if not torch.cuda.is_available():
        unet = EngineSet(trt.find_engines(sd1_onnx.folder, "unet"), None, sd1_onnx.folder / "unet.onnx")
        with pytest.raises(EngineError, match="built without refittable weights .* rebuild it on the GPU"):
            unet.set_initializers({"x": None})


def test_second_build_loads_from_the_cache(sd1_onnx, engines):
    mtimes = {name: e.path.stat().st_mtime_ns for name, e in engines.items()}
    again = trt.build_engines(sd1_onnx.folder, SHAPES, log=print)
    assert all(e.cached for e in again.values())
    assert {name: e.path.stat().st_mtime_ns for name, e in again.items()} == mtimes
    assert trt.find_engines(sd1_onnx.folder, "unet")[0].path == engines["unet"].path
    other = trt.build_engines(sd1_onnx.folder, Shapes.parse(["64x64"], [1]), networks=("text_encoder",))
    assert not other["text_encoder"].cached  # other profiles: another key, another engine


def test_each_request_runs_on_an_engine_that_covers_it(sd1_onnx, engines):
    """Two text-encoder builds side by side (batch 1 only, then batch 1..4): a request goes to the newest engine
    whose profiles admit it, and one that no engine admits names every engine's ranges."""
    small = trt.build_engines(sd1_onnx.folder, Shapes.parse(["64x64"], [1]), networks=("text_encoder",))
    found = trt.find_engines(sd1_onnx.folder, "text_encoder")
    assert [e.path for e in found] == [small["text_encoder"].path, engines["text_encoder"].path]  # newest first
    (name, (lo, _, hi)), = found[1].meta["profiles"][0].items()
    assert covering(found, {name: tuple(lo)})[0].path == found[0].path  # both admit it: the newest runs
    assert covering(found, {name: tuple(hi)})[0].path == found[1].path  # only the larger build admits it
    too_big = (hi[0] + 1, *hi[1:])
    with pytest.raises(EngineError, match=rf"text_encoder: {name} \({too_big[0]}, .* is outside the profiles of "
                                              r"all 2 engines; allowed: text_encoder-.*\.engine: .*; text_encoder-"):
        covering(found, {name: too_big})


def test_a_changed_onnx_file_makes_the_engine_stale(folder_copy):
    trt.build_engines(folder_copy, SHAPES, networks=("text_encoder",))
    path = folder_copy / "text_encoder.onnx"
    path.write_bytes(path.read_bytes() + b"\n")  # any change to the bytes changes the key
    with pytest.raises(EngineError, match=r"every one is stale .*onnx_sha256 '[0-9a-f]{64}' \(now '[0-9a-f]{64}'\)"
                                              r".*Rebuild: sdfast build"):
        trt.find_engines(folder_copy, "text_encoder")[0]
    with pytest.raises(EngineError, match=r"no unet engine in .*sdfast build"):
        trt.find_engines(folder_copy, "unet")[0]


def test_an_engine_from_another_tensorrt_or_gpu_is_stale(folder_copy):
    """The key's other fields: an engine whose sidecar names another TensorRT version or GPU is refused, naming
    what differs; an unreadable sidecar is named too."""
    built = trt.build_engines(folder_copy, SHAPES, networks=("vae_decoder",))["vae_decoder"]
    sidecar = built.path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    now = dict(meta["key_fields"])
    meta["key_fields"].update(version="0.9", gpu="NVIDIA GeForce RTX 4090 (sm_89)")
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(EngineError, match=rf"every one is stale .*version '0\.9' \(now '{now['version']}'\); "
                                              r"gpu 'NVIDIA GeForce RTX 4090 \(sm_89\)' \(now '.*'\)"):
        trt.find_engines(folder_copy, "vae_decoder")[0]
    sidecar.write_text("{not json")
    with pytest.raises(EngineError, match=r"unreadable sidecar \(JSONDecodeError\)"):
        trt.find_engines(folder_copy, "vae_decoder")[0]


def test_timing_cache(engines, sd1_onnx):
    """Full TensorRT shares one timing cache per TensorRT version and GPU across builds; TensorRT-RTX does not time
    tactics (its timing-cache calls are no-ops that would need a GPU), writes none, and keys its engines by its
    portable target set rather than by this machine's GPU."""
    fields = engines["unet"].meta["key_fields"]
    cache = trt.timing_cache_path(sd1_onnx.folder, fields)
    if fields["flavour"] == "tensorrt_rtx":
        assert not any(e.meta["timing_cache"] for e in engines.values()) and not cache.exists()
        assert fields["gpu"] == "portable (TensorRT-RTX default targets)"
    else:
        assert all(e.meta["timing_cache"] for e in engines.values()) and cache.stat().st_size > 0
        assert cache.name != trt.timing_cache_path(sd1_onnx.folder, {**fields, "version": "0.9"}).name


@pytest.mark.gpu(reason="TensorRT engines execute only on a CUDA GPU")
def test_full_tensorrt_reuses_its_timing_cache(folder_copy):
    if flavour()["flavour"] != "tensorrt":
        pytest.skip("the timing cache is full TensorRT's (TensorRT-RTX does not time tactics)")
    first = trt.build_engines(folder_copy, SHAPES, networks=("vae_decoder",))["vae_decoder"]
    cache = trt.timing_cache_path(folder_copy, first.meta["key_fields"])
    size = cache.stat().st_size
    other = trt.build_engines(folder_copy, Shapes.parse(["64x64"], [1]), networks=("vae_decoder",))
    assert not other["vae_decoder"].cached and other["vae_decoder"].meta["timing_cache"]
    assert cache.stat().st_size >= size  # loaded, extended, written back: never started afresh


def test_a_corrupt_engine_is_refused_then_rebuilt(folder_copy):
    built = trt.build_engines(folder_copy, SHAPES, networks=("text_encoder",))["text_encoder"]
    data = bytearray(built.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    built.path.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"is corrupt: its content does not match the sha256"):
        trt.find_engines(folder_copy, "text_encoder")[0]
    built.path.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(EngineError, match="is corrupt"):
        trt.find_engines(folder_copy, "text_encoder")[0]
    lines = []
    rebuilt = trt.build_engines(folder_copy, SHAPES, networks=("text_encoder",), log=lines.append)["text_encoder"]
    assert not rebuilt.cached and "is corrupt" in lines[0] and "rebuilding" in lines[0]
    assert trt.find_engines(folder_copy, "text_encoder")[0].meta["engine_sha256"] == rebuilt.meta["engine_sha256"]


def test_a_shape_outside_the_profiles_names_the_allowed_ranges(engines):
    meta = engines["unet"].meta
    ok = {"sample": (2, 4, 12, 16), "timestep": (2,), "context": (2, 154, 32)}
    assert check_shapes(meta, ok) == 1
    assert check_shapes(meta, {**ok, "sample": (2, 4, 8, 8)}) == 0
    with pytest.raises(EngineError, match=r"unet: sample \(2, 4, 20, 20\).* is outside the engine's profiles; "
                                              r"allowed: sample \(1\.\.4, 4, 8, 8\).*\| sample \(1\.\.4, 4, 8\.\.12, "
                                              r"8\.\.16\).*sdfast build DIR --sizes"):
        check_shapes(meta, {**ok, "sample": (2, 4, 20, 20)})
    with pytest.raises(EngineError, match=r"context \(1\.\.4, 77\.\.154, 32\)"):
        check_shapes(meta, {**ok, "context": (2, 231, 32)})


def test_bad_build_requests(sd1_onnx, tmp_path):
    with pytest.raises(ValueError, match="multiples of 8"):
        Shapes.parse(["500x512"], [1])
    with pytest.raises(ValueError, match="runs backwards"):
        Shapes.parse(["768x768-512x512"], [1])
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        Shapes.parse(["big"], [1])
    if flavour()["flavour"] == "tensorrt_rtx":
        with pytest.raises(EngineError, match="strongly typed.*--dtype fp16"):
            trt.build_engines(sd1_onnx.folder, SHAPES, fp16=True)
    with pytest.raises(ValueError, match="has no manifest.json"):
        trt.build_engines(tmp_path, SHAPES)


def test_fp16_engines_are_fp16(sd2_fp16_onnx):
    built = trt.build_engines(sd2_fp16_onnx.folder, SHAPES, fp16=True, networks=("unet",))["unet"]
    io = {t["name"]: t["dtype"] for t in built.meta["io"]}
    assert io == {"sample": "float16", "timestep": "float32", "context": "float16", "noise": "float16"}
    assert built.meta["key_fields"]["precision"] == "fp16"


def test_the_backend_needs_a_gpu(sd1_onnx, engines):
    import sdfast

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="the tensorrt backend runs on a CUDA GPU"):
        sdfast.load(sd1_onnx.folder, backend="tensorrt")


@pytest.mark.gpu(reason="TensorRT engines execute only on a CUDA GPU")
@pytest.mark.parametrize("kwargs", [{}, {"clip_skip": 2}, {"image": "img2img"}])
def test_tensorrt_backend_matches_torch(sd1_onnx, engines, kwargs):
    """Same seed, same scheduler: the engines' latents equal the torch backend's (fp32 engines; TensorRT may use
    TF32 for fp32 matmuls, hence 1e-2)."""
    import numpy as np
    from PIL import Image

    import sdfast

    pipe = sdfast.load(sd1_onnx.folder, backend="tensorrt", device="cuda")
    if kwargs.get("image"):
        kwargs = {"image": Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                  "strength": 0.6}
    result = pipe.generate("a red circle", steps=4, seed=3, width=64, height=64, **kwargs)
    expected = sd1_onnx.torch.generate("a red circle", steps=4, seed=3, width=64, height=64, **kwargs)
    assert rel_err(result.latents.cpu(), expected.latents) < 1e-2
    with pytest.raises(EngineError, match="outside the engine's profiles"):
        pipe.generate("a red circle", steps=1, width=256, height=256)


@pytest.mark.gpu(reason="refitting an engine needs a CUDA GPU")
def test_a_lora_is_refitted_into_the_engines_not_rebuilt(sd1, sd1_onnx, engines, tmp_path):
    """A LoRA on the tensorrt backend refits the engines' weights in place (no new engine file) and gives the torch
    backend's latents with the same LoRA; unloading refits the graph's own weights back."""
    import sys
    from pathlib import Path

    import sdfast

    sys.path.insert(0, str(Path(__file__).parents[1] / "lora"))
    from lora_files import TEXT_TARGETS, UNET_TARGETS, random_lora, targets, write_kohya

    file = write_kohya(tmp_path / "a.safetensors",
                       {"lora_unet": random_lora(targets(sd1.pipe.unet, UNET_TARGETS), 4, 1),
                        "lora_te": random_lora(targets(sd1.pipe.text_encoder, TEXT_TARGETS), 4, 2)}, alpha=4.0)
    files = sorted((sd1_onnx.folder / "engines").iterdir())
    pipe = sdfast.load(sd1_onnx.folder, backend="tensorrt", device="cuda")
    base = pipe.generate("a red circle", steps=4, seed=3, width=64, height=64).latents.cpu()
    pipe.loras.load(file)
    got = pipe.generate("a red circle", steps=4, seed=3, width=64, height=64).latents.cpu()
    reference = sdfast.load(sd1.path)
    reference.loras.load(file)
    want = reference.generate("a red circle", steps=4, seed=3, width=64, height=64).latents
    assert rel_err(got, want) < 1e-2 and rel_err(base, want) > 0.05
    pipe.loras.unload()
    assert rel_err(pipe.generate("a red circle", steps=4, seed=3, width=64, height=64).latents.cpu(), base) < 1e-4
    assert sorted((sd1_onnx.folder / "engines").iterdir()) == files
