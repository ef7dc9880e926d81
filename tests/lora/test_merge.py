"""``pipe.loras``: load, rescale, per-call sets, unload bit-exactly; the same merge on the triton and compile backends
with nothing rebuilt (CUDA graphs replay the new weights, no dynamo recompilation)."""

import pytest
import torch

import sdfast
from conftest import rel_err
from lora_files import TEXT_TARGETS, UNET_TARGETS, random_lora, targets, write_kohya
from sdfast.lora import LoRAError
from sdfast.request import RequestError

ARGS = dict(prompt="a red circle", negative_prompt="blurry", steps=2, seed=3, width=32, height=32)
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _write(ref, folder, name: str, seed: int, rank: int = 4):
    parts = {"lora_unet": random_lora(targets(ref.pipe.unet, UNET_TARGETS), rank, seed),
             "lora_te": random_lora(targets(ref.pipe.text_encoder, TEXT_TARGETS), rank, seed + 1)}
    return write_kohya(folder / f"{name}.safetensors", parts, alpha=float(rank))


@pytest.fixture(scope="module")
def files(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {"a": _write(sd1, folder, "a", 1), "b": _write(sd1, folder, "b", 2)}


@pytest.fixture(scope="module")
def expected(sd1, files):
    """Latents of the torch backend: none, a, a at 0.5, a + b."""
    pipe = sdfast.load(sd1.path, device=DEVICE)
    out = {"none": pipe.generate(**ARGS).latents}
    pipe.loras.load(files["a"])
    out["a"] = pipe.generate(**ARGS).latents
    pipe.loras.set_scale("a", 0.5)
    out["a/2"] = pipe.generate(**ARGS).latents
    pipe.loras.load(files["b"])
    pipe.loras.set_scale("a", 1.0)
    out["a+b"] = pipe.generate(**ARGS).latents
    return out


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v.clone() for net in ("unet", "text_encoder")
            for k, v in getattr(pipe, net).state_dict().items()}


def test_unload_restores_the_base_weights_bit_exactly(sd1, files, expected):
    pipe = sdfast.load(sd1.path)
    base = _weights(pipe)
    pipe.loras.load(files["a"], scale=0.7)
    pipe.loras.load(files["b"])
    changed = _weights(pipe)
    assert any(not torch.equal(base[k], changed[k]) for k in base)
    pipe.loras.unload("a")
    assert pipe.loras.scales == {"b": 1.0}
    pipe.loras.unload()
    assert len(pipe.loras) == 0 and not pipe.loras._base
    after = _weights(pipe)
    assert all(torch.equal(base[k], after[k]) for k in base)
    assert torch.equal(pipe.generate(**ARGS).latents, expected["none"])


def test_scales_and_per_call_sets(sd1, files, expected):
    pipe = sdfast.load(sd1.path)
    pipe.loras.load(files["a"])
    pipe.loras.load(files["b"], scale=0.0)  # loaded, off by default
    assert torch.equal(pipe.generate(**ARGS).latents, expected["a"])
    assert torch.equal(pipe.generate(**ARGS, loras={}).latents, expected["none"])  # this call without any
    assert rel_err(pipe.generate(**ARGS, loras={"a": 0.5}).latents, expected["a/2"]) < 1e-6
    assert rel_err(pipe.generate(**ARGS, loras={"a": 1, "b": 1}).latents, expected["a+b"]) < 1e-6
    assert torch.equal(pipe.generate(**ARGS).latents, expected["a"])  # the defaults again


@pytest.mark.parametrize("loras,message", [
    ({"c": 1.0}, r"loras='c': no such LoRA is loaded \(loaded: 'a'\)"),
    ({"a": float("nan")}, r"loras=\{'a': nan\}: a LoRA's scale must be a number in \[-10, 10\]"),
    ({"a": 11}, r"must be a number in"),
    (["a"], r"need a mapping of loaded LoRA names to scales"),
])
def test_bad_per_call_loras_are_request_errors(sd1, files, loras, message):
    pipe = sdfast.load(sd1.path)
    pipe.loras.load(files["a"])
    with pytest.raises(RequestError, match=message):
        pipe.generate(**ARGS, loras=loras)


