"""The checked request (``sdfast.request``): every careless or hostile input a probe tried is a one-line
``RequestError`` naming the field before anything large is allocated; pictures are read bounded and without
clipping; one pipeline is safe to share between threads; the CLI never leaves a half-written file.
"""

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import sdfast
from sdfast.cli import main
from sdfast.request import MAX_SEED, Limits, Request, RequestError, read_image


@pytest.fixture(scope="module")
def pipe(sd1):
    return sdfast.load(sd1.path)


@pytest.mark.parametrize("fields, message", [
    (dict(width=65536, height=65536), r"size='65536x65536': 4096.0 Mpx is over the limit of 4.0 Mpx"),
    (dict(batch_size=10**6), r"batch_size=1000000: over the limit of 16"),
    (dict(batch_size=9, prompt=["a", "b"]), r"batch_size=9: 2 prompt\(s\) x 9 is 18 images, over the limit of 16"),
    (dict(clip_skip=1.5), r"clip_skip=1.5: need an integer"),
    (dict(prompt="a \udcff cat"), r"prompt='a \\udcff cat': holds a character that is not Unicode text"),
    (dict(negative_prompt=5), r"negative_prompt=5: need a string or a non-empty list of strings"),
    (dict(seed=2**32 + 5), r"seed=4294967301: over 4294967295: torch's CPU generator keeps a seed's low 32 bits, "
                           r"so this seed paints the picture of seed 5: pass that"),
    (dict(prompt=None, prompt_embeds=torch.zeros(40, 77, 8), batch_size=2),
     r"batch_size=2: 20 prompt\(s\) x 2 is 40 images, over the limit of 16"),
    (dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 8), negative_prompt="blurry"),
     r"negative_prompt='blurry': prompt_embeds hold the negatives already"),
    (dict(seed=-2**63), r"seed=-9223372036854775808: need an integer >= 0"),
    (dict(seed=True), r"seed=True: need an integer"),
    (dict(steps=10**9), r"steps=1000000000: over the limit of 1000"),
    (dict(guidance_scale=float("inf")), r"guidance_scale=inf: not a finite number"),
    (dict(preview_decode="png"), r"preview_decode='png': choose 'linear'"),
    (dict(scheduler=[]), r"scheduler=\[\]: unknown; choose one of"),  # a list is unhashable: no TypeError
    (dict(image=False), r"image=False: need a PIL image, a path or an open binary file"),
])
def test_bad_fields_are_one_line_before_any_work(pipe, fields, message):
    fields = {"prompt": "a cat", **fields}
    with pytest.raises(RequestError, match=message) as error:
        Request.check(**fields)  # no model needed: nothing is loaded or allocated
    assert "\n" not in str(error.value) and error.value.field in message
    with pytest.raises(RequestError, match=message):
        pipe.generate(**fields)


def test_one_side_alone_is_held_to_the_pixel_limit(pipe):
    """The other side defaults to the model's (64 px): 64 x 80,000 is over 4 Mpx."""
    Request.check("a cat", width=80_000)  # alone it cannot know the other side
    with pytest.raises(RequestError, match=r"size='64x80000': 4.9 Mpx is over the limit"):
        pipe.generate("a cat", height=80_000, steps=1)
    with pytest.raises(RequestError, match=r"size='64x80000'"):
        Request.check("a cat", height=80_000).fit(pipe.facts)


def test_limits_can_be_raised(pipe):
    request = Request.check("a cat", batch_size=20, limits=Limits(max_images=32)).fit(pipe.facts)
    assert request.images == 20 and request.limits.max_images == 32


def test_every_accepted_seed_is_its_own_picture(pipe):
    """torch's CPU generator keeps a seed's low 32 bits and wraps negatives (2**63 and -2**63 painted the same
    picture, so did 5 and 5 + 2**32): seeds are 0 .. 2**32 - 1, and the ends of that range differ."""
    top = pipe.generate("a cat", steps=1, seed=MAX_SEED)
    zero = pipe.generate("a cat", steps=1, seed=0)
    assert MAX_SEED == 2**32 - 1 and top.seed == MAX_SEED and not torch.equal(top.latents, zero.latents)
    assert 0 <= pipe.generate("a cat", steps=1).seed <= MAX_SEED  # a drawn seed is in the range too


