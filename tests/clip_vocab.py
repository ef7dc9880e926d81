"""Builds a real CLIP tokenizer folder, laid out as diffusers ships it, for tests.

The vocabulary and merges come from open_clip's copy of OpenAI's `bpe_simple_vocab_16e6.txt.gz` and are assembled
the way OpenAI's `clip/simple_tokenizer.py` does, so ids match the tokenizer of SD 1.x (openai/clip-vit-large-patch14)
and SD 2.x (OpenCLIP ViT-H/14), which share one vocabulary and differ only in the pad token.
"""

import gzip
import importlib.util
import json
import pathlib

# Merges 1..48894 of the file: OpenAI keeps 49152 - 256 - 2 of them (line 0 is a version header),
# which with 512 byte symbols and 2 specials gives CLIP's 49408 ids.
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255, in CLIP's vocabulary order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _bpe_file() -> pathlib.Path:
    # Located without importing open_clip: its __init__ pulls in torchvision.
    package = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    return pathlib.Path(package) / "bpe_simple_vocab_16e6.txt.gz"


def _added_token(content: str) -> dict:
    """An AddedToken entry as the SD repositories' tokenizer json files spell it."""
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(folder: pathlib.Path, pad_token: str = "<|endoftext|>") -> pathlib.Path:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `folder`.

    `pad_token` is "<|endoftext|>" for SD 1.x and "!" for SD 2.x. Returns `folder`.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]

    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, "duplicate tokens: the merges file is not CLIP's"

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {
        "bos_token": _added_token("<|startoftext|>"),
        "eos_token": _added_token("<|endoftext|>"),
        "unk_token": _added_token("<|endoftext|>"),
        "pad_token": pad_token,
    }
    # tokenizer_config.json tags its dicts as the SD repositories' files do; special_tokens_map.json does not.
    config = {
        **{k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v for k, v in specials.items()},
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return folder
