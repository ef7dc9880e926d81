"""The shapes TensorRT engines serve: the requests asked for (``Shapes``, from ``sdfast build --sizes --batch
--prompt-chunks``), each network's optimisation profiles for them (``profiles``), and which built engine admits a
request's input shapes (``check_shapes``, ``covering``), refusing one that none admits with the allowed ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import EngineError
from .graphs import residual_names, skip_shapes

if TYPE_CHECKING:  # annotations only: sdfast.export.tensorrt imports this module
    from .tensorrt import Engine


@dataclass(frozen=True)
class Shapes:
    """The requests engines must serve. ``sizes``: one optimisation profile each, an image size range in pixels
    ((min width, min height), (max width, max height)); ``batch``: (min, max) images per call; ``prompt_chunks``:
    the most 77-token chunks a long prompt may take."""

    sizes: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    batch: tuple[int, int] = (1, 1)
    prompt_chunks: int = 1

    @classmethod
    def parse(cls, sizes: list[str], batch: list[int], prompt_chunks: int = 1) -> "Shapes":
        """``sizes`` like ["512x512", "512x512-768x1024"] (WxH or a WxH-WxH range); ``batch`` like [1, 4] (the
        smallest and largest given are the range)."""
        ranges = []
        for text in sizes:
            try:
                ends = [tuple(int(v) for v in end.lower().split("x")) for end in text.split("-")]
            except ValueError:
                ends = []
            if len(ends) not in (1, 2) or any(len(e) != 2 for e in ends):
                raise ValueError(f"size {text!r}: use WIDTHxHEIGHT (e.g. 512x512) or a range 512x512-768x1024")
            lo, hi = ends[0], ends[-1]
            if any(v <= 0 or v % 8 for v in (*lo, *hi)):
                raise ValueError(f"size {text!r}: widths and heights must be positive multiples of 8")
            if lo[0] > hi[0] or lo[1] > hi[1]:
                raise ValueError(f"size range {text!r} runs backwards: put the smaller size first")
            ranges.append((lo, hi))
        if not ranges:
            raise ValueError("no sizes: give at least one WIDTHxHEIGHT")
        if not batch or min(batch) < 1:
            raise ValueError(f"batch {batch}: need sizes >= 1")
        if prompt_chunks < 1:
            raise ValueError(f"prompt_chunks={prompt_chunks}: need at least 1")
        return cls(tuple(ranges), (min(batch), max(batch)), prompt_chunks)


def profiles(network: str, manifest: dict, shapes: Shapes) -> list[dict[str, list[list[int]]]]:
    """The optimisation profiles of one network: [{input: [min, opt, max]}], one per size range (one in all for
    the text encoder, which does not see the image). The U-Net's batch doubles under classifier-free guidance;
    the optimum is the smallest size at the smallest batch, guided. SDXL's U-Net also takes ``text_embeds`` and
    ``time_ids``, one row per sample. A ControlNet's graph takes the U-Net's inputs and its control image (in
    pixels); the controlled U-Net the U-Net's inputs and the residuals, each at its level's latent size
    (``skip_shapes``)."""
    configs = manifest["configs"]
    unet, vae = configs["unet"], configs["vae"]
    te = configs.get("text_encoder") or configs["text_encoder_2"]  # the SDXL refiner has only the second
    f = 2 ** (len(vae["block_channels"]) - 1)  # pixels per latent cell
    b0, b1 = shapes.batch
    tokens = te["max_positions"]
    if network in ("text_encoder", "text_encoder_2"):  # prompts and negatives, each in up to prompt_chunks chunks
        return [{"input_ids": [[1, tokens], [2 * b0, tokens], [2 * b1 * shapes.prompt_chunks, tokens]]}]
    out = []
    for (w0, h0), (w1, h1) in shapes.sizes:
        if network == "unet" or network == "unet_control" or network.startswith("controlnet_"):
            c, ctx = unet["in_channels"], unet["context_dim"]
            out.append({
                "sample": [[b0, c, h0 // f, w0 // f], [2 * b0, c, h0 // f, w0 // f], [2 * b1, c, h1 // f, w1 // f]],
                "timestep": [[b0], [2 * b0], [2 * b1]],
                "context": [[b0, tokens, ctx], [2 * b0, tokens, ctx], [2 * b1, tokens * shapes.prompt_chunks, ctx]],
            })
            if unet.get("added_time_dim") is not None:  # SDXL: pooled text (B, P), micro-conditioning (B, n)
                pooled = configs["text_encoder_2"]["projection_dim"]
                numbers = (unet["added_cond_dim"] - pooled) // unet["added_time_dim"]
                out[-1].update({name: [[b0, width], [2 * b0, width], [2 * b1, width]]
                                for name, width in (("text_embeds", pooled), ("time_ids", numbers))})
            if network == "unet_control":  # a residual per skip, then the middle block's, at their levels' sizes
                levels = [*skip_shapes(unet), (unet["block_channels"][-1], len(unet["block_channels"]) - 1)]
                for name, (ch, level) in zip(residual_names(unet), levels):
                    lo = [-(-side // f // 2**level) for side in (h0, w0)]
                    hi = [-(-side // f // 2**level) for side in (h1, w1)]
                    out[-1][name] = [[b0, ch, *lo], [2 * b0, ch, *lo], [2 * b1, ch, *hi]]
            elif network.startswith("controlnet_"):  # the control image, in pixels, one per latent
                image = next(entry["config"]["conditioning_channels"] for entry in manifest["controlnets"].values()
                             if entry["network"] == network)
                out[-1]["image"] = [[b0, image, h0, w0], [2 * b0, image, h0, w0], [2 * b1, image, h1, w1]]
        elif network == "vae_decoder":
            c = vae["latent_channels"]
            out.append({"latent": [[b0, c, h0 // f, w0 // f], [b0, c, h0 // f, w0 // f], [b1, c, h1 // f, w1 // f]]})
        elif network == "vae_encoder":  # img2img encodes one picture, then repeats its latent
            c = vae["in_channels"]
            out.append({"image": [[1, c, h0, w0], [1, c, h0, w0], [b1, c, h1, w1]]})
        else:
            raise ValueError(f"unknown network {network!r}")
    return out


def check_shapes(meta: dict, shapes: dict[str, tuple[int, ...]]) -> int:
    """The index of the first profile of an engine (its sidecar ``meta``) that admits these input shapes, or an
    EngineError naming every profile's allowed range."""
    for index, profile in enumerate(meta["profiles"]):
        if all(len(shapes[name]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[name], hi))
               for name, (lo, _, hi) in profile.items()):
            return index
    raise EngineError(f"{meta['network']}: {_asked(shapes)} is outside the engine's profiles; allowed: "
                      f"{_allowed(meta)}. Build one that covers it: sdfast build DIR --sizes WxH --batch N")


def covering(engines: list["Engine"], shapes: dict[str, tuple[int, ...]]) -> tuple["Engine", int]:
    """The first of ``engines`` (``find_engines``' order: newest first) with a profile that admits these input
    shapes, and that profile's index: which engine serves a request. Otherwise an EngineError naming every engine's
    allowed ranges."""
    for engine in engines:
        try:
            return engine, check_shapes(engine.meta, shapes)
        except EngineError:
            continue
    if len(engines) == 1:
        check_shapes(engines[0].meta, shapes)  # raises, with the one engine's ranges
    allowed = "; ".join(f"{e.path.name}: {_allowed(e.meta)}" for e in engines)
    raise EngineError(f"{engines[0].meta['network']}: {_asked(shapes)} is outside the profiles of all "
                      f"{len(engines)} engines; allowed: {allowed}. Build one that covers it: "
                      "sdfast build DIR --sizes WxH --batch N")


def _asked(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {tuple(s)}" for name, s in shapes.items())


def _allowed(meta: dict) -> str:
    return " | ".join(", ".join(f"{name} {_range(lo, hi)}" for name, (lo, _, hi) in profile.items())
                      for profile in meta["profiles"])


def _range(lo, hi) -> str:
    return "(" + ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi)) + ")"
