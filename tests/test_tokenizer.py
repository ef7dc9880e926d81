"""sdfast.tokenizer against transformers' CLIPTokenizer on a real CLIP vocabulary, for SD 1.x and SD 2.x pads."""

import json
import random
import shutil
import warnings

import pytest
import torch

from sdfast.tokenizer import Tokenizer, write_clip_tokenizer

BOS, EOS = 49406, 49407
PADS = {"sd1": ("<|endoftext|>", 49407), "sd2": ("!", 0)}

# Pieces that exercise each branch of CLIP's normaliser and word pattern.
_WORDS = "a photo of an astronaut riding horse on mars highly detailed masterpiece portrait landscape".split()
_FRAGMENTS = [
    *_WORDS,
    "Astronaut", "PHOTO", "McDonald", "iPhone",  # case
    "café", "naïve", "Ångström", "e\u0301", "A\u030a", "ﬁ", "Ελληνικά", "русский", "straße",  # accents, NFC, scripts
    "日本語", "東京の夜景", "한국어", "中文提示词", "ｆｕｌｌｗｉｄｔｈ",  # CJK and full-width forms
    "!!!", "...", "?!", "(((masterpiece)))", "[best quality:1.2]", "--", "<lora:x:0.8>", "#hash", "@user", "a-b_c",
    "3.14", "1,000", "2024", "8k", "4K", "1girl", "50mm", "½", "²", "٣",  # numbers split digit by digit
    "🙂", "🐱\u200d👤", "👍🏽", "🇫🇷", "✨✨",  # emoji, ZWJ sequences, modifiers, flags
    "it's", "don't", "we're", "I've", "I'm", "we'll", "he'd", "IT'S", "dog’s", "'quoted'",  # contractions
    "&amp;", "\u200b", "\x00", "\x7f",  # no html.unescape; zero-width and control characters
    "<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "!",  # special tokens typed into a prompt
]
_SEPARATORS = [" ", " ", " ", "", ", ", "\t", "\n", "   ", " \n\t ", "\u00a0", "\u3000"]


def _prompts(n: int = 300, seed: int = 0) -> list[str]:
    """Deterministic prompts from a few words up to well past 75 tokens, with hand-picked edge cases first."""
    rng = random.Random(seed)
    prompts = ["", " ", "\n\t ", "a", "A PHOTO OF A CAT", "  leading and trailing  ", "cat " * 75, "cat " * 76]
    while len(prompts) < n:
        size = rng.choice([1, 3, 8, 20, 40, 90])
        pieces = [rng.choice(_FRAGMENTS if rng.random() < 0.6 else _WORDS) for _ in range(size)]
        prompts.append("".join(p + rng.choice(_SEPARATORS) for p in pieces))
    return prompts


