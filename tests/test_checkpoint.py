"""Loading: original-layout single files give the same tensors as the diffusers folder; every failure is a clear
``CheckpointError`` naming the file and the problem, never a half-loaded model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdfast
from original_layout import to_original
from sdfast.checkpoint import CheckpointError

# What the tiny fixtures' weights cannot tell (real SD files follow the family defaults)
OVERRIDES = {
    "sd1": {"unet": {"attention_head_dim": 4, "norm_num_groups": 8, "sample_size": 8},
            "vae": {"norm_num_groups": 8}, "text_encoder": {"num_attention_heads": 4}},
    "sd2": {"unet": {"attention_head_dim": [2, 4], "norm_num_groups": 8, "upcast_attention": True, "sample_size": 8},
            "vae": {"norm_num_groups": 8}, "text_encoder": {"num_attention_heads": 4}},
}


def original_state(ref) -> dict[str, torch.Tensor]:
    """The reference pipeline's weights in the original (CompVis / webui) single-file layout, with the extra keys
    real files carry (noise-schedule buffers, EMA copies)."""
    state = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999)}
    nets = {"unet": ref.pipe.unet, "vae": ref.pipe.vae, "text_encoder": ref.pipe.text_encoder}
    for name, net in nets.items():
        config = net.config.to_dict() if name == "text_encoder" else dict(net.config)
        weights = {k.removeprefix("text_model."): v for k, v in net.state_dict().items()}
        state |= to_original(name, config, weights)
    return state


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def single(request, tmp_path_factory):
    ref = request.getfixturevalue(request.param)
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in original_state(ref).items()}, str(path))
    return request.param, ref, path


def assert_same_tensors(a, b):
    for net in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, net).state_dict(), getattr(b, net).state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{net}.{key}"


def test_single_file_loads_identical_tensors(single):
    family, ref, path = single
    from_file = sdfast.load(path, overrides=OVERRIDES[family])
    assert_same_tensors(from_file, sdfast.load(ref.path))
    pad = {"sd1": 49407, "sd2": 0}[family]
    assert from_file.tokenizer.pad_id == pad
    expected_prediction = {"sd1": "epsilon", "sd2": "v_prediction"}[family]
    assert from_file.scheduler_config["prediction_type"] == expected_prediction


def test_single_file_generates_like_the_folder(single):
    family, ref, path = single
    a = sdfast.load(path, overrides=OVERRIDES[family]).generate("a blue star", steps=2, seed=1, scheduler="ddim")
    b = sdfast.load(ref.path).generate("a blue star", steps=2, seed=1, scheduler="ddim")
    assert torch.equal(a.latents, b.latents)


def test_ckpt_loads_through_weights_only(single, tmp_path):
    family, ref, path = single
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 1000}, ckpt)
    assert_same_tensors(sdfast.load(ckpt, overrides=OVERRIDES[family]), sdfast.load(ref.path))


def test_sd2_base_ckpt_is_epsilon_by_its_global_step(sd2, tmp_path):
    """SD 2.0-base's 512-base-ema.ckpt is the 2.x file at global_step 875000: epsilon prediction at 512 px; other
    2.x files are v-prediction at 768 px. CompVis .ckpt files keep the step beside the state dict."""
    state = original_state(sd2)
    for step, prediction in ((875000, "epsilon"), (1000, "v_prediction")):
        torch.save({"state_dict": state, "global_step": step}, tmp_path / "m.ckpt")
        pipe = sdfast.load(tmp_path / "m.ckpt", overrides={**OVERRIDES["sd2"], "unet": {
            k: v for k, v in OVERRIDES["sd2"]["unet"].items() if k != "sample_size"}})
        assert pipe.scheduler_config["prediction_type"] == prediction
        assert pipe.unet.config.sample_size == {"epsilon": 64, "v_prediction": 96}[prediction]


def test_single_file_missing_key_is_named(sd1, tmp_path):
    state = original_state(sd1)
    del state["model.diffusion_model.out.2.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"unet: the checkpoint does not match the network .*missing 1 keys: "
                                              r"conv_out.bias"):
        sdfast.load(tmp_path / "m.safetensors", overrides=OVERRIDES["sd1"])


def test_inpainting_unet_is_refused_at_load(folder_copy):
    config = folder_copy / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "in_channels": 9}))
    with pytest.raises(CheckpointError, match=r"the U-Net takes 9 channels and predicts 4 for a 4-channel VAE: "
                                              r"inpainting and instruct-pix2pix U-Nets are not supported"):
        sdfast.load(folder_copy)


def test_ckpt_with_code_is_refused(tmp_path):
    class Payload:  # a pickle that would run code on load
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil.ckpt cannot be read as a weights-only torch checkpoint"):
        sdfast.load(path)


def test_weights_in_half_precision(single):
    family, _, path = single
    pipe = sdfast.load(path, dtype="fp16", overrides=OVERRIDES[family])
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float16}


@pytest.fixture
def folder_copy(sd1, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(sd1.path, copy)
    return copy


def rewrite(path, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_path():
    with pytest.raises(CheckpointError, match=r"/no/model does not exist: pass a diffusers folder or a \.safetensors"):
        sdfast.load("/no/model")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(CheckpointError, match="folder without model_index.json: not a diffusers pipeline folder"):
        sdfast.load(tmp_path)


def test_unknown_single_file_layout(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1), "something.else": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match=r"lora.safetensors: unsupported checkpoint"):
        sdfast.load(path)


def test_missing_keys_are_named(folder_copy):
    unet = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    rewrite(unet, lambda s: [s.pop(k) for k in ("conv_in.weight", "conv_out.bias")])
    with pytest.raises(CheckpointError, match=r"unet: the checkpoint does not match.*missing 2 keys: "
                                              r"conv_in.weight, conv_out.bias"):
        sdfast.load(folder_copy)


def test_unexpected_keys_are_named(folder_copy):
    vae = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
    rewrite(vae, lambda s: s.update({f"extra.{i}": torch.zeros(1) for i in range(7)}))
    with pytest.raises(CheckpointError, match=r"vae: .*unexpected 7 keys: extra.0, extra.1, extra.2, extra.3, "
                                              r"extra.4 \(and 2 more\)"):
        sdfast.load(folder_copy)


def test_shape_mismatch_names_the_tensor_and_both_shapes(folder_copy):
    unet = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    rewrite(unet, lambda s: s.update({"conv_in.weight": torch.zeros(32, 4, 5, 5)}))
    with pytest.raises(CheckpointError, match=r"unet: tensor 'conv_in.weight' .* has shape \(32, 4, 5, 5\) in the "
                                              r"checkpoint but the network expects \(32, 4, 3, 3\)"):
        sdfast.load(folder_copy)


def test_config_that_does_not_match_the_weights(folder_copy):
    config = folder_copy / "unet" / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "layers_per_block": 1}))
    with pytest.raises(CheckpointError, match=r"unet: the checkpoint does not match the network.*unexpected"):
        sdfast.load(folder_copy)


def test_unsupported_config_option(folder_copy):
    config = folder_copy / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "addition_embed_type": "image"}))
    with pytest.raises(CheckpointError, match=r"model: unet config addition_embed_type='image' is not supported"):
        sdfast.load(folder_copy)


def test_truncated_safetensors(folder_copy):
    vae = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors is not a readable safetensors "
                                              r"file \(truncated or corrupt\?\)"):
        sdfast.load(folder_copy)


def test_corrupt_ckpt(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"broken.ckpt cannot be read as a weights-only torch checkpoint"):
        sdfast.load(path)


def test_missing_component_folder_and_bad_json(folder_copy):
    shutil.rmtree(folder_copy / "vae")
    with pytest.raises(CheckpointError, match=r"vae/config.json is missing"):
        sdfast.load(folder_copy)
    (folder_copy / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model_index.json is not valid JSON"):
        sdfast.load(folder_copy)


def test_legacy_vae_attention_names_load(folder_copy, sd1):
    """Folders saved by diffusers < 0.14 (e.g. the SD 1.5 release) name the VAE attention query/key/value/proj_attn."""
    vae = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def legacy(state):
        for key in [k for k in state if ".attentions.0." in k]:
            for new, old in renames.items():
                if f".{new}." in key:
                    state[key.replace(f".{new}.", f".{old}.")] = state.pop(key)

    rewrite(vae, legacy)
    assert_same_tensors(sdfast.load(folder_copy), sdfast.load(sd1.path))


def test_pickled_bin_folder_loads(folder_copy, sd1):
    """Older diffusers folders hold diffusion_pytorch_model.bin / pytorch_model.bin, read with weights_only=True."""
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "pytorch_model")):
        folder = folder_copy / part
        safetensors_file = next(folder.glob("*.safetensors"))
        torch.save(load_file(str(safetensors_file)), folder / f"{stem}.bin")
        safetensors_file.unlink()
    assert_same_tensors(sdfast.load(folder_copy), sdfast.load(sd1.path))


def test_sharded_safetensors_load(folder_copy, sd1):
    """Large components are saved in shards listed by an index file."""
    shutil.rmtree(folder_copy / "unet")
    sd1.pipe.unet.save_pretrained(folder_copy / "unet", max_shard_size="100KB")
    assert len(list((folder_copy / "unet").glob("*.safetensors"))) > 1
    assert_same_tensors(sdfast.load(folder_copy), sdfast.load(sd1.path))
