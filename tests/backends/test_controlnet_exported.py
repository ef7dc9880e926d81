"""ControlNets on the export backends: `sdfast export --controlnet` writes each ControlNet's graph and the controlled
U-Net (``unet_control``), the manifest records them, and the onnxruntime backend generates what the torch backend
does with one ControlNet, with two (scales, windows), from the export cache (the graphs exported as they load) and
for SDXL; an export without the controlled U-Net is refused naming the fix; TensorRT-RTX builds both graphs' engines
on the CPU. Running engines needs a CUDA GPU: that test is marked ``gpu``."""

import gc
import json
import re
import shutil
import weakref

import pytest

import sdfast
from conftest import rel_err
from controlnets import control_image, random_controlnet
from sdfast.cli import main
from sdfast.control import Control

pytest.importorskip("onnx", reason='the onnx extra is not installed: pip install -e ".[onnx]"')
pytest.importorskip("onnxruntime", reason='the onnx extra is not installed: pip install -e ".[onnx]"')

from sdfast.export.flavour import HAS_TENSORRT  # noqa: E402
from sdfast.export.manifest import read_manifest  # noqa: E402

LATENT_TOL = 1e-4  # fp32, as the other onnxruntime parity tests
ARGS = dict(prompt="a red circle", steps=3, seed=3)
NEEDS_TRT = pytest.mark.skipif(not HAS_TENSORRT, reason="no TensorRT module: pip install "
                               "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")


@pytest.fixture(scope="module")
def controlnets(sd1, tmp_path_factory):
    """Two random ControlNets for sd1, as diffusers folders named edges and depth."""
    folder = tmp_path_factory.mktemp("controlnets")
    for name, seed in (("edges", 9), ("depth", 10)):
        random_controlnet(sd1.pipe.unet, seed).save_pretrained(folder / name)
    return folder


@pytest.fixture(scope="module")
def export_run(sd1, controlnets, tmp_path_factory):
    """`sdfast export MODEL -o DIR --controlnet edges --controlnet depth`, watching the ControlNets it loads: the
    folder, and weak references to the ControlNets in the order they were loaded. Before each load, the one before
    must be gone (``ControlNetFiles`` loads each as its graph is exported: 1.4 GB at SD 1.5's size in fp32)."""
    from sdfast.control.loading import ControlNetFiles

    folder = tmp_path_factory.mktemp("sd1-control") / "onnx"
    loaded = []
    load = ControlNetFiles.__getitem__

    def watched(self, name):
        gc.collect()
        assert all(ref() is None for ref in loaded), "the previous ControlNet is still in memory"
        net = load(self, name)
        loaded.append(weakref.ref(net))
        return net

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ControlNetFiles, "__getitem__", watched)
        assert main(["export", str(sd1.path), "-o", str(folder), "--controlnet", str(controlnets / "edges"),
                     "--controlnet", str(controlnets / "depth")]) == 0
    return folder, loaded


@pytest.fixture(scope="module")
def exported(export_run):
    return export_run[0]


@pytest.fixture(scope="module")
def reference(sd1, controlnets):
    pipe = sdfast.load(sd1.path)
    for name in ("edges", "depth"):
        pipe.controlnets.load(controlnets / name)
    return pipe


