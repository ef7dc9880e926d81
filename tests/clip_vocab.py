"""Writes a real CLIP tokenizer folder, laid out as diffusers ships it, for tests.

The vocabulary is the one bundled with sdfast (OpenAI's bpe_simple_vocab_16e6.txt.gz, assembled as CLIP does), so ids
match the tokenizer of SD 1.x (openai/clip-vit-large-patch14) and SD 2.x (OpenCLIP ViT-H/14), which share one
vocabulary and differ only in the pad token.
"""

import json
import pathlib

from sdfast.tokenizer import SD_SPECIAL_TOKENS, clip_vocabulary


def write_clip_tokenizer(folder: pathlib.Path, pad_token: str = "<|endoftext|>") -> pathlib.Path:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `folder`.

    `pad_token` is "<|endoftext|>" for SD 1.x and "!" for SD 2.x. Returns `folder`.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    specials = {**SD_SPECIAL_TOKENS, "pad_token": pad_token}
    # tokenizer_config.json tags its dicts as the SD repositories' files do; special_tokens_map.json does not.
    tagged = {k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v for k, v in specials.items()}
    config = {**tagged, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return folder