def test_api_mistakes_are_named(sd1, files, tmp_path):
    pipe = sdfast.load(sd1.path)
    with pytest.raises(LoRAError, match="does not exist"):
        pipe.loras.load(tmp_path / "missing.safetensors")
    pipe.loras.load(files["a"])
    with pytest.raises(LoRAError, match="named 'a' is loaded already"):
        pipe.loras.load(files["a"])
    with pytest.raises(LoRAError, match=r"no LoRA named 'x' is loaded \(loaded: 'a'\)"):
        pipe.loras.set_scale("x", 1.0)
    with pytest.raises(ValueError, match=r"scale=\{'a': inf\}"):
        pipe.loras.set_scale("a", float("inf"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LoRAError, match="not a readable safetensors file"):
        pipe.loras.load(tmp_path / "bad.safetensors")


def test_triton_backend_merges_into_the_fused_weights(sd1, files):
    """The triton backend's fused QKV weights are views of the parameters a merge writes; the result equals the
    torch backend's. One U-Net step and no decode (``denoising_end``): Triton's CPU interpreter takes seconds a call."""
    pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
    args = dict(ARGS, denoising_end=0.5)
    reference = sdfast.load(sd1.path, device=DEVICE)
    none = reference.generate(**args).latents
    reference.loras.load(files["a"])
    with_a = reference.generate(**args).latents
    assert rel_err(with_a, none) > 1e-3  # the LoRA does change the step
    pipe = sdfast.load(sd1.path, device=DEVICE, dtype="fp32", backend="triton", cuda_graph=CUDA)
    assert rel_err(pipe.generate(**args).latents, none) < 1e-5  # a CUDA graph captured (on a GPU) before any LoRA
    pipe.loras.load(files["a"])
    assert rel_err(pipe.generate(**args).latents, with_a) < 1e-5
    pipe.loras.unload()
    assert rel_err(pipe.generate(**args).latents, none) < 1e-5


def test_compile_backend_swaps_without_recompiling(sd1, files, expected):
    from torch._dynamo.utils import counters

    pipe = sdfast.load(sd1.path, device=DEVICE, dtype="fp32", backend="compile", compiler="eager")
    assert rel_err(pipe.generate(**ARGS).latents, expected["none"]) < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    pipe.loras.load(files["a"])
    assert rel_err(pipe.generate(**ARGS).latents, expected["a"]) < 1e-5
    pipe.loras.set_scale("a", 0.5)
    assert rel_err(pipe.generate(**ARGS).latents, expected["a/2"]) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs  # the same compiled graph ran all three


def test_cli_applies_each_lora_at_its_scale(sd1, files, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from sdfast.cli import main

    out = tmp_path / "out.png"
    argv = ["generate", ARGS["prompt"], "--negative", ARGS["negative_prompt"], "--model", str(sd1.path), "--steps",
            "2", "--seed", "3", "--width", "32", "--height", "32", "-o", str(out)]
    assert main(argv + ["--lora", f"{files['a']}:0.5", "--lora", str(files["b"])]) == 0
    pipe = sdfast.load(sd1.path)
    pipe.loras.load(files["a"], 0.5)
    pipe.loras.load(files["b"])
    want = np.asarray(pipe.generate(**ARGS).images[0], dtype=int)
    assert np.abs(np.asarray(Image.open(out), dtype=int) - want).max() <= 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:  # argparse's own refusal of a flag's value: usage and one error line
        main(argv + ["--lora", f"{files['a']}:12"])
    assert exit.value.code == 2
    assert f"argument --lora: '{files['a']}:12': a LoRA's scale must be a number in [-10, 10]" in \
        capsys.readouterr().err
    assert main(argv + ["--lora", str(tmp_path / "none.safetensors")]) == 2
    assert "--lora " in capsys.readouterr().err


def test_onnxruntime_takes_loras_without_a_new_export(sd1_onnx, files, expected):
    """The exported graphs get the merged weights as overriding initializers of a new session: the folder's files
    are untouched, and the images equal the torch backend's."""
    folder = sd1_onnx.folder
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    pipe = sdfast.load(folder, backend="onnxruntime")
    assert rel_err(pipe.generate(**ARGS).latents, expected["none"]) < 1e-5
    pipe.loras.load(files["a"])
    assert rel_err(pipe.generate(**ARGS).latents, expected["a"]) < 1e-5
    pipe.loras.set_scale("a", 0.5)
    assert rel_err(pipe.generate(**ARGS).latents, expected["a/2"]) < 1e-5
    pipe.loras.unload()
    assert torch.equal(pipe.generate(**ARGS).latents, sdfast.load(folder, backend="onnxruntime").generate(**ARGS).latents)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
