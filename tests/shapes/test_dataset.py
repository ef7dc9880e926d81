"""The synthetic shapes data: deterministic renders, the captions' wording, a held-out split training never sees;
the demo LoRA's diamond."""

import numpy as np

from sdfast.shapes.dataset import (ALL_SCENES, COLOURS, HELD_OUT, SHAPES, TRAINING_SCENES, Scene, held_out_prompts,
                                   make_dataset, render)


def test_same_seed_same_data_other_seed_other_data():
    images, scenes = make_dataset(12, seed=3)
    again, scenes_again = make_dataset(12, seed=3)
    other, _ = make_dataset(12, seed=4)
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and scenes == scenes_again
    assert not np.array_equal(images, other)


def test_captions():
    scene = Scene("circle", "red", "small", "top left", "white", "plain")
    assert scene.caption() == "a small red circle at the top left on a white background"
    assert scene.caption(size=False, position=False, background=False) == "a red circle"
    textured = Scene("star", "blue", "large", "center", "gray", "textured")
    assert textured.caption() == "a large blue star in the center on a textured gray background"
    assert textured.caption(size=False, background=False) == "a blue star in the center"


def test_held_out_is_a_tenth_disjoint_from_training_and_covers_every_colour_shape_pair():
    assert len(ALL_SCENES) == 4 * 6 * 2 * 5 * 3 * 2 == len(set(ALL_SCENES))
    assert len(HELD_OUT) == len(ALL_SCENES) // 10
    assert not set(HELD_OUT) & set(TRAINING_SCENES)
    assert len(HELD_OUT) + len(TRAINING_SCENES) == len(ALL_SCENES)
    pairs = {(s.colour, s.shape) for s in TRAINING_SCENES}
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES}  # the model meets every pair, just not every scene
    _, scenes = make_dataset(500, seed=0)
    assert not set(scenes) & set(HELD_OUT)
    assert held_out_prompts() == [s.caption() for s in HELD_OUT] and len(set(held_out_prompts())) == len(HELD_OUT)


def test_render_draws_the_scene():
    rng = np.random.default_rng(0)
    image = render(Scene("square", "green", "large", "bottom right", "black", "plain"), rng).astype(int)
    assert abs(image[5, 5] - 20).max() <= 1  # the black background, away from the shape
    # the centre of the bottom-right square is its colour (within the +-12 jitter)
    assert abs(image[43, 43] - np.array(COLOURS["green"])).max() <= 12
    assert abs(image[20, 20] - 20).max() <= 1  # top left stays background


def test_render_draws_a_diamond_a_square_turned_45_degrees():
    rng = np.random.default_rng(0)
    image = render(Scene("diamond", "blue", "large", "center", "white", "plain"), rng).astype(int)
    assert abs(image[32, 32] - np.array(COLOURS["blue"])).max() <= 12  # the centre
    assert abs(image[32, 17] - np.array(COLOURS["blue"])).max() <= 12  # towards the left corner, 1.25 r = 21 px out
    assert abs(image[19, 19] - 240).max() <= 1  # inside a square of this size (0.88 r = 15 px), outside the diamond
