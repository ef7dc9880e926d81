"""sdfast/layouts.py: the original (CompVis / webui) single-file layout, checked against diffusers.

Tiny random diffusers/transformers networks are written in the original layout with `to_original`,
plus the non-model keys real files carry, and saved as .safetensors. That file is read back through
sdfast's rules and, independently, through diffusers' own single_file_utils converters: both must
give the original state dicts bit for bit. Full-size SD 1.5 / 2.1 networks on the meta device (no
memory) check the family defaults of `infer_configs` and the rules' shapes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from original_layout import to_original
from sdfast import infer_config, layouts

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

TINY = {
    "sd1": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
                  norm_num_groups=8, sample_size=8),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, vocab_size=1000,
                  hidden_act="quick_gelu"),
    ),
    "sd2": dict(
        unet=dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=(2, 4, 4), use_linear_projection=True, norm_num_groups=8, sample_size=8),
        vae=dict(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
        # 23 used layers, as in SD 2.x: diffusers' converter hard-codes resblocks.23 as the unused one.
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=23, num_attention_heads=4, vocab_size=1000,
                  hidden_act="gelu"),
    ),
}
# What the weights cannot say, for the tiny networks (infer_configs assumes the real releases' values).
UNREVEALED = {
    "sd1": {"unet": {"attention_head_dim": 2, "norm_num_groups": 8}, "vae": {"norm_num_groups": 8},
            "text_encoder": {"num_attention_heads": 4}},
    "sd2": {"unet": {"attention_head_dim": [2, 4, 4], "norm_num_groups": 8}, "vae": {"norm_num_groups": 8},
            "text_encoder": {"num_attention_heads": 4}},
}
REVEALED = {
    "unet": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "cross_attention_dim", "use_linear_projection", "transformer_layers_per_block"),
    "vae": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
            "down_block_types", "up_block_types"),
    "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "max_position_embeddings", "hidden_act"),
}
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")
PROJECTION = 16  # the tiny SD2 file's OpenCLIP text_projection is [width, PROJECTION]


@dataclass
class Tiny:
    family: str
    path: Path
    models: dict  # component -> diffusers/transformers model (configs, and the text model diffusers' converter wants)
    states: dict  # component -> the state dict the file must give back


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    # Every tensor distinct (no zero/one inits), so a swapped mapping cannot pass.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _non_model_keys(family: str, file: dict) -> dict:
    """What real files carry besides the three networks."""
    extra = {key: torch.rand(1000) for key in SCHEDULE_KEYS}
    extra["model_ema.decay"] = torch.tensor(0.9999)
    extra["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    # LitEma's copy of the U-Net, names with dots removed.
    extra |= {"model_ema." + "".join(k.split(".")[1:]): v.clone() for k, v in file.items()
              if k.startswith(layouts.UNET_PREFIX)}
    if family == "sd1":
        extra[layouts.CLIP_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    else:
        extra[layouts.OPENCLIP_PREFIX + "text_projection"] = torch.randn(32, PROJECTION)
        extra[layouts.OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    return extra


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny(request, tmp_path_factory) -> Tiny:
    family, spec = request.param, TINY[request.param]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "unet": _randomize(diffusers.UNet2DConditionModel(**spec["unet"])),
            "vae": _randomize(diffusers.AutoencoderKL(**spec["vae"])),
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**spec["text"])),
        }
    states = {name: model.state_dict() for name, model in models.items()}
    written = dict(states)
    if family == "sd2":
        # OpenCLIP's whole tower has one layer more than SD 2.x runs; the file holds it, the reference does not.
        layers = spec["text"]["num_hidden_layers"]
        tower = _randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
            **{**spec["text"], "num_hidden_layers": layers + 1})))
        written["text_encoder"] = tower.state_dict()
        states["text_encoder"] = {k: v for k, v in tower.state_dict().items()
                                  if not k.startswith(f"encoder.layers.{layers}.")}
    else:
        _randomize(models["text_encoder"])
    file = {}
    for name, model in models.items():
        file |= to_original(name, _config(model), written[name])
    file |= _non_model_keys(family, file)
    path = tmp_path_factory.mktemp(family) / "model.safetensors"
    save_file(file, str(path))
    return Tiny(family, path, models, states)


def _config(model) -> dict:
    return dict(model.config) if isinstance(model.config, dict) else model.config.to_dict()


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """What the loader sees before reading any tensor."""
    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _resblocks(file: dict) -> set[int]:
    prefix = layouts.OPENCLIP_PREFIX + "transformer.resblocks."
    return {int(k[len(prefix):].split(".")[0]) for k in file if k.startswith(prefix)}


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def test_detect_family(tiny):
    assert infer_config.detect_family(_shapes(tiny.path)) == tiny.family


def test_infer_configs_recovers_what_the_weights_reveal(tiny):
    configs = infer_config.infer_configs(_shapes(tiny.path))
    for component, fields in REVEALED.items():
        want = _config(tiny.models[component])
        for field in fields:
            value = configs[component][field]
            assert (list(value) if isinstance(value, (list, tuple)) else value) == \
                   (list(want[field]) if isinstance(want[field], (list, tuple)) else want[field]), (component, field)
    if tiny.family == "sd2":
        assert configs["text_encoder"]["projection_dim"] == PROJECTION
    assert configs["pad_token"] == {"sd1": "<|endoftext|>", "sd2": "!"}[tiny.family]


def test_inferred_configs_build_the_same_networks(tiny):
    """The configs are in diffusers/transformers format: the networks they build have the reference's shapes."""
    configs = infer_config.infer_configs(_shapes(tiny.path), overrides=UNREVEALED[tiny.family])
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = {
            "unet": diffusers.UNet2DConditionModel.from_config(configs["unet"]),
            "vae": diffusers.AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(configs["text_encoder"])),
        }
    for component, model in built.items():
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == {k: tuple(v.shape) for k, v in tiny.states[component].items()}, component


