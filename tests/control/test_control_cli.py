"""``sdfast generate --control MODEL:IMAGE[:SCALE[:START:END]]`` and ``--preprocess canny`` on the shipped model."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnets import random_controlnet
from sdfast.cli import main
from sdfast.control.preprocess import canny
from sdfast.loading import DEFAULT_MODEL


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    """A random ControlNet for the shipped model (its U-Net's encoder copied, every weight then redrawn)."""
    from diffusers import UNet2DConditionModel

    net = random_controlnet(UNet2DConditionModel.from_pretrained(DEFAULT_MODEL / "unet"), seed=0)
    folder = tmp_path_factory.mktemp("cn") / "random-controlnet"
    net.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 20, 44, 52), fill=(220, 40, 40))
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    image.save(path)
    return path


def test_canny_draws_the_edges(photo):
    edges = np.asarray(canny(Image.open(photo)))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges[..., 0])
    assert xs.min() >= 10 and xs.max() <= 46 and ys.min() >= 18 and ys.max() <= 54  # around the disc only
    assert edges[36, 28, 0] == 0  # the disc's inside is not an edge


def test_generate_with_a_control(controlnet, photo, tmp_path):
    args = ["generate", "a red circle", "--steps", "3", "--seed", "1"]
    assert main([*args, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "-o", str(tmp_path / "control.png"), "--control", f"{controlnet}:{photo}:0.8"]) == 0
    assert main([*args, "-o", str(tmp_path / "canny.png"), "--control", f"{controlnet}:{photo}:1:0:0.5",
                 "--preprocess", "canny"]) == 0
    pictures = [np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16) for name in
                ("plain", "control", "canny")]
    assert pictures[0].shape == pictures[1].shape == (64, 64, 3)
    assert np.abs(pictures[0] - pictures[1]).max() > 10 and np.abs(pictures[1] - pictures[2]).max() > 10


@pytest.mark.parametrize("control,expected", [
    ("{net}:{photo}:11", "--control controls[0].scale=11.0: outside [-10, 10]"),
    ("{net}:{photo}:1:0.7:0.2", "--control controls[0].start=[0.7, 0.2]: need 0 <= start < end <= 1"),
    ("{net}:/no/such.png", "--control controls[0].image='/no/such.png': cannot read it"),
    ("/no/such/net:{photo}", "--control /no/such/net: no such ControlNet folder or file"),
])
def test_errors_name_the_flag(controlnet, photo, capsys, control, expected):
    code = main(["generate", "a red circle", "--steps", "1", "--control", control.format(net=controlnet,
                                                                                         photo=photo)])
    assert code == 2
    assert expected in capsys.readouterr().err
