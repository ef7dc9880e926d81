"""The phrasings the default model's text encoder learns from and is measured on: varied in every way the module
names, each saying what its scene is, and a held-out set no training caption matches."""

import random
import re

from sdfast.shapes.checker import prompt_attributes, prompt_position
from sdfast.shapes.dataset import HELD_OUT, TRAINING_SCENES, Scene
from sdfast.shapes.phrasing import (HELD_OUT_STRUCTURES, STRUCTURES, SYNONYMS, TRAINING_STRUCTURES, Style,
                                    held_out_phrasings, training_phrasings)
from sdfast.shapes.train import vocabulary

SCENE = Scene("circle", "orange", "large", "top left", "gray", "textured")


def test_a_style_words_every_attribute_its_own_way():
    style = Style(("PNB", 1, 3, 3), "a", (1, 1, 1, 0, 2, 1), "first", True, True)
    assert style.words(SCENE) == "In the upper left corner, an orange big circle, against a textured grey background."
    bare = Style(("NPB", 0, 2, 1), "", (0,) * 6, "upper", False, False)
    assert bare.words(SCENE) == "LARGE ORANGE CIRCLE TOP LEFT ON TEXTURED GRAY"
    assert bare.words(SCENE, size=False, position=False, background=False) == "ORANGE CIRCLE"
    centre = Style(("NPB", 0, 0, 0), "the", (0, 0, 0, 0, 2, 0), "lower", False, False)
    assert centre.words(Scene("star", "red", "small", "center", "white", "plain")) == \
        "the small red star in the middle on a white background"


def test_phrasings_say_what_their_scene_is():
    rng = random.Random(0)
    for scene in TRAINING_SCENES[::37]:
        for text, template in training_phrasings(scene, 8, rng) + [(Style.draw(rng).words(scene), scene.caption())]:
            assert prompt_attributes(text) == (scene.colour, scene.shape), text
            assert prompt_position(text) == prompt_position(template), (text, template)  # said in both or neither
            if prompt_position(text) is not None:
                assert prompt_position(text) == scene.position, text


def test_phrasings_vary_synonyms_articles_order_case_and_punctuation():
    rng = random.Random(1)
    texts = [t for scene in TRAINING_SCENES[::50] for t, _ in training_phrasings(scene, 20, rng)]
    words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    assert words >= {w for synonyms in SYNONYMS.values() for w in synonyms} | {"an", "one", "the", "corner"}
    assert any(t.isupper() for t in texts) and any(t.islower() for t in texts) and any(t[0].isupper() for t in texts)
    assert any("," in t for t in texts) and any(t.endswith(".") for t in texts)
    assert any(re.match(r"(at|in|on|over|against|top|bottom|upper|lower)\b", t.lower()) for t in texts)  # noun not first
    assert len(set(texts)) > 0.9 * len(texts)


def test_held_out_phrasings_are_never_training_captions():
    assert len(HELD_OUT_STRUCTURES) == len(STRUCTURES) // 5
    assert not set(HELD_OUT_STRUCTURES) & set(TRAINING_STRUCTURES)
    prompts = held_out_phrasings()
    assert len(prompts) == len(HELD_OUT) and prompts == held_out_phrasings()
    for prompt, scene in zip(prompts, HELD_OUT):  # every attribute said: the prompt names its held-out scene
        assert prompt_attributes(prompt) == (scene.colour, scene.shape) and prompt_position(prompt) == scene.position
    rng = random.Random(2)
    training = {t for scene in TRAINING_SCENES for t, _ in training_phrasings(scene, 4, rng)}
    assert not training & set(prompts)


def test_vocabulary_lists_the_phrasing_words():
    assert {"big", "middle", "upper", "grey", "backdrop", "an"} <= set(vocabulary())