def test_rules_reproduce_the_state_dicts(tiny):
    shapes = _shapes(tiny.path)
    configs = infer_config.infer_configs(shapes)
    used = set()
    with safe_open(str(tiny.path), framework="pt") as f:
        for component, want in tiny.states.items():
            rules = layouts.original_rules(component, configs[component])
            targets = [r.target for r in rules]
            assert len(targets) == len(set(targets)), f"{component}: a parameter mapped twice"
            assert set(targets) == set(want), component
            got = {r.target: layouts.transform(r.transform)(f.get_tensor(r.source)) for r in rules}
            _assert_same(got, want)
            assert {layouts.component_of(r.source) for r in rules} == {component}
            used |= {r.source for r in rules}
    assert not [k for k in used if layouts.is_ignored(k, configs)]
    unexpected = [k for k in shapes if k not in used and not layouts.is_ignored(k, configs)]
    assert unexpected == []


def test_diffusers_converters_agree(tiny):
    """diffusers' own single-file converters read the file we wrote back to the same tensors."""
    file = load_file(str(tiny.path))
    unet = single_file_utils.convert_ldm_unet_checkpoint(file, _config(tiny.models["unet"]))
    _assert_same(unet, tiny.states["unet"])
    vae = single_file_utils.convert_ldm_vae_checkpoint(file, _config(tiny.models["vae"]))
    _assert_same(vae, tiny.states["vae"])
    if tiny.family == "sd1":
        text = single_file_utils.convert_ldm_clip_checkpoint(file)
        # It copies every key under the prefix, buffers included.
        del text["text_model.embeddings.position_ids"]
    else:
        text = single_file_utils.convert_open_clip_checkpoint(tiny.models["text_encoder"], file)
    # transformers 5's CLIPTextModel has no text_model. level; diffusers' converters still write it.
    _assert_same({k.removeprefix("text_model."): v for k, v in text.items()}, tiny.states["text_encoder"])


# ---- Full-size shapes on the meta device: the releases' defaults. ----

REAL = {
    "sd1": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu"),
        image=512,
    ),
    "sd2": dict(
        unet=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True, upcast_attention=True),
        # The stable-diffusion-2-1 repo says projection_dim 512; the file's text_projection is [1024, 1024].
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  projection_dim=1024, hidden_act="gelu"),
        image=768,
    ),
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_sizes(family):
    spec = REAL[family]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "unet": diffusers.UNet2DConditionModel(**spec["unet"]),
            "vae": diffusers.AutoencoderKL(
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=spec["image"],
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**spec["text"])),
        }
        file = {}
        for name, model in models.items():
            file |= to_original(name, _config(model), model.state_dict())
        if family == "sd2":
            file[layouts.OPENCLIP_PREFIX + "text_projection"] = torch.empty(1024, 1024)
            assert _resblocks(file) == set(range(24))
    assert single_file_utils.infer_diffusers_model_type(file) == {"sd1": "v1", "sd2": "v2"}[family]
    shapes = {k: tuple(v.shape) for k, v in file.items()}
    assert infer_config.detect_family(shapes) == family
    upcast = {"unet": {"upcast_attention": True}} if family == "sd2" else None
    configs = infer_config.infer_configs(shapes, overrides=upcast)
    for component, model in models.items():
        want = _config(model)
        for field, value in configs[component].items():
            if field in ("_class_name", "architectures"):
                continue
            assert value == (list(want[field]) if isinstance(want[field], tuple) else want[field]), (component, field)
        for r in layouts.original_rules(component, configs[component]):
            tensor = layouts.transform(r.transform)(file[r.source])
            assert tuple(tensor.shape) == tuple(model.state_dict()[r.target].shape), r