def _png(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    return path


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    """A few-KB PNG that declares 20000 x 20000 (PIL's own bomb error) or 10000 x 10000 (over sdfast's limit,
    which PIL would only warn about and decode into 300 MB) is refused without decoding it."""
    for side in (20000, 10000):
        path = _png(tmp_path, f"bomb{side}.png", Image.new("1", (side, side)))
        assert path.stat().st_size < 100_000
        with pytest.raises(RequestError, match=r"image='.*bomb\d+\.png': (cannot read it|.* over the limit)"):
            read_image(path)
    small = _png(tmp_path, "small.png", Image.new("RGB", (300, 200), "red"))
    with pytest.raises(RequestError, match=r"300x200 pixels is over the limit of 0 Mpx"):
        read_image(small, Limits(max_image_pixels=100))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    image = read_image(_png(tmp_path, "grey16.png", Image.fromarray(ramp)))
    got = np.asarray(image)[..., 0].astype(float)
    assert image.mode == "RGB" and abs(got.mean() - ramp.mean() / 65535 * 255) < 1
    assert (got == 255).mean() < 0.01  # PIL's convert("RGB") made 99.6% of it white


def test_transparency_lands_on_white(tmp_path):
    image = read_image(_png(tmp_path, "clear.png", Image.new("RGBA", (8, 8), (255, 0, 0, 0))))
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_a_shared_pipeline_is_safe_across_threads(sdxl):
    """Three threads on one fp16 SDXL pipeline (whose VAE decodes in fp32): every call succeeds with the image a
    lone call makes, and the shared VAE weights are never cast, as a watcher sees throughout."""
    pipe = sdfast.load(sdxl.path, dtype=torch.float16)
    expected = pipe.generate("a red circle", steps=2, seed=5).latents
    results, errors, casts, done = [], [], [], threading.Event()

    def work():
        try:
            for _ in range(3):
                results.append(pipe.generate("a red circle", steps=2, seed=5).latents)
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    def watch():  # every half millisecond: a busy loop here would hold the GIL the workers need
        while not done.wait(0.0005):
            casts.extend({p.dtype for p in pipe.vae.parameters()} - {torch.float16})

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert errors == [] and casts == [] and len(results) == 9
    assert all(torch.equal(r, expected) for r in results)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["width", "height", "steps", "guidance_scale", "scheduler", "seed",
                                        "batch_size", "clip_skip", "strength", "preview_every", "negative_prompt",
                                        "long_prompts", "denoising_end", "denoising_start", "preview_decode",
                                        "latents", "image", "original_size", "aesthetic_score", "callback",
                                        "loras", "controls"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                                 st.text(max_size=8), st.lists(st.one_of(st.integers(), st.text(max_size=2)),
                                                               max_size=3),
                                 st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                                 st.lists(st.dictionaries(st.sampled_from(["model", "image", "scale", "start", "end",
                                                                           "x"]),
                                                          st.one_of(st.floats(), st.integers(), st.text(max_size=3),
                                                                    st.none()), max_size=5), max_size=2)),
                       max_size=5))
def test_any_fields_give_a_request_or_a_request_error(fields):
    """Random values for every field: the outcome is a request or a clean RequestError, never another error."""
    try:
        Request.check("a cat", **fields)
    except RequestError as e:
        assert "\n" not in str(e) and e.field


# -- the CLI's files --


def test_output_that_is_a_folder_is_refused(sd1, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(sd1.path), "-o", str(tmp_path / "dir.png")]) == 0
    (tmp_path / "folder.png").mkdir()
    assert main(["generate", "x", "--model", str(sd1.path), "-o", str(tmp_path / "folder.png")]) == 2
    assert "is a folder; name a file in it" in capsys.readouterr().err


def test_a_failed_write_leaves_the_old_file(sd1, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"the old picture")

    def fail(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise OSError(27, "File too large")

    monkeypatch.setattr(Image.Image, "save", fail)
    assert main(["generate", "x", "--model", str(sd1.path), "--steps", "1", "-o", str(out)]) == 1
    assert "File too large" in capsys.readouterr().err
    assert out.read_bytes() == b"the old picture" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_a_symlink_at_the_output_is_replaced_not_followed(sd1, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "out.png"
    link.symlink_to(target)
    assert main(["generate", "x", "--model", str(sd1.path), "--steps", "1", "-o", str(link)]) == 0
    assert target.read_text() == "keep me" and not link.is_symlink()
    assert Image.open(link).size == (64, 64)


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-5"], "--seed -5: need an integer >= 0"),
    (["--batch", "1000000"], "--batch 1000000: over the limit of 16"),
    (["--guidance", "nan"], "--guidance nan: not a finite number"),
    (["--clip-skip", "9"], "--clip-skip 9: out of range: use 1..4"),
    (["--height", "80000"], "--width/--height '64x80000': 4.9 Mpx is over the limit"),
])
def test_cli_errors_speak_in_flags(sd1, tmp_path, capsys, argv, message):
    assert main(["generate", "x", "--model", str(sd1.path), "-o", str(tmp_path / "o.png"), *argv]) == 2
    err = capsys.readouterr().err
    assert f"sdfast generate: error: {message}" in err and err.count("\n") == 1
