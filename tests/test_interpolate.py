"""``sdfast.interpolate``: slerp's properties, end frames equal to plain generation, the `sdfast interpolate` strip."""

import numpy as np
import pytest
import torch
from PIL import Image

import sdfast
from sdfast.cli import main
from sdfast.interpolate import interpolate, slerp, strip

STEPS = 3


@pytest.fixture(scope="module")
def pipe(sd1):
    return sdfast.load(sd1.path)


def test_slerp_ends_norm_and_midpoint():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 64, 64, generator=g).unbind(0)  # (4, 64, 64) each: the latents of a 512 px image
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=0, atol=1e-6)
    mid = slerp(a, b, 0.5)
    # two independent Gaussian draws are nearly orthogonal: the slerp midpoint keeps the norm such draws have, the
    # lerp one shrinks it by about 1/sqrt(2) (the washed-out frames slerp is there to avoid)
    typical = ((a.norm() ** 2 + b.norm() ** 2) / 2).sqrt()
    assert abs(mid.norm() / typical - 1) < 0.02
    assert abs((0.5 * (a + b)).norm() / typical - 2 ** -0.5) < 0.02
    assert mid.dtype == a.dtype and mid.shape == a.shape
    # on unit vectors it walks the great circle: every point a unit vector, at angle t * theta from a
    u, v = a / a.norm(), b / b.norm()
    theta = torch.arccos((u * v).sum())
    for t in (0.25, 0.5, 0.8):
        w = slerp(u, v, t)
        torch.testing.assert_close(w.norm(), torch.tensor(1.0), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.arccos((w * u).sum().clamp(max=1)), t * theta, rtol=1e-4, atol=1e-4)


def test_slerp_of_parallel_vectors_is_linear():
    a = torch.ones(16)
    torch.testing.assert_close(slerp(a, 3 * a, 0.25), 1.5 * a)


def test_end_frames_equal_plain_generation(pipe):
    frames = interpolate(pipe, "a red circle", "a blue square", 3, seed=5, seed_b=9, steps=STEPS)
    first = pipe.generate("a red circle", steps=STEPS, seed=5).images[0]
    last = pipe.generate("a blue square", steps=STEPS, seed=9).images[0]
    assert len(frames) == 3
    assert np.array_equal(np.asarray(frames[0]), np.asarray(first))
    assert np.array_equal(np.asarray(frames[-1]), np.asarray(last))
    assert not np.array_equal(np.asarray(frames[1]), np.asarray(first))  # the middle is a blend, not an end


def test_interpolate_refuses_bad_frames_and_stochastic_samplers(pipe):
    with pytest.raises(ValueError, match="frames=1: need at least 2"):
        interpolate(pipe, "a", "b", 1)
    with pytest.raises(ValueError, match="adds fresh noise at every step"):
        interpolate(pipe, "a", "b", 2, scheduler="euler_a")


def test_strip_places_frames_side_by_side():
    frames = [Image.new("RGB", (8, 6), (i * 50, 0, 0)) for i in range(4)]
    out = strip(frames)
    assert out.size == (32, 6)
    assert [out.getpixel((8 * i + 4, 3)) for i in range(4)] == [(i * 50, 0, 0) for i in range(4)]


def test_cli_writes_a_strip_of_frames(sd1, tmp_path, capsys):
    out = tmp_path / "strip.png"
    code = main(["interpolate", "a red circle", "a blue square", "--frames", "4", "--steps", str(STEPS),
                 "--model", str(sd1.path), "-o", str(out), "--width", "48"])
    assert code == 0
    assert Image.open(out).size == (4 * 48, 64)
    assert "4 frames, 'a red circle' -> 'a blue square' (seed 0)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--frames", "1"], "--frames 1: need at least 2 (the two ends)"),
    (["--scheduler", "euler_a"], "--scheduler euler_a adds fresh noise at every step"),
])
def test_cli_bad_input_exits_2_with_one_line(sd1, tmp_path, capsys, argv, message):
    code = main(["interpolate", "a", "b", "--model", str(sd1.path), "-o", str(tmp_path / "s.png"), *argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.png").exists()


def test_interpolate_defaults_do_not_leak_into_generate():
    from sdfast.cli import _parser

    inter = _parser().parse_args(["interpolate", "a", "b"])
    gen = _parser().parse_args(["generate", "a"])
    assert (inter.output, inter.seed) == ("strip.png", 0)  # a fixed seed: the same command redraws the same strip
    assert (gen.output, gen.seed) == ("out.png", None)


def test_sdxl_blends_the_pooled_embeddings_too(sdxl):
    """SDXL's U-Net also reads the pooled text (text_embeds): the end frames equal plain generation, and a middle
    frame is the one whose context and pooled text are both halfway."""
    pipe = sdfast.load(sdxl.path)
    frames = interpolate(pipe, "a red circle", "a blue square", 3, seed=5, steps=STEPS)
    for frame, prompt in ((frames[0], "a red circle"), (frames[-1], "a blue square")):
        assert np.array_equal(np.asarray(frame), np.asarray(pipe.generate(prompt, steps=STEPS, seed=5).images[0]))
    (ctx_a, pool_a), (ctx_b, pool_b) = (pipe.encode_prompt(p, pooled=True) for p in ("a red circle", "a blue square"))
    middle = pipe.generate(None, prompt_embeds=(ctx_a + ctx_b) / 2, pooled_prompt_embeds=(pool_a + pool_b) / 2,
                           steps=STEPS, seed=5)
    assert np.abs(np.asarray(frames[1], np.int16) - np.asarray(middle.images[0], np.int16)).max() <= 1