CASES = {
    "one": [Control("edges", control_image(1, size=32), 0.7, 0.0, 0.8)],
    "two": [Control("edges", control_image(1, size=32), 0.7, 0.0, 0.8),
            Control("depth", control_image(2, size=32), 1.3, 0.3, 1.0)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnxruntime_equals_torch(exported, controlnets, reference, case):
    """One ControlNet (a scale and a window), and two summed (their own scales and windows), loaded by path: the
    graphs are found in the export folder by the file's name."""
    pipe = sdfast.load(exported, backend="onnxruntime")
    for name in ("edges", "depth"):
        assert pipe.controlnets.load(controlnets / name) == name
    result = pipe.generate(**ARGS, controls=CASES[case])
    expected = reference.generate(**ARGS, controls=CASES[case])
    assert result.latents.shape == expected.latents.shape
    assert rel_err(result.latents, expected.latents) < LATENT_TOL
    plain = pipe.generate(**ARGS, width=32, height=32)  # no control: the plain U-Net graph, as torch's
    assert rel_err(plain.latents, reference.generate(**ARGS, width=32, height=32).latents) < LATENT_TOL
    assert rel_err(plain.latents, expected.latents) > 1e-2  # and the ControlNets did change the picture


def test_generate_control_on_an_export_folder(exported, controlnets, tmp_path, capsys):
    """`sdfast generate --backend onnxruntime --control PATH:IMAGE` finds the graph by the file's name."""
    control_image(1, size=32).save(tmp_path / "map.png")
    out = tmp_path / "out.png"
    assert main(["generate", "a cat", "--model", str(exported), "--backend", "onnxruntime", "--steps", "2",
                 "--seed", "1", "-o", str(out), "--device", "cpu",
                 "--control", f"{controlnets / 'edges'}:{tmp_path / 'map.png'}:0.8"]) == 0
    assert out.is_file() and "(seed 1)" in capsys.readouterr().out


def test_only_the_export_backends_are_asked_for_the_controlled_unet():
    from sdfast.backends import control_options

    assert control_options("onnxruntime", True) == control_options("tensorrt", True) == {"controlnet": True}
    assert control_options("torch", True) == control_options("onnxruntime", False) == {}


def test_a_lora_patches_the_controlled_unet_too(sd1, exported, controlnets, reference, tmp_path):
    """A LoRA writes both U-Net graphs: with a ControlNet acting, the controlled graph runs the LoRA's weights."""
    from lora.lora_files import UNET_TARGETS, random_lora, targets, write_kohya  # tests/lora/

    lora = write_kohya(tmp_path / "l.safetensors", {"lora_unet": random_lora(targets(sd1.pipe.unet, UNET_TARGETS),
                                                                              4, 1)}, alpha=4.0)
    pipe = sdfast.load(exported, backend="onnxruntime")
    pipe.controlnets.load(controlnets / "edges")
    pipe.loras.load(lora)
    torch_pipe = sdfast.load(sd1.path)
    torch_pipe.controlnets.load(controlnets / "edges")
    torch_pipe.loras.load(lora)
    expected = torch_pipe.generate(**ARGS, controls=CASES["one"])
    assert rel_err(pipe.generate(**ARGS, controls=CASES["one"]).latents, expected.latents) < LATENT_TOL
    assert rel_err(reference.generate(**ARGS, controls=CASES["one"]).latents, expected.latents) > 1e-3


def test_the_manifest_records_the_control_graphs(exported, controlnets):
    manifest = read_manifest(exported)
    assert {"unet_control", "controlnet_edges", "controlnet_depth"} <= set(manifest["networks"])
    residuals = [f"down_{i}" for i in range(6)] + ["mid"]  # sd1: conv_in, 2, the downsampler, 2; the middle
    unet = manifest["networks"]["unet_control"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "context", *residuals]
    assert unet["inputs"][-1]["shape"] == ["batch", 64, "height_1", "width_1"]
    assert unet["weights"]  # LoRAs write the controlled U-Net too
    edges = manifest["networks"]["controlnet_edges"]
    assert [i["name"] for i in edges["inputs"]] == ["sample", "timestep", "context", "image"]
    assert edges["inputs"][-1]["shape"] == ["batch", 3, "image_height", "image_width"]
    assert [o["name"] for o in edges["outputs"]] == residuals
    for name in ("unet_control", "controlnet_edges", "controlnet_depth"):
        assert max(manifest["networks"][name]["check"]["rel_err"].values()) < LATENT_TOL
    entry = manifest["controlnets"]["edges"]
    assert entry["network"] == "controlnet_edges" and len(entry["hash"]) == 64
    config = json.loads((controlnets / "edges" / "config.json").read_text())
    assert entry["config"]["embedding_channels"] == config["conditioning_embedding_out_channels"]


def test_export_holds_one_controlnet_at_a_time(export_run, controlnets):
    """The export loads each ControlNet as its graph's turn comes, the one before freed by then (``export_run``
    checks that at each load), and the manifest records each with its weights' hash."""
    from sdfast.control.loading import load_controlnet
    from sdfast.export.manifest import module_hash

    folder, loaded = export_run
    assert len(loaded) == 2
    manifest = read_manifest(folder)
    assert manifest["controlnets"]["depth"]["hash"] == module_hash(load_controlnet(controlnets / "depth"))
    assert manifest["controlnets"]["edges"]["hash"] == module_hash(load_controlnet(controlnets / "edges"))


def test_export_refuses_a_controlnet_of_another_model_before_writing(sdxl, controlnets, tmp_path, capsys,
                                                                      monkeypatch):
    """An SD 1.x ControlNet given to an SDXL export: one line naming the flag and the mismatch, before any graph,
    with no ControlNet loaded (its config and file header are enough)."""
    def no_loading(*args, **kwargs):
        raise AssertionError("a ControlNet was loaded")

    monkeypatch.setattr("sdfast.control.loading.load_controlnet", no_loading)
    out = tmp_path / "onnx"
    assert main(["export", str(sdxl.path), "-o", str(out), "--controlnet", str(controlnets / "edges")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"sdfast export: error: --controlnet \S+edges: this ControlNet was made for another model: "
                        r"its context_dim is \d+, this U-Net's \d+ .*", err)
    assert not out.exists()


def test_export_refuses_a_broken_controlnet_before_writing(sd1, controlnets, tmp_path, capsys):
    """A ControlNet file missing a weight is refused before the first graph, though it is loaded only when its own
    graph's turn comes."""
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(controlnets / "depth", tmp_path / "broken")
    weights = next(broken.glob("*.safetensors"))
    state = load_file(weights)
    missing = sorted(state)[0]
    del state[missing]
    save_file(state, weights)
    out = tmp_path / "onnx"
    assert main(["export", str(sd1.path), "-o", str(out), "--controlnet", str(controlnets / "edges"),
                 "--controlnet", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"--controlnet {broken}: controlnet: the checkpoint does not match the network" in err
    assert f"missing 1 keys: {missing}" in err
    assert not out.exists()


def test_an_export_without_the_controlled_unet_is_refused(sd1_onnx, exported, controlnets):
    pipe = sdfast.load(sd1_onnx.folder, backend="onnxruntime")
    with pytest.raises(ValueError, match=r"has no controlled U-Net graph \(unet_control.onnx\), so its U-Net takes "
                                         r"no ControlNet residuals: export again with `sdfast export MODEL -o .* "
                                         r"--controlnet PATH`"):
        pipe.controlnets.load(controlnets / "edges")
    with pytest.raises(ValueError, match="has no controlled U-Net graph"):  # asked for at load
        sdfast.load(sd1_onnx.folder, backend="onnxruntime", controlnet=True)
    with pytest.raises(ValueError, match=r"has no graph of the ControlNet 'pose' \(it holds: edges, depth\): export "
                                         r"it with `sdfast export MODEL -o .* --controlnet .*pose`"):
        sdfast.load(exported, backend="onnxruntime").controlnets.load(controlnets / "pose")


def test_the_export_cache_exports_each_controlnet_as_it_loads(sd1, sd1_onnx, controlnets, reference, tmp_path):
    """A checkpoint loaded with controlnet=True gets the controlled U-Net in its cache entry; a ControlNet file is
    exported into the entry on its first load, named by its weights hash, and found there after."""
    cache = shutil.copytree(sd1_onnx.cache, tmp_path / "cache")  # the shared entry stays as it is
    plain = sdfast.load(sd1.path, backend="onnxruntime", cache=cache)
    with pytest.raises(ValueError, match="load the checkpoint with controlnet=True"):
        plain.controlnets.load(controlnets / "edges")
    pipe = sdfast.load(sd1.path, backend="onnxruntime", cache=cache, controlnet=True)
    pipe.controlnets.load(controlnets / "edges")
    entry, = [p for p in cache.iterdir() if p.is_dir()]
    manifest = read_manifest(entry)
    name, = manifest["controlnets"]
    assert manifest["networks"][f"controlnet_{name}"]["check"] is not None
    controls = CASES["one"]
    result = pipe.generate(**ARGS, controls=controls)
    assert rel_err(result.latents, reference.generate(**ARGS, controls=controls).latents) < LATENT_TOL
    again = sdfast.load(sd1.path, backend="onnxruntime", cache=cache, controlnet=True)
    again.controlnets.load(controlnets / "edges")
    assert list(read_manifest(entry)["controlnets"]) == [name]  # found, not exported again


def test_sdxl_controlnet_on_onnxruntime_equals_torch(sdxl, sdxl_onnx, tmp_path):
    """SDXL: the ControlNet graph takes text_embeds and time_ids too; exported into a copy of the cache entry."""
    random_controlnet(sdxl.pipe.unet, seed=5).save_pretrained(tmp_path / "xl")
    controls = [Control("xl", control_image(3, size=64), 0.8, 0.0, 1.0)]
    cache = shutil.copytree(sdxl_onnx.cache, tmp_path / "cache")
    pipe = sdfast.load(sdxl.path, backend="onnxruntime", cache=cache, controlnet=True)
    pipe.controlnets.load(tmp_path / "xl")
    torch_pipe = sdfast.load(sdxl.path)
    torch_pipe.controlnets.load(tmp_path / "xl")
    result = pipe.generate(**ARGS, controls=controls)
    expected = torch_pipe.generate(**ARGS, controls=controls)
    assert rel_err(result.latents, expected.latents) < LATENT_TOL
    assert rel_err(torch_pipe.generate(**ARGS, width=64, height=64).latents, expected.latents) > 1e-2


@NEEDS_TRT
def test_tensorrt_builds_the_control_graphs(exported):
    """Engines for the controlled U-Net (a residual per skip at its level's size) and a ControlNet (the control
    image in pixels), built by TensorRT-RTX without a GPU."""
    from sdfast.export import tensorrt as trt
    from sdfast.export.profiles import Shapes

    built = trt.build_engines(exported, Shapes.parse(["64x64-128x96"], [1, 2]),
                              networks=("unet_control", "controlnet_edges"), log=print)
    unet, edges = built["unet_control"].meta, built["controlnet_edges"].meta
    assert unet["profiles"][0]["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 12, 16]]
    assert unet["profiles"][0]["down_0"] == [[1, 32, 8, 8], [2, 32, 8, 8], [4, 32, 12, 16]]
    assert unet["profiles"][0]["mid"] == [[1, 64, 4, 4], [2, 64, 4, 4], [4, 64, 6, 8]]
    assert edges["profiles"][0]["image"] == [[1, 3, 64, 64], [2, 3, 64, 64], [4, 3, 96, 128]]
    io = {t["name"]: t["mode"] for t in edges["io"]}
    assert io["image"] == "input" and io["mid"] == "output" and io["down_5"] == "output"
    assert {t["name"] for t in unet["io"] if t["mode"] == "input"} >= {"down_0", "down_5", "mid"}


@NEEDS_TRT
@pytest.mark.gpu(reason="TensorRT engines execute only on a CUDA GPU")
def test_tensorrt_controlnet_equals_torch(exported, controlnets, reference):
    """fp32 engines (TensorRT may use TF32 for fp32 matmuls, hence 1e-2, as the other TensorRT parity tests)."""
    pipe = sdfast.load(exported, backend="tensorrt", device="cuda", build=True, sizes=["32x32"], batch=[1])
    for name in ("edges", "depth"):
        pipe.controlnets.load(controlnets / name)
    result = pipe.generate(**ARGS, controls=CASES["two"])
    expected = reference.generate(**ARGS, controls=CASES["two"])
    assert rel_err(result.latents.cpu(), expected.latents) < 1e-2
