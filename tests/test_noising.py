"""``sdfast noise``: the forward process on the shipped model equals diffusers' ``add_noise`` on the same latents."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdfast
from sdfast.cli import main
from sdfast.noising import forward_process
from sdfast.request import RequestError
from sdfast.sampler import from_pil, to_pil

TIMESTEPS = [0, 250, 999]


@pytest.fixture(scope="module")
def pipe():
    return sdfast.load()


@pytest.fixture(scope="module")
def picture():
    return Path(__file__).parent / "shapes" / "golden_green_star.png"  # a 64 px picture the shipped model drew


def test_frames_are_diffusers_add_noise_decoded(pipe, picture):
    from diffusers import DDPMScheduler

    frames = forward_process(pipe, picture, TIMESTEPS, seed=3)
    assert [f.size for f in frames] == [(64, 64)] * 3
    latent = pipe.vae.encode(from_pil(Image.open(picture).convert("RGB"), 64, 64) * 2 - 1,
                             torch.Generator().manual_seed(3))
    noise = pipe.initial_noise(3)
    reference = DDPMScheduler.from_config(pipe.scheduler_config)
    for t, frame in zip(TIMESTEPS, frames):
        noisy = reference.add_noise(latent, noise, torch.tensor([t]))
        expected = np.asarray(to_pil(pipe.vae.decode(noisy))[0], dtype=np.int16)
        assert np.abs(np.asarray(frame, dtype=np.int16) - expected).max() <= 1
    original = np.asarray(Image.open(picture), dtype=np.float64)
    errors = [np.abs(np.asarray(f, dtype=np.float64) - original).mean() for f in frames]
    assert errors[0] < 20  # t = 0: the VAE's round trip of the picture (a tiny VAE)
    assert errors[0] < errors[1] < errors[2]  # the picture fades into the noise


def test_cli_writes_the_strip_and_refuses_bad_timesteps(picture, tmp_path, capsys):
    out = tmp_path / "strip.png"
    assert main(["noise", str(picture), "-o", str(out), "--timesteps", "0,500,999"]) == 0
    assert Image.open(out).size == (3 * 64, 64)
    assert main(["noise", str(picture), "-o", str(out), "--timesteps", "0,1000"]) == 2
    assert "--timesteps 1000: need integers in 0..999" in capsys.readouterr().err
    with pytest.raises(RequestError, match="timesteps=-1"):
        forward_process(sdfast.load(), picture, [-1])
