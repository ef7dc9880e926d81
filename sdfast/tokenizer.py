"""CLIP's byte-level BPE tokenizer for Stable Diffusion prompts, built on the `tokenizers` library.

Reads a diffusers `tokenizer/` folder and gives, id for id, what transformers 5's `CLIPTokenizer` gives with
`padding="max_length", max_length=77, truncation=True`: the normaliser and pre-tokeniser below copy
transformers/models/clip/tokenization_clip.py (v5.24), which follows OpenAI's clip/simple_tokenizer.py except that it
skips ftfy and html.unescape. SD 1.x and 2.x share the vocabulary and differ only in the pad token.

Prompts longer than the 75-token window are truncated with a warning, or, with `long_prompts=True`, split into
75-token chunks that the caller encodes one by one and concatenates (the AUTOMATIC1111 webui's scheme, without its
back-off to the last comma).
"""

import gzip
import json
import pathlib
import warnings

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

# CLIP's word pattern: special tokens, English contractions, letter runs, single digits, other-symbol runs;
# whitespace matches nothing and so is dropped, which also strips the prompt.
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# What transformers' CLIPTokenizer assumes when the json files say nothing; SD 2.x overrides the pad with "!".
_DEFAULT_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def _content(spec: str | dict) -> str:
    """The token text of a special-token entry: a string, or a dict {"content": ..., <AddedToken flags>}."""
    return spec if isinstance(spec, str) else spec["content"]


def _added_token(spec: str | dict) -> AddedToken:
    """A special token as transformers registers it: a plain string matches only the raw prompt text
    (normalized=False), a dict carries its own flags, and `AddedToken`'s defaults fill the rest."""
    if isinstance(spec, str):
        return AddedToken(spec, special=True, normalized=False)
    flags = {k: spec[k] for k in ("lstrip", "rstrip", "single_word", "normalized") if k in spec}
    return AddedToken(_content(spec), special=True, **flags)


