"""LoRA files in every published layout give diffusers' ``load_lora_weights`` latents (peft underneath)."""

import json
import warnings

import pytest
import torch

import sdfast
from conftest import rel_err
from lora_files import (CONV_TARGETS, TEXT_TARGETS, UNET_TARGETS, random_lora, targets, write_kohya, write_legacy,
                        write_peft)
from sdfast.layouts import UNET_PREFIX, original_rules
from sdfast.bench.arch import unet_json
from sdfast.lora import LoRAError

pytest.importorskip("peft", reason="diffusers' LoRA loader needs peft (a test dependency)")

TOL = 1e-4
KW = dict(steps=4, guidance_scale=7.5, width=64, height=64, seed=5, scheduler="euler")


def reference_latents(ref, files: list, scales: list[float], prompt="a red circle") -> torch.Tensor:
    """diffusers with the LoRAs loaded as adapters at ``scales``; the shared pipeline is left without them."""
    import diffusers

    pipe = ref.pipe
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler_config)
    names = [f"a{i}" for i in range(len(files))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, file in zip(names, files):
                pipe.load_lora_weights(str(file), adapter_name=name)
            pipe.set_adapters(names, adapter_weights=scales)
            return pipe(prompt, negative_prompt="blurry", num_inference_steps=KW["steps"], guidance_scale=7.5,
                        width=64, height=64, generator=torch.Generator().manual_seed(KW["seed"]),
                        output_type="latent").images
    finally:
        pipe.unload_lora_weights()


def unet_and_text(ref, rank: int, seed: int, locon: bool = False) -> dict:
    unet_names = UNET_TARGETS + (CONV_TARGETS if locon else ())
    return {"unet": random_lora(targets(ref.pipe.unet, unet_names), rank, seed, locon),
            "text_encoder": random_lora(targets(ref.pipe.text_encoder, TEXT_TARGETS), rank, seed + 1)}


@pytest.fixture(scope="module")
def pipes(sd1, sd2):
    return {"sd1": (sd1, sdfast.load(sd1.path)), "sd2": (sd2, sdfast.load(sd2.path))}


@pytest.mark.parametrize("model", ["sd1", "sd2"])
@pytest.mark.parametrize("layout", ["kohya", "locon", "peft", "peft-alpha", "legacy"])
def test_each_layout_matches_diffusers(pipes, model, layout, tmp_path):
    ref, pipe = pipes[model]
    parts = unet_and_text(ref, rank=4, seed=10, locon=layout == "locon")
    file = tmp_path / f"{layout}.safetensors"
    if layout in ("kohya", "locon"):
        write_kohya(file, {"lora_unet": parts["unet"], "lora_te": parts["text_encoder"]}, alpha=2.0)
    elif layout == "legacy":
        write_legacy(file, parts)
    else:
        write_peft(file, parts, alpha=8.0 if layout == "peft-alpha" else None)
    expected = reference_latents(ref, [file], [1.0])
    base = pipe.generate("a red circle", negative_prompt="blurry", **KW).latents
    name = pipe.loras.load(file)
    try:
        assert len(pipe.loras[name].patches) == sum(map(len, parts.values()))
        got = pipe.generate("a red circle", negative_prompt="blurry", **KW).latents
    finally:
        pipe.loras.unload()
    assert rel_err(got, expected) < TOL
    assert rel_err(base, expected) > 100 * TOL  # the LoRA changed the picture: the check above means something


def test_two_loras_with_scales_match_diffusers(pipes, tmp_path):
    ref, pipe = pipes["sd1"]
    a = write_kohya(tmp_path / "a.safetensors", {"lora_unet": unet_and_text(ref, 4, 20)["unet"]}, alpha=4.0)
    parts = unet_and_text(ref, 2, 30)
    b = write_peft(tmp_path / "b.safetensors", parts, alpha=1.0)
    expected = reference_latents(ref, [a, b], [1.0, 0.5])
    pipe.loras.load(a)
    pipe.loras.load(b, scale=0.5)
    try:
        assert pipe.loras.scales == {"a": 1.0, "b": 0.5}
        got = pipe.generate("a red circle", negative_prompt="blurry", **KW).latents
    finally:
        pipe.loras.unload()
    assert rel_err(got, expected) < TOL


def _sgm(unet_config, lora: dict) -> dict:
    """The same U-Net LoRA under the original ("sgm") module names kohya's SDXL trainer writes."""
    to_sgm = {r.target[:-len(".weight")]: r.source[len(UNET_PREFIX):-len(".weight")]
              for r in original_rules("unet", unet_json(unet_config)) if r.target.endswith(".weight")}
    return {to_sgm[path]: value for path, value in lora.items()}


def test_sdxl_two_encoders_and_original_unet_names_match_diffusers(sdxl, tmp_path):
    pipe = sdfast.load(sdxl.path)
    unet = random_lora(targets(sdxl.pipe.unet, UNET_TARGETS), 4, 40)
    parts = {"lora_unet": _sgm(pipe.unet.config, unet),
             "lora_te1": random_lora(targets(sdxl.pipe.text_encoder, TEXT_TARGETS), 4, 41),
             "lora_te2": random_lora(targets(sdxl.pipe.text_encoder_2, TEXT_TARGETS), 4, 42)}
    file = write_kohya(tmp_path / "xl.safetensors", parts, alpha=2.0)
    import diffusers

    sdxl.pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(sdxl.scheduler_config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdxl.pipe.load_lora_weights(str(file))
            expected = sdxl.pipe("a red circle", num_inference_steps=4, guidance_scale=7.5, width=64, height=64,
                                 generator=torch.Generator().manual_seed(5), output_type="latent").images
    finally:
        sdxl.pipe.unload_lora_weights()
    name = pipe.loras.load(file)
    assert pipe.loras[name].networks == ["text_encoder", "text_encoder_2", "unet"]
    got = pipe.generate("a red circle", **KW).latents
    assert rel_err(got, expected) < TOL


def test_foreign_and_unsupported_files_are_refused_whole(pipes, sdxl, tmp_path):
    ref, pipe = pipes["sd1"]
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    xl = sdfast.load(sdxl.path)
    # an SDXL LoRA (two text encoders) on an SD 1.x model
    file = write_kohya(tmp_path / "xl.safetensors",
                       {"lora_te1": random_lora(targets(xl.text_encoder, TEXT_TARGETS), 2, 1),
                        "lora_te2": random_lora(targets(xl.text_encoder_2, TEXT_TARGETS), 2, 2)}, alpha=1.0)
    with pytest.raises(LoRAError, match="made for SDXL"):
        pipe.loras.load(file)
    # another model's widths: the SD2-like reference's U-Net LoRA on the SD1-like model
    sd2_ref, _ = pipes["sd2"]
    to_k = {p: m for p, m in targets(sd2_ref.pipe.unet, ("to_k",)).items() if p.startswith("down_blocks.0.")}
    file = write_kohya(tmp_path / "sd2.safetensors", {"lora_unet": random_lora(to_k, 2, 3)}, alpha=1.0)
    with pytest.raises(LoRAError, match="model's is"):
        pipe.loras.load(file)
    # LyCORIS LoHa, and keys of no known layout
    from safetensors.torch import save_file

    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoRAError, match="LoHa"):
        pipe.loras.load(tmp_path / "loha.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2, 2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(LoRAError, match="name no module"):
        pipe.loras.load(tmp_path / "ckpt.safetensors")
    assert len(pipe.loras) == 0
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_caption_words_come_from_kohyas_tag_frequency(tmp_path):
    from safetensors.torch import save_file

    from sdfast.lora.formats import _caption_words

    def words(metadata):
        path = tmp_path / "w.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
        return _caption_words(path)

    tags = {"10_pics": {"a Blue diamond": 3, "sketch, line-art": 1}}
    assert words({"ss_tag_frequency": json.dumps(tags)}) == {"a", "blue", "diamond", "sketch", "line", "art"}
    assert words({"ss_network_module": "networks.lora"}) == frozenset()
    assert words({"ss_tag_frequency": "not json"}) == words({"ss_tag_frequency": "[1, 2]"}) == frozenset()