@pytest.fixture(scope="session", params=list(PADS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def clip_folder(variant, tmp_path_factory):
    """A diffusers-style tokenizer/ folder with CLIP's real vocabulary: SD 1.x pads with eos, SD 2.x with "!"."""
    pad_token, _ = PADS[variant]
    return write_clip_tokenizer(tmp_path_factory.mktemp(variant), pad_token)


@pytest.fixture(scope="session")
def tokenizer(clip_folder):
    return Tokenizer.from_folder(clip_folder)


@pytest.fixture(scope="session")
def reference(clip_folder):
    # transformers 5's CLIPTokenizer is the tokenizers-backed one; 4.x's is a Python reimplementation (ftfy or not).
    transformers = pytest.importorskip("transformers", minversion="5")
    return transformers.CLIPTokenizer.from_pretrained(clip_folder)


def _reference_ids(reference, prompts: list[str]) -> list[list[int]]:
    return reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids


def _assert_parity(tokenizer, reference, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings are tested below
        ids = tokenizer.encode(prompts)
    assert ids.shape == (len(prompts), 1, 77) and ids.dtype == torch.long
    expected = _reference_ids(reference, prompts)
    for prompt, got, want in zip(prompts, ids[:, 0].tolist(), expected):
        assert got == want, f"prompt {prompt!r}"


def test_parity_with_transformers(tokenizer, reference):
    prompts = _prompts()
    assert sum(tokenizer.token_count(p) > 75 for p in prompts) > 20, "generator should produce long prompts"
    _assert_parity(tokenizer, reference, prompts)


def test_special_ids(tokenizer, variant):
    _, pad_id = PADS[variant]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.max_length) == (BOS, EOS, pad_id, 77)
    assert tokenizer.encode("a photo").tolist() == [[[BOS, 320, 1125, EOS] + [pad_id] * 73]]


def test_defaults_without_json_configs(clip_folder, tmp_path):
    """Only vocab.json and merges.txt: CLIP's defaults, i.e. SD 1.x's eos padding."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip_folder / name, tmp_path / name)
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert (tokenizer.pad_id, tokenizer.max_length) == (EOS, 77)
    transformers = pytest.importorskip("transformers", minversion="5")
    _assert_parity(tokenizer, transformers.CLIPTokenizer.from_pretrained(tmp_path), _prompts(60, seed=1))


def test_pad_token_given_as_dict(clip_folder, tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(clip_folder / name, tmp_path / name)
    content = {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": content}))
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer.pad_id == 0, "special_tokens_map.json overrides tokenizer_config.json"
    transformers = pytest.importorskip("transformers", minversion="5")
    _assert_parity(tokenizer, transformers.CLIPTokenizer.from_pretrained(tmp_path), _prompts(60, seed=3))


def test_token_count(tokenizer, reference):
    for prompt in _prompts(40, seed=2):
        assert tokenizer.token_count(prompt) == len(reference(prompt, add_special_tokens=False).input_ids)
    assert tokenizer.token_count("") == 0
    assert tokenizer.token_count("cat " * 100) == 100


def test_truncation_warning(tokenizer):
    with pytest.warns(UserWarning, match=r"25 of its 100 tokens .* long_prompts=True") as record:
        ids = tokenizer.encode(["cat " * 100, "dog"])
    assert len(record) == 1, "only the long prompt warns"
    assert ids.shape == (2, 1, 77)
    assert ids[0, 0].tolist() == [BOS] + [2368] * 75 + [EOS]  # "cat</w>" is 2368

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer.encode("cat " * 75)  # exactly fills the window


def _check_chunks(tokenizer, chunks: list[list[int]], ids: list[int]):
    """Each chunk is [bos] + up to 75 of `ids` + [eos] + pads, in order; chunks past the end encode ""."""
    inner = []
    for chunk in chunks:
        n = min(75, len(ids) - len(inner))
        assert chunk[0] == tokenizer.bos_id and chunk[n + 1] == tokenizer.eos_id
        assert chunk[n + 2 :] == [tokenizer.pad_id] * (75 - n)
        inner += chunk[1 : n + 1]
    assert inner == ids


def test_long_prompts_chunks(tokenizer, reference):
    long = " ".join(_WORDS * 12) + ", 3.14 🙂 café"  # > 150 tokens: three chunks
    prompts = [long, "a photo of a cat", "", "cat " * 75]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning in this mode
        ids = tokenizer.encode(prompts, long_prompts=True)
    assert 150 < tokenizer.token_count(long) <= 225
    assert ids.shape == (4, 3, 77)
    for prompt, chunks in zip(prompts, ids.tolist()):
        _check_chunks(tokenizer, chunks, reference(prompt, add_special_tokens=False).input_ids)

    empty = tokenizer.encode("")[0, 0]
    assert (ids[1:, 1:] == empty).all(), "short prompts are padded with empty-prompt chunks"
    assert torch.equal(ids[1:, :1], tokenizer.encode(prompts[1:])), "first chunk of a short prompt as usual"


def test_long_prompts_without_long_input(tokenizer):
    assert tokenizer.encode(["a cat", ""], long_prompts=True).shape == (2, 1, 77)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json or merges.txt") as error:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(error.value)

    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no merges.txt \(nor a tokenizer.json\);"):
        Tokenizer.from_folder(tmp_path)


def test_tokenizer_json_only_folder_matches(tmp_path):
    """transformers 5 saves a tokenizer as tokenizer.json alone; such a folder gives the same ids."""
    from transformers import CLIPTokenizer

    source = write_clip_tokenizer(tmp_path / "src", pad_token="!")
    CLIPTokenizer.from_pretrained(source).save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "vocab.json").exists()
    prompts = ["a photo of a cat!", "Ünïcödé, 3.14 and 1,000 emoji 🐱", "x " * 90]
    with pytest.warns(UserWarning):
        assert torch.equal(Tokenizer.from_folder(tmp_path / "saved").encode(prompts),
                           Tokenizer.from_folder(source).encode(prompts))


def test_bundled_vocabulary_is_open_clips_and_builds_the_sd_tokenizers(tmp_path):
    """The vocabulary file shipped in sdfast/data is OpenAI's, byte for byte (open_clip ships the same file), and
    Tokenizer.clip() equals a tokenizer read from an SD-style folder, for both pad tokens."""
    import importlib.util
    from pathlib import Path

    from sdfast.tokenizer import _BUNDLED_BPE

    package = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    assert _BUNDLED_BPE.read_bytes() == (package / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    prompts = ["A photo of a CAT!", "<|ENDOFTEXT|> and <|endoftext|>", "ünïcödé 🐱 3.14"]
    for pad in ("<|endoftext|>", "!"):
        folder = write_clip_tokenizer(tmp_path / pad.strip("<|>!") / "tok", pad_token=pad)
        assert torch.equal(Tokenizer.clip(pad).encode(prompts), Tokenizer.from_folder(folder).encode(prompts))
    assert Tokenizer.clip("!").pad_id == 0 and Tokenizer.clip().pad_id == 49407
