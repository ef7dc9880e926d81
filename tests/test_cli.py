"""The ``sdfast`` command line: outputs, previews, timings, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from sdfast.cli import main


def test_generate_writes_images_previews_and_timings(sd1, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "-o", str(out), "--model", str(sd1.path), "--steps", "4",
                 "--seed", "3", "--batch", "2", "--previews", str(tmp_path / "prev"), "--preview-every", "2",
                 "--timings", str(tmp_path / "t.json"), "--scheduler", "dpmpp_2m"])
    assert code == 0
    assert Image.open(tmp_path / "out-0.png").size == (64, 64) and (tmp_path / "out-1.png").is_file()
    assert sorted(p.name for p in (tmp_path / "prev").iterdir()) == [
        "step002-0.png", "step002-1.png", "step004-0.png", "step004-1.png"]
    timings = json.loads((tmp_path / "t.json").read_text())
    assert timings["seed"] == 3 and len(timings["unet_ms"]) == 4
    line = capsys.readouterr().out.strip()
    assert "(seed 3): 4 steps:" in line and "ms/call" in line


def test_img2img(sd1, tmp_path):
    Image.new("RGB", (72, 64), (200, 30, 30)).save(tmp_path / "in.png")
    code = main(["img2img", str(tmp_path / "in.png"), "a red square", "--strength", "0.5", "-o",
                 str(tmp_path / "o.png"), "--model", str(sd1.path), "--steps", "4"])
    assert code == 0
    assert Image.open(tmp_path / "o.png").size == (72, 64)


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--width", "500"], "--width/--height '500x64': not a positive multiple of 8"),
    (["generate", "x", "--scheduler", "nope"], "--scheduler 'nope': unknown; choose one of"),
    (["generate", "x", "--steps", "0"], "--steps 0: need an integer >= 1"),
    (["img2img", "IMG", "x", "--strength", "1.2"], "--strength 1.2: outside [0, 1]"),
    (["img2img", "/nonexistent.png", "x"], "IMAGE '/nonexistent.png': cannot read it: [Errno 2] No such file"),
    (["img2img", "BAD", "x"], "cannot read it: not a picture PIL can read"),
    (["generate", "x", "--model", "/no/such/model"], "model /no/such/model does not exist"),
    (["generate", "x", "--model", "NOTSD"], "not a diffusers pipeline folder"),
    (["generate", "x", "--previews", "prev", "--preview-every", "0"], "--preview-every 0 with --previews"),
    (["generate", "x", "--guidance", "nan"], "--guidance nan: not a finite number"),
    (["generate", "x", "--preview-decode", "fast"], "--preview-decode 'fast': choose 'linear'"),
    (["generate", "x", "--previews", "p", "--preview-decode", "linear"], "--preview-decode 'linear': this model's VAE"),
    pytest.param(["generate", "x", "--device", "cuda"], "--device 'cuda': this machine has no CUDA GPU",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without a GPU")),
])
def test_bad_input_exits_2_with_one_line(sd1, tmp_path, capsys, argv, message):
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    argv = [{"IMG": str(tmp_path / "img.png"), "BAD": str(tmp_path / "bad.png"), "NOTSD": str(tmp_path)}.get(a, a)
            for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(sd1.path)]
    assert main(argv + ["-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("sdfast ")


def test_missing_model_from_the_installed_command(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, "-m", "sdfast.cli", "generate", "a cat", "--model", str(missing),
                           "-o", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"sdfast generate: error: model {missing} does not exist"


def test_unknown_output_format_is_refused_before_generating(sd1, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(sd1.path), "-o", str(tmp_path / "o.tiff")]) == 2
    assert "must end in one of .png, .jpg, .jpeg, .webp" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_warnings_and_the_summary_speak_the_command_lines_words(sd1, tmp_path, capsys):
    """A truncated prompt is a warning line after the progress bar, naming --long-prompts; the summary counts the
    steps asked for and the U-Net calls heun made for them."""
    long = " ".join(["a red circle"] * 40)
    out = tmp_path / "o.png"
    assert main(["generate", long, "--model", str(sd1.path), "--steps", "3", "--scheduler", "heun", "-o",
                 str(out)]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("sdfast generate: warning: prompt truncated: ")
    assert "(pass --long-prompts to keep them)" in warning[0] and "long_prompts=True" not in captured.err
    assert "3 steps (5 U-Net calls): " in captured.out


def test_words_outside_the_default_models_world_are_a_warning(tmp_path, capsys):
    """The shipped model lists the words it was trained on (vocabulary.json): a prompt outside them still draws,
    with one warning line naming the words, instead of a silently unrelated picture."""
    assert main(["generate", "an astronaut riding a horse", "--steps", "2", "-o", str(tmp_path / "o.png")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and err[0].startswith("sdfast generate: warning: 'astronaut', 'horse', 'riding': not ")
    assert main(["generate", "Red star, upper-left, on grey.", "--steps", "2", "-o", str(tmp_path / "p.png")]) == 0
    assert "warning" not in capsys.readouterr().err
