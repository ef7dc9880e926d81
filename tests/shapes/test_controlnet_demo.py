"""The demo ControlNet "where" (``sdfast/shapes/train_controlnet.py``): its data puts each shape where its map says,
``--quick`` training writes a diffusers folder that loads, and the shipped one moves the default model's shape onto
held-out maps, through the Python API and ``sdfast generate --control``, where without it the shape goes elsewhere."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sdfast
from sdfast.cli import main as cli
from sdfast.control import Control, load_controlnet
from sdfast.models.controlnet import ControlNet
from sdfast.shapes.dataset import POSITIONS, SHAPES
from sdfast.shapes.evaluate_control import EXAMPLE_MAP, SHIPPED, TOLERANCE, centre, held_out
from sdfast.shapes.train_controlnet import (RADII, REACH, controlnet_config, controlnet_from_unet, make_data,
                                            parse_args, recorded_arguments, where_map)
from sdfast.shapes.train_controlnet import main as train

STEPS = 12  # fewer than the evaluation's 20; enough for the shape's place and colour to settle


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are small: one thread runs them about as fast as two, and on a CPU shared with other jobs
    two threads can be many times slower (measured here: 0.33 s against 1.4-48 s per 12-step image)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return sdfast.load()


def _distance(image: Image.Image, place) -> float:
    found = centre(image)
    cx, cy, _ = place
    return float(np.hypot(found[0] - 64 * cx, found[1] - 64 * cy)) if found else float("inf")


def test_data_draws_the_shape_where_its_map_is():
    images, maps, _ = make_data(48, seed=3)
    for image, where in zip(images, maps):
        disc = where > 127
        ys, xs = np.nonzero(disc)
        shape_at, map_at = np.array(centre(image)), np.array([xs.mean() + 0.5, ys.mean() + 0.5])
        assert np.hypot(*(shape_at - map_at)) < 1.5  # the triangle's centroid is its outline's centre too
    again, _, _ = make_data(48, seed=3)
    np.testing.assert_array_equal(images, again)
    # places spread over the picture, mostly away from the five positions a prompt can name
    centres = np.array([np.argwhere(m > 127).mean(axis=0)[::-1] for m in maps]) / 64  # (N, 2) as (x, y)
    named = np.array(list(POSITIONS.values()))  # (5, 2)
    away = np.linalg.norm(centres[:, None] - named[None], axis=-1).min(axis=1) > 4 / 64
    assert centres.min() < 0.3 and centres.max() > 0.7 and away.mean() > 0.5


def test_held_out_prompts_say_no_place_and_their_maps_are_new():
    cases = held_out()
    words = {w for phrase in POSITIONS for w in phrase.split()} | {"at", "in"}
    assert all(not set(prompt.split()) & words for prompt, _ in cases)
    assert {prompt.split()[-1] for prompt, _ in cases[:24]} == set(SHAPES)
    for _, (cx, cy, r) in cases:
        assert RADII[0] <= r <= RADII[1] and min(cx, cy) >= REACH * r and max(cx, cy) <= 1 - REACH * r
    training = make_data(200, seed=0)[1]  # the shipped run's first training maps
    held = np.stack([np.asarray(where_map(*place))[..., 0] for _, place in cases])
    assert not any((held == m).all(axis=(1, 2)).any() for m in training)


def test_a_new_controlnet_changes_nothing(pipe):
    """Copied from the U-Net with its zero convolutions at zero, as ControlNet training starts."""
    net = controlnet_from_unet(pipe.unet)
    encoder = {k: v for k, v in pipe.unet.state_dict().items() if k in net.state_dict()}
    assert encoder and all(torch.equal(net.state_dict()[k], v) for k, v in encoder.items())
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    down, mid = net(x, torch.tensor([10, 900]), context, torch.rand(2, 3, 64, 64))
    assert all(not d.any() for d in down) and not mid.any()


def test_quick_training_writes_a_folder_that_loads_the_same_bytes_twice(tmp_path, pipe):
    for run in ("a", "b"):
        train(["--out", str(tmp_path / run), "--quick"])  # --threads 1, as the fixture
    folder = tmp_path / "a"
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors",
                                                  "training.json", "example_map.png"}
    for p in folder.iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name
    assert json.loads((folder / "config.json").read_text()) == controlnet_config()
    training = json.loads((folder / "training.json").read_text())
    assert training["arguments"] == recorded_arguments(parse_args(["--out", "x", "--quick"]))
    net = load_controlnet(folder)
    assert isinstance(net, ControlNet) and net.config.embedding_channels == (8, 16, 32, 64)
    name = pipe.controlnets.load(folder, name="quick")
    try:
        image = pipe.generate("a red star", steps=2, seed=0, controls=[Control(name, Image.open(EXAMPLE_MAP))])
    finally:
        pipe.controlnets.unload(name)
    assert image.images[0].size == (64, 64)


def test_shipped_controlnet_is_small_fp16_and_records_its_training():
    weights = SHIPPED / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 4e6
    with safe_open(weights, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 (safe_open is not iterable)
    assert json.loads((SHIPPED / "config.json").read_text()) == controlnet_config()
    # retraining with the script's defaults rewrites this very folder
    training = json.loads((SHIPPED / "training.json").read_text())
    assert training["arguments"] == recorded_arguments(parse_args(["--out", str(SHIPPED)]))
    net = load_controlnet(SHIPPED)
    assert isinstance(net, ControlNet) and net.controlnet_mid_block.weight.abs().sum() > 0


def test_diffusers_reads_the_shipped_folder_to_the_same_residuals():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.ControlNetModel.from_pretrained(SHIPPED, torch_dtype=torch.float32).eval()
    ours = load_controlnet(SHIPPED)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    image = torch.from_numpy(np.asarray(Image.open(EXAMPLE_MAP), np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
    image = image[None].repeat(2, 1, 1, 1)
    t = torch.tensor([50, 700])
    with torch.no_grad():
        down, mid = ours(x, t, context, image)
        ref_down, ref_mid = reference(x, t, context, image, return_dict=False)
    for a, b in zip([*down, mid], [*ref_down, ref_mid], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_shipped_controlnet_puts_the_shape_on_held_out_maps(pipe):
    cases = held_out()[:6]
    name = pipe.controlnets.load(SHIPPED)
    assert name == "where"
    try:
        results = [(pipe.generate(prompt, steps=STEPS, guidance_scale=7.5, seed=i).images[0],
                    pipe.generate(prompt, steps=STEPS, guidance_scale=7.5, seed=i,
                                  controls=[Control(name, where_map(*place))]).images[0])
                   for i, (prompt, place) in enumerate(cases)]
    finally:
        pipe.controlnets.unload(name)
    without = [_distance(a, place) for (a, _), (_, place) in zip(results, cases)]
    with_control = [_distance(b, place) for (_, b), (_, place) in zip(results, cases)]
    assert max(with_control) <= TOLERANCE, with_control
    assert sum(d <= TOLERANCE for d in without) <= len(cases) // 2, without


def test_generate_command_with_the_example_map(tmp_path):
    out = tmp_path / "star.png"
    assert cli(["generate", "a red star", "--control", f"{SHIPPED}:{EXAMPLE_MAP}", "-o", str(out), "--steps",
                str(STEPS), "--seed", "0"]) == 0
    where = np.asarray(Image.open(EXAMPLE_MAP).convert("L")) > 127
    ys, xs = np.nonzero(where)
    x, y = centre(Image.open(out))
    assert np.hypot(x - xs.mean() - 0.5, y - ys.mean() - 0.5) <= TOLERANCE
