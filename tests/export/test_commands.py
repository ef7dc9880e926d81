"""`sdfast export`, `sdfast build` and `--backend`: the deployment path from the command line, and its one-line
errors (exit code 2)."""

import pytest

from sdfast.cli import main

pytest.importorskip("onnxruntime", reason='the onnx extra is not installed: pip install -e ".[onnx]"')


def test_export_writes_a_folder_that_loads_alone(sd2_fp16_onnx):
    """The fixture ran `sdfast export MODEL -o DIR --dtype fp16`; the folder needs nothing else to load."""
    names = {p.name for p in sd2_fp16_onnx.folder.iterdir()}
    assert {"manifest.json", "text_encoder.onnx", "unet.onnx", "vae_decoder.onnx", "vae_encoder.onnx", "tokenizer",
            "scheduler"} <= names


def test_generate_on_an_export_folder(sd1_onnx, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat", "--model", str(sd1_onnx.folder), "--backend", "onnxruntime", "--steps", "2",
                 "--seed", "1", "-o", str(out), "--device", "cpu"]) == 0
    assert out.is_file() and "(seed 1)" in capsys.readouterr().out


def test_build_then_build_again_hits_the_cache(sd1_onnx, capsys):
    pytest.importorskip("sdfast.export.tensorrt")
    from sdfast.export.flavour import HAS_TENSORRT

    if not HAS_TENSORRT:
        pytest.skip("no TensorRT module: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    # the shapes test_tensorrt.py builds: whichever runs first builds, the other loads
    args = ["build", str(sd1_onnx.folder), "--sizes", "64x64", "64x64-128x96", "--batch", "1", "2",
            "--prompt-chunks", "2"]
    assert main(args) == 0
    assert main(args) == 0
    assert "0 built, 4 from the cache" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("argv,message", [
    (["export", "{model}", "-o", "{tmp}/x", "--dtype", "bf16"], "--dtype bf16: ONNX export writes fp32 or fp16"),
    (["export", "/nonexistent", "-o", "{tmp}/x"], "model /nonexistent does not exist"),
    (["build", "/nonexistent"], "export folder /nonexistent does not exist"),
    (["build", "{model}"], "has no manifest.json: not a folder written by `sdfast export`"),
    (["build", "{export}", "--sizes", "100x100"], "size '100x100': widths and heights must be positive multiples"),
    (["build", "{export}", "--networks", "unet", "clip"],
     "has no clip graph (exported: text_encoder, unet, vae_decoder, vae_encoder): name those"),
    (["generate", "a cat", "--model", "{export}"], "is an ONNX export (no torch weights)"),
    (["generate", "a cat", "--model", "{model}", "--backend", "tvm"], "unknown backend 'tvm'"),
])
def test_errors_are_one_line(sd1, sd1_onnx, tmp_path, capsys, argv, message):
    argv = [a.format(model=sd1.path, tmp=tmp_path, export=sd1_onnx.folder) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"sdfast {argv[0]}: error: ") and message in err


def test_export_defaults_to_the_shipped_model(tmp_path, monkeypatch):
    """As `generate`: no MODEL (and no $SDFAST_MODEL) exports the shapes model that ships with sdfast."""
    monkeypatch.delenv("SDFAST_MODEL", raising=False)
    from sdfast.cli import _parser

    assert _parser().parse_args(["export", "-o", str(tmp_path / "x")]).model is None
    assert main(["export", "-o", str(tmp_path / "shapes"), "--no-check"]) == 0
    assert (tmp_path / "shapes" / "manifest.json").is_file()
    import sdfast

    pipe = sdfast.load(tmp_path / "shapes", backend="onnxruntime")
    assert pipe.unet.config == sdfast.load().unet.config
