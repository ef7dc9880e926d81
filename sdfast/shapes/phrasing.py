"""How people word a scene: the varied captions the default model's text encoder learns from (``train.py``'s third
stage) and the held-out phrasings it is measured on (``evaluate.py``).

``Scene.caption`` writes one template ("a small red circle at the top left on a white background"). People write
"red circle top left", "A big red circle in the upper-left corner, against a grey background." or "at the top left,
a red circle". A ``Style`` is one way of wording any scene, a choice in each of:

- structure: the order of the noun phrase (N), the position (P) and the background (B); the noun phrase's own order
  ("a small red circle" or "a red small circle"); the form of the position ("at the top left", "in the top left",
  "top left", "in the top left corner", "at top left", "top-left") and of the background ("on a white background",
  "on white", "white background", "against a white background", "over a white backdrop");
- words: the article ("a" / "an", none, "one", "the") and synonyms (``SYNONYMS``: big / large, middle / center,
  upper / top, grey / gray, ...);
- surface: letter case, commas or spaces between the parts, a full stop or none.

The structures are split, seeded: ``HELD_OUT_STRUCTURES`` (a fifth of them) word no training caption. Their prompts
(``held_out_phrasings``) word the held-out scenes (``dataset.HELD_OUT``, combinations never rendered for training)
with every attribute said, so no evaluated prompt is a training caption, nor a rewording of a trained structure.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

from .dataset import HELD_OUT, Scene

SYNONYMS = {  # the template's word -> every word training uses for it (the template's first)
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
    "top": ("top", "upper"),
    "bottom": ("bottom", "lower"),
    "center": ("center", "centre", "middle"),
    "gray": ("gray", "grey"),
}
ARTICLES = ("a", "", "one", "the")  # "a" becomes "an" before a vowel
ORDERS = ("NPB", "NBP", "PNB", "BNP")
NOUN_FORMS = ("{size} {colour} {shape}", "{colour} {size} {shape}")
POSITION_FORMS = (  # (a corner, the centre)
    ("at the {place}", "in the {place}"),
    ("in the {place}", "in the {place}"),
    ("{place}", "{place}"),
    ("in the {place} corner", "in the {place}"),
    ("at {place}", "at {place}"),
    ("{vertical}-{horizontal}", "{place}"),
)
BACKGROUND_FORMS = ("on a {background} background", "on {background}", "{background} background",
                    "against a {background} background", "over a {background} backdrop")
CASES = ("lower", "first", "upper", "title")
STRUCTURES = tuple(itertools.product(ORDERS, range(len(NOUN_FORMS)), range(len(POSITION_FORMS)),
                                     range(len(BACKGROUND_FORMS))))
HELD_OUT_STRUCTURES = tuple(sorted(random.Random(2024).sample(STRUCTURES, len(STRUCTURES) // 5)))
TRAINING_STRUCTURES = tuple(s for s in STRUCTURES if s not in set(HELD_OUT_STRUCTURES))


@dataclass(frozen=True)
class Style:
    """One way of wording a scene (see the module docstring); ``structure`` is one of ``STRUCTURES``, ``synonyms``
    picks each ``SYNONYMS`` entry's word by index (modulo its length)."""
    structure: tuple[str, int, int, int]
    article: str
    synonyms: tuple[int, ...]
    case: str
    commas: bool
    full_stop: bool

    @classmethod
    def draw(cls, rng: random.Random, structures: tuple = TRAINING_STRUCTURES) -> "Style":
        return cls(rng.choice(structures), rng.choice(ARTICLES), tuple(rng.randrange(3) for _ in SYNONYMS),
                   rng.choice(CASES), rng.random() < 0.5, rng.random() < 0.3)

    def word(self, word: str) -> str:
        """``word`` or the synonym this style uses for it."""
        if word not in SYNONYMS:
            return word
        choices = SYNONYMS[word]
        return choices[self.synonyms[list(SYNONYMS).index(word)] % len(choices)]

    def words(self, scene: Scene, size: bool = True, position: bool = True, background: bool = True) -> str:
        """``scene`` in this style; each flag keeps one attribute, as ``Scene.caption``'s do."""
        order, noun_form, position_form, background_form = self.structure
        noun = NOUN_FORMS[noun_form].format(size=self.word(scene.size) if size else "", colour=scene.colour,
                                            shape=scene.shape)
        article = self.article
        if article == "a" and noun.lstrip()[0] in "aeiou":
            article = "an"
        parts = {"N": " ".join(f"{article} {noun}".split())}
        if position:
            vertical, _, horizontal = scene.position.partition(" ")
            corner, centre = POSITION_FORMS[position_form]
            if scene.position == "center":
                parts["P"] = centre.format(place=self.word("center"))
            else:
                parts["P"] = corner.format(place=f"{self.word(vertical)} {horizontal}", vertical=self.word(vertical),
                                           horizontal=horizontal)
        if background:
            texture = "textured " if scene.texture == "textured" else ""
            parts["B"] = BACKGROUND_FORMS[background_form].format(
                background=texture + self.word(scene.background))
        text = (", " if self.commas else " ").join(parts[p] for p in order if p in parts)
        text += "." if self.full_stop else ""
        if self.case == "upper":
            return text.upper()
        if self.case == "title":
            return text.title()
        return text[0].upper() + text[1:] if self.case == "first" else text


def training_phrasings(scene: Scene, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` wordings of ``scene`` in training styles, each saying a random subset of size, position and
    background (as the template wordings do), beside the template caption that says the same."""
    pairs = []
    for _ in range(n):
        style, said = Style.draw(rng), [rng.random() < 0.5 for _ in range(3)]
        pairs.append((style.words(scene, *said), scene.caption(*said)))
    return pairs


def held_out_phrasings(seed: int = 0) -> list[str]:
    """One wording of each held-out scene in a held-out structure, every attribute said: prompts whose scene
    training never rendered and whose structure no training caption has."""
    rng = random.Random(seed)
    return [Style.draw(rng, HELD_OUT_STRUCTURES).words(scene) for scene in HELD_OUT]


def phrasing_words() -> set[str]:
    """Every word a training phrasing may use beyond the templates' words."""
    forms = " ".join(ARTICLES + NOUN_FORMS + BACKGROUND_FORMS + sum(POSITION_FORMS, ()))
    words = set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", forms)))
    return words | {"an"} | {w for synonyms in SYNONYMS.values() for w in synonyms}
