"""The checker on ground-truth renders: the colour always, the shape nearly always; no shape on a blank image; the
demo LoRA's diamond only when asked for."""

import numpy as np
import pytest

from sdfast.shapes.checker import check, classify, prompt_attributes, prompt_position
from sdfast.shapes.dataset import ALL_SCENES, DEMO_SHAPES, DIAMOND_SCENES, HELD_OUT, render


@pytest.fixture(scope="module")
def renders():
    """Every held-out scene plus 150 other scenes spread over all combinations, each rendered once."""
    rng = np.random.default_rng(11)
    scenes = list(HELD_OUT) + list(ALL_SCENES[::10][:150])
    return [(render(scene, rng), scene) for scene in scenes]


def test_checker_agrees_with_ground_truth(renders):
    checks = [check(image, scene.caption()) for image, scene in renders]
    assert np.mean([c.colour_ok for c in checks]) == 1.0
    assert np.mean([c.shape_ok for c in checks]) >= 0.98
    assert all(c.position_ok for c in checks)


def test_position_is_only_checked_when_the_prompt_names_one(renders):
    image, scene = renders[0]
    assert check(image, f"a {scene.colour} {scene.shape}").position_ok is None
    assert classify(image).position == scene.position
    elsewhere = "bottom right" if scene.position == "top left" else "top left"
    assert check(image, f"a {scene.colour} {scene.shape} at the {elsewhere}").position_ok is False


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "star"])
def test_every_shape_is_recognised(renders, shape):
    verdicts = [classify(image).shape for image, scene in renders if scene.shape == shape]
    assert np.mean([v == shape for v in verdicts]) >= 0.95


def test_no_shape_on_plain_or_textured_background():
    assert classify(np.full((64, 64, 3), 128, np.uint8)).shape is None
    noise = np.random.default_rng(0).integers(110, 146, (64, 64, 1)).repeat(3, axis=2).astype(np.uint8)
    assert classify(noise) == classify(np.full((64, 64, 3), 20, np.uint8))  # grey noise has no chroma
    assert not check(np.full((64, 64, 3), 240, np.uint8), "a red circle").colour_ok


def test_prompt_attributes():
    assert prompt_attributes("a small Red circle, at the top left") == ("red", "circle")
    assert prompt_attributes("a cat") == (None, None)
    assert prompt_attributes("RED star, top-left.") == ("red", "star")


def test_prompt_position_reads_every_wording():
    assert prompt_position("a red star at the top left") == "top left"
    assert prompt_position("Red star, upper-left corner.") == "top left"
    assert prompt_position("in the lower right, a big blue square") == "bottom right"
    assert {prompt_position(f"a star in the {w}") for w in ("center", "centre", "middle")} == {"center"}
    assert prompt_position("a red star") is None and prompt_position("a star on the left") is None


def test_diamond_is_read_when_asked_for_and_takes_none_of_the_four_shapes(renders):
    rng = np.random.default_rng(5)
    diamonds = [render(scene, rng) for scene in DIAMOND_SCENES[::3]]
    checks = [check(image, scene.caption(), DEMO_SHAPES) for image, scene in zip(diamonds, DIAMOND_SCENES[::3])]
    assert all(c.colour_ok and c.shape_ok for c in checks), [c.verdict for c in checks if not c.shape_ok][:3]
    # the default four: a diamond has the triangle's extent and solidity, and a prompt's "diamond" is no shape word
    assert {classify(image).shape for image in diamonds} == {"triangle"}
    assert prompt_attributes("a red diamond") == ("red", None)
    assert prompt_attributes("a red diamond", DEMO_SHAPES) == ("red", "diamond")
    # with the diamond among the shapes, the four shapes' renders read as before
    assert all(classify(image, DEMO_SHAPES) == classify(image) for image, _ in renders[::2])