def test_scheduler_config_follows_family_and_global_step(tiny):
    shapes = _shapes(tiny.path)
    default = infer_config.infer_configs(shapes)
    base = infer_config.infer_configs(shapes, global_step=infer_config.SD2_BASE_GLOBAL_STEP)
    if tiny.family == "sd1":
        assert default["scheduler"]["prediction_type"] == base["scheduler"]["prediction_type"] == "epsilon"
        assert default["unet"]["sample_size"] == 64 and default["vae"]["sample_size"] == 512
    else:
        assert default["scheduler"]["prediction_type"] == "v_prediction"
        assert (default["unet"]["sample_size"], default["vae"]["sample_size"]) == (96, 768)
        assert base["scheduler"]["prediction_type"] == "epsilon"
        assert (base["unet"]["sample_size"], base["vae"]["sample_size"]) == (64, 512)
    scheduler = getattr(diffusers, default["scheduler"]["_class_name"]).from_config(default["scheduler"])
    assert scheduler.config.prediction_type == default["scheduler"]["prediction_type"]


def test_overrides(tiny):
    shapes = _shapes(tiny.path)
    configs = infer_config.infer_configs(shapes, overrides={"unet": {"upcast_attention": True}})
    assert configs["unet"]["upcast_attention"] is True
    with pytest.raises(ValueError, match="upcast_atention"):
        infer_config.infer_configs(shapes, overrides={"unet": {"upcast_atention": True}})
    with pytest.raises(ValueError, match="unknown config 'tokenizer'"):
        infer_config.infer_configs(shapes, overrides={"tokenizer": {}})


def test_unsupported_files(tiny):
    shapes = _shapes(tiny.path)
    unet_only = {k: v for k, v in shapes.items() if k.startswith(layouts.UNET_PREFIX)}
    no_text = {k: v for k, v in shapes.items() if not k.startswith("cond_stage_model.")}
    sdxl = {**no_text, "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    diffusers_layout = {k: tuple(v.shape) for k, v in tiny.states["unet"].items()}
    cases = {
        "SDXL": sdxl,
        "no original-layout VAE": unet_only,
        "no text encoder": no_text,
        "no original-layout U-Net": diffusers_layout,
        "no original-layout U-Net.*found key groups: foo.bar": {"foo.bar": (3,)},
        "no original-layout U-Net.*no keys": {},
    }
    token = (layouts.CLIP_PREFIX + "embeddings.token_embedding.weight" if tiny.family == "sd1"
             else layouts.OPENCLIP_PREFIX + "token_embedding.weight")
    cases["cross-attention width 32 != text encoder width 64"] = {**shapes, token: (1000, 64)}
    for message, case in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            infer_config.infer_configs(case)
        assert "Supported: original-layout" in str(error.value)


def test_to_original_checks_the_state_dict(tiny):
    config, state = _config(tiny.models["unet"]), dict(tiny.states["unet"])
    state["extra.weight"] = state.pop("conv_in.weight")
    with pytest.raises(ValueError, match=r"missing=\['conv_in.weight'\] unexpected=\['extra.weight'\]"):
        to_original("unet", config, state)


def test_openclip_unused_layer_is_written_as_zeros():
    config = transformers.CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=10, hidden_act="gelu")
    model = _randomize(transformers.CLIPTextModel(config))
    file = to_original("text_encoder", config.to_dict(), model.state_dict())
    assert _resblocks(file) == {0, 1, 2}
    extra = [k for k in file if k.startswith(layouts.OPENCLIP_PREFIX + "transformer.resblocks.2.")]
    assert len(extra) == 12 and all(not file[k].any() for k in extra)
    configs = {"text_encoder": {"num_hidden_layers": 2}}
    assert all(layouts.is_ignored(k, configs) for k in extra)
    assert not any(layouts.is_ignored(k, configs) for k in file if k not in extra)


def test_transforms():
    fused = torch.arange(12.0).reshape(6, 2)  # in_proj_weight [3W, W] with W = 2
    q, k, v = (layouts.transform(x)(fused) for x in "qkv")
    assert torch.equal(torch.cat([q, k, v]), fused)
    assert q.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()
    assert layouts.transform("conv_to_linear")(torch.ones(4, 3, 1, 1)).shape == (4, 3)
    with pytest.raises(RuntimeError):
        layouts.transform("conv_to_linear")(torch.ones(4, 3, 3, 3))  # a real conv is not a linear
    with pytest.raises(ValueError, match="unknown transform"):
        layouts.transform("transpose")
