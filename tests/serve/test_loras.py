"""LoRAs over HTTP without Ray: a request names LoRAs of the server's folder (never a path), batches only with the
same set, and each replica keeps a bounded number loaded."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdfast
from sdfast.request import ModelFacts
from sdfast.serve.batching import generate_batch
from sdfast.serve.loras import LoRACache, listing
from sdfast.serve.options import ServeOptions
from sdfast.serve.requests import GenerationRequest, Limits, RequestError, parse_request

sys.path.insert(0, str(Path(__file__).parents[1] / "lora"))
from lora_files import TEXT_TARGETS, UNET_TARGETS, random_lora, targets, write_kohya  # noqa: E402

FACTS = ModelFacts(vae_scale_factor=8, default_size=64, latent_channels=4, clip_layers=4, is_xl=False, aesthetic=False)
OFFERED = frozenset({"pink", "outline"})


def parse(**fields):
    return parse_request(json.dumps({"prompt": "a red circle", **fields}).encode(), "txt2img", Limits(), "tiny",
                         FACTS, OFFERED)


@pytest.fixture(scope="module")
def folder(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-loras")
    for i, name in enumerate(("pink", "outline", "third")):
        write_kohya(folder / f"{name}.safetensors",
                    {"lora_unet": random_lora(targets(sd1.pipe.unet, UNET_TARGETS), 4, 10 + i),
                     "lora_te": random_lora(targets(sd1.pipe.text_encoder, TEXT_TARGETS), 4, 20 + i)}, alpha=4.0)
    (folder / "../escape.safetensors").write_bytes(b"")  # beside the folder: never offered
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


def test_a_request_names_offered_loras_with_scales():
    req = parse(loras={"pink": 0.8, "outline": 1})
    assert req.loras == (("outline", 1.0), ("pink", 0.8))
    assert parse().loras == () and parse(loras=None).loras == ()
    assert req.batch_key() != parse().batch_key() != parse(loras={"pink": 0.5}).batch_key()
    assert parse(loras={"pink": 0.8, "outline": 1}).batch_key() == req.batch_key()


@pytest.mark.parametrize("loras,message", [
    ({"../escape": 1}, "loras: no LoRA named '../escape' on this server; it offers 'outline', 'pink'"),
    ({"/etc/passwd": 1}, "no LoRA named '/etc/passwd'"),
    ({"pink": "1"}, "loras={'pink': '1'}: a LoRA's scale must be a number in [-10, 10]"),
    ({"pink": 1e9}, "a LoRA's scale must be a number"),
    ({"pink": [1]}, "the scale of 'pink' holds a JSON array: send a number"),
    ({"pink": 1, "outline": 1, "a": 1, "b": 1, "c": 1}, "loras names 5 LoRAs, over the limit of 4 (limits.max_loras)"),
    ("pink", "loras='pink': need a mapping of loaded LoRA names to scales"),
])
def test_bad_loras_are_422s_naming_the_field(loras, message):
    with pytest.raises(RequestError) as e:
        parse(loras=loras)
    assert e.value.status == 422 and message in str(e.value), str(e.value)


def test_the_listing_holds_only_safetensors_stems_of_the_folder(folder, tmp_path):
    assert sorted(listing(folder)) == ["outline", "pink", "third"]
    assert listing(None) == {}
    with pytest.raises(ValueError, match="is not a folder"):
        ServeOptions(lora_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="max_loaded_loras=2 is below limits.max_loras=4"):
        ServeOptions(max_loaded_loras=2)


def test_a_replica_keeps_at_most_its_capacity_and_batches_paint_as_the_api(sd1, folder):
    pipe = sdfast.load(sd1.path)
    cache = LoRACache(pipe, listing(folder), capacity=2)
    cache.ensure(["pink"])
    cache.ensure(["outline"])
    cache.ensure(["pink"])  # now the most recently used
    cache.ensure(["third"])  # evicts outline
    assert sorted(pipe.loras.scales) == ["pink", "third"]
    with pytest.raises(ValueError, match="over max_loaded_loras=2"):
        cache.ensure(["pink", "outline", "third"])

    def req(seed, loras):
        return GenerationRequest("a red circle", "blurry", 3, 7.5, 64, 64, seed, "euler", 1, "json", loras=loras)

    with_pink = (("pink", 0.7),)
    cache.ensure(["pink"])
    batched = generate_batch(pipe, [req(1, with_pink), req(2, with_pink)])
    alone = generate_batch(pipe, [req(3, ())])[0]  # without LoRAs on the same replica: the base weights
    api = sdfast.load(sd1.path)
    api.loras.load(folder / "pink.safetensors", 0.7)
    for got, seed in zip(batched, (1, 2)):
        want = np.asarray(api.generate("a red circle", negative_prompt="blurry", steps=3, seed=seed,
                                       width=64, height=64).images[0], dtype=int)
        assert np.abs(np.asarray(Image.open(io.BytesIO(got.pngs[0])), dtype=int) - want).max() <= 1
    base = np.asarray(sdfast.load(sd1.path).generate("a red circle", negative_prompt="blurry", steps=3, seed=3,
                                                      width=64, height=64).images[0], dtype=int)
    assert np.abs(np.asarray(Image.open(io.BytesIO(alone.pngs[0])), dtype=int) - base).max() <= 1