def _read_bpe(folder: pathlib.Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges: from vocab.json + merges.txt (as the SD releases ship them) or from the
    tokenizer.json that transformers 5 writes instead."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return json.loads((folder / "vocab.json").read_text(encoding="utf-8")), merges
    if (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{folder / 'tokenizer.json'} holds a {model.get('type')} model, not CLIP's BPE")
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return model["vocab"], merges
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    raise FileNotFoundError(
        f"tokenizer folder {str(folder)!r} has no {' or '.join(missing)} (nor a tokenizer.json); "
        "expected a diffusers tokenizer/ folder with vocab.json and merges.txt"
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255, in CLIP's vocabulary order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


# OpenAI keeps merges 1..48894 of the file (line 0 is a version header): with 512 byte symbols and 2 specials
# that gives CLIP's 49408 ids.
_NUM_MERGES = 49152 - 256 - 2
_BUNDLED_BPE = pathlib.Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

# The special tokens as the SD 1.x / 2.x releases' tokenizer files spell them (the pad is set per family).
SD_SPECIAL_TOKENS = {
    name: {"content": token, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    for name, token in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"),
                        ("unk_token", "<|endoftext|>"))
}


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, assembled from OpenAI's bpe_simple_vocab_16e6.txt.gz (MIT licence,
    bundled) as clip/simple_tokenizer.py does: byte symbols, the same with "</w>", one token per merge, specials."""
    lines = gzip.open(_BUNDLED_BPE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder, pad_token: str = "<|endoftext|>") -> pathlib.Path:
    """Writes the bundled CLIP vocabulary as a diffusers ``tokenizer/`` folder (vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json), laid out as the SD releases ship it, so transformers'
    ``CLIPTokenizer`` reads it too. ``pad_token``: "<|endoftext|>" for SD 1.x, "!" for SD 2.x. Returns the folder."""
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


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class PromptTruncated(UserWarning):
    """A prompt longer than the token window lost its end (``long_prompts=True`` keeps it in chunks)."""

    def __init__(self, prompt: str, tokens: int, window: int):
        self.prompt, self.tokens, self.window = prompt, tokens, window
        super().__init__(self.worded("pass long_prompts=True"))

    def worded(self, fix: str) -> str:
        return (f"prompt truncated: {self.tokens - self.window} of its {self.tokens} tokens are past the "
                f"{self.window}-token limit and were dropped ({fix} to keep them): {self.prompt[:60]!r}...")


class Tokenizer:
    """Prompt text -> CLIP token ids, padded to `max_length` (77) per chunk."""

    def __init__(self, backend: _Backend, bos: str, eos: str, pad: str, max_length: int = 77):
        self._backend = backend
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = (self._token_id(t) for t in (bos, eos, pad))

    def _token_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_folder(cls, path) -> "Tokenizer":
        """Loads vocab.json and merges.txt (or tokenizer.json); tokenizer_config.json and special_tokens_map.json are
        optional."""
        folder = pathlib.Path(path)
        vocab, merges = _read_bpe(folder)
        config = _read_json(folder / "tokenizer_config.json")
        # transformers reads both files and lets special_tokens_map.json win.
        specials = {**_DEFAULT_SPECIALS, **config, **_read_json(folder / "special_tokens_map.json")}
        specials = {key: specials[key] for key in _DEFAULT_SPECIALS}
        return cls._build(vocab, merges, specials, int(config.get("model_max_length", 77)))

    @classmethod
    def clip(cls, pad_token: str = "<|endoftext|>") -> "Tokenizer":
        """The CLIP tokenizer from the vocabulary bundled with sdfast, for checkpoints that carry none (single
        files). ``pad_token``: "<|endoftext|>" for SD 1.x, "!" for SD 2.x. Special-token flags as the SD releases'
        tokenizer files set them."""
        vocab, merges = clip_vocabulary()
        specials = {**SD_SPECIAL_TOKENS, "pad_token": pad_token}
        return cls._build(vocab, merges, specials, 77)

    @classmethod
    def _build(cls, vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict, max_length: int):
        backend = _Backend(
            BPE(vocab, merges, end_of_word_suffix="</w>", unk_token=_content(specials["unk_token"]))
        )
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # Special tokens are cut out of the prompt before BPE, so "<|endoftext|>" typed in a prompt becomes the eos
        # id, and with SD 2.x's pad "!" every "!" becomes id 0 instead of "!</w>" (as in transformers). Registered in
        # transformers' order (bos, eos, unk, pad): when two share a text, the last one's flags win in both.
        backend.add_special_tokens([_added_token(spec) for spec in specials.values()])

        bos, eos, pad = (_content(specials[k]) for k in ("bos_token", "eos_token", "pad_token"))
        return cls(backend, bos, eos, pad, max_length=max_length)

    def save(self, folder) -> None:
        """Writes tokenizer.json, special_tokens_map.json and tokenizer_config.json, which ``from_folder`` reads
        back to the same ids (export folders carry their tokenizer this way)."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        added = self._backend.get_added_tokens_decoder()  # id -> AddedToken, with the flags that won

        def spec(token_id: int) -> dict:
            t = added[token_id]
            return {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word,
                    "normalized": t.normalized}

        unk_id = self._token_id(self._backend.model.unk_token)
        specials = {"bos_token": spec(self.bos_id), "eos_token": spec(self.eos_id), "unk_token": spec(unk_id),
                    "pad_token": spec(self.pad_id)}
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=1), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": self.max_length}),
                                                      encoding="utf-8")

    def _ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids per prompt, without bos/eos."""
        return [e.ids for e in self._backend.encode_batch(prompts, add_special_tokens=False)]

    def token_count(self, prompt: str) -> int:
        """Number of tokens in `prompt`, not counting bos/eos; more than max_length - 2 gets truncated."""
        return len(self._ids([prompt])[0])

    def _chunk(self, ids: list[int]) -> list[int]:
        """[bos] + ids + [eos], padded to max_length."""
        return [self.bos_id, *ids, self.eos_id] + [self.pad_id] * (self.max_length - 2 - len(ids))

    def encode(self, prompts: str | list[str], long_prompts: bool = False) -> torch.LongTensor:
        """Token ids, shape (B, K, max_length); K is 1 unless long_prompts=True and some prompt needs more chunks.

        With long_prompts=True the ids are cut into chunks of max_length - 2; prompts with fewer chunks than the
        longest get chunks of the empty prompt ([bos, eos, pad...]). Otherwise overlong prompts are truncated with
        a warning.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        window = self.max_length - 2
        batch = []
        for prompt, ids in zip(prompts, self._ids(list(prompts))):
            if long_prompts:
                batch.append([self._chunk(ids[i : i + window]) for i in range(0, len(ids), window)])
                continue
            if len(ids) > window:
                warnings.warn(PromptTruncated(prompt, len(ids), window), stacklevel=2)
            batch.append([self._chunk(ids[:window])])
        chunks = max((len(c) for c in batch), default=1) or 1
        empty = self._chunk([])
        batch = [c + [empty] * (chunks - len(c)) for c in batch]
        return torch.tensor(batch, dtype=torch.long).view(len(batch), chunks, self.max_length)  # (B, K, 77)
