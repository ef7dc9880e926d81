"""Config bounds: a config with absurd values is refused while it is read, in one line naming the file, the field, the
value and the allowed range (``sdfast.config_bounds.BOUNDS``), before anything is built or allocated, instead of
hanging, overflowing, dividing by zero, or loading and failing inside generate."""

import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

import sdfast
from sdfast import checkpoint, config_bounds
from sdfast.bench.arch import PRESETS
from sdfast.checkpoint import CheckpointError
from sdfast.config_bounds import BOUNDS
from sdfast.models import AutoencoderKL, CLIPTextModel, UNet
from test_checkpoint import OVERRIDES, original_state


@pytest.fixture
def folder(sd1, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(sd1.path, copy)
    return copy


def edit(folder, part, **fields):
    """Set ``fields`` in ``folder/part``'s config file (the scheduler's is scheduler_config.json)."""
    path = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return path


def refused(path, pattern, **kwargs) -> str:
    """The CheckpointError loading ``path`` raises: one line, matching ``pattern``, within a few seconds."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=pattern) as e:
        sdfast.load(path, **kwargs)
    assert time.perf_counter() - start < 10
    assert "\n" not in str(e.value)
    return str(e.value)


# (part, field, value, what the message says about the allowed range); each failed before: a hang, an overflow,
# a ZeroDivisionError, or a load that failed later inside generate
ABSURD = [
    ("unet", "layers_per_block", 100000, r"an integer 1\.\.16, or a list of 1\.\.8 entries"),
    ("text_encoder", "num_hidden_layers", 1000000, r"an integer 1\.\.64 \(released models: 12, 23, 32\)"),
    ("unet", "block_out_channels", [1000000000, 64], r"each an integer 4\.\.4,096, a multiple of 2"),
    ("unet", "attention_head_dim", 0, r"an integer 1\.\.4,096"),
    ("unet", "norm_num_groups", 0, r"an integer 1\.\.4,096"),
    ("vae", "norm_num_groups", 0, r"an integer 1\.\.4,096"),
    ("scheduler", "num_train_timesteps", 0, r"an integer 1\.\.100,000"),
    ("scheduler", "num_train_timesteps", 10**10, r"an integer 1\.\.100,000"),
    ("unet", "sample_size", 1000000, r"an integer 1\.\.1,024, or null"),
    ("vae", "block_out_channels", [16, 16, 32, 10**9], r"each an integer 1\.\.4,096"),
    ("text_encoder", "hidden_size", 10**9, r"an integer 1\.\.8,192"),
    ("text_encoder", "vocab_size", 10**9, r"an integer 1\.\.1,000,000"),
    ("text_encoder", "max_position_embeddings", 10**6, r"an integer 1\.\.1,024"),
    ("text_encoder", "num_attention_heads", 0, r"an integer 1\.\.8,192"),
    ("unet", "transformer_layers_per_block", 65, r"an integer 1\.\.64"),
    ("scheduler", "beta_start", 0, r"a finite number 0 < x < 1"),
    ("scheduler", "beta_end", 1.5, r"a finite number 0 < x < 1"),
    # types: a string for an int, a bool for an int, NaN for a float, a scalar for a list
    ("unet", "layers_per_block", "2", r"an integer 1\.\.16"),
    ("unet", "layers_per_block", True, r"an integer 1\.\.16"),
    ("unet", "norm_eps", float("nan"), r"a finite number 0 < x < 1"),
    ("scheduler", "beta_end", float("inf"), r"a finite number 0 < x < 1"),
    ("unet", "block_out_channels", 64, r"a list of 1\.\.8 entries"),
    ("vae", "scaling_factor", float("nan"), r"a finite number 0 < x < 100"),
    ("unet", "upcast_attention", "yes", r"true or false"),
]


@pytest.mark.parametrize("part, field, value, allowed", ABSURD, ids=[f"{p}.{f}={v!r}"[:40] for p, f, v, _ in ABSURD])
def test_an_absurd_value_is_refused_naming_file_field_value_and_range(folder, part, field, value, allowed):
    path = edit(folder, part, **{field: value})
    shown = config_bounds.short_repr(value).replace("(", r"\(").replace("[", r"\[").replace(".", r"\.").replace("+", r"\+")
    refused(folder, rf"^{path}: {field}={shown} .*: allowed .*{allowed}.*; correct it in that file")


@pytest.mark.parametrize("content", [[1, 2, 3], "abc", 7, None])
def test_a_config_that_is_not_an_object_is_refused(folder, content):
    for part in ("unet", "text_encoder", "scheduler"):
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        original = (folder / part / name).read_text()
        (folder / part / name).write_text(json.dumps(content))
        kind = {list: "list", str: "string", int: "number", type(None): "null"}[type(content)]
        refused(folder, rf"{part}/{name} holds a JSON {kind}, not an object of fields")
        (folder / part / name).write_text(original)
    (folder / "model_index.json").write_text("[]")
    refused(folder, r"model_index.json holds a JSON list")


@pytest.mark.parametrize("part, fields, message", [
    ("unet", {"norm_num_groups": 7}, (r"unet/config.json: norm_num_groups=7 does not divide block_out_channels "
                                      r"entries \[32, 64\]")),
    ("vae", {"norm_num_groups": 32}, (r"vae/config.json: norm_num_groups=32 does not divide block_out_channels "
                                      r"entries \[16, 16\]")),
    ("unet", {"attention_head_dim": 3}, (r"unet/config.json: level 0's 32 channels in 3 heads .* do not make whole "
                                         r"heads 1\.\.512 wide")),
    ("unet", {"attention_head_dim": [4, 5]}, r"level 1's 64 channels in 5 heads"),
    ("unet", {"block_out_channels": [32, 64, 64]}, r"block_out_channels has 3 entries but down_block_types 2"),
    ("text_encoder", {"num_attention_heads": 5}, (r"text_encoder/config.json: hidden_size=32 in "
                                                  r"num_attention_heads=5 does not make whole heads")),
    ("scheduler", {"trained_betas": [0.1, 0.2]}, r"trained_betas has 2 entries but num_train_timesteps=1000"),
    ("scheduler", {"prediction_type": "sample"}, (r"scheduler_config.json: prediction_type='sample' is not "
                                                  r"supported; expected one of")),
])
def test_fields_that_do_not_fit_together_are_refused(folder, part, fields, message):
    edit(folder, part, **fields)
    refused(folder, message)


def test_a_tokenizer_longer_than_the_positions_is_refused(folder):
    path = folder / "tokenizer" / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_max_length": 10**6}))
    refused(folder, r"tokenizer_config.json: model_max_length=1000000 is more tokens than .*text_encoder/config.json "
                    r"has positions \(max_position_embeddings=77")


def test_a_config_within_bounds_but_larger_than_the_weights_is_refused_before_it_is_built(folder, monkeypatch):
    """layers_per_block 16 and a 64-deep transformer pass the bounds; the U-Net they describe is counted (no module
    built, nothing allocated) against the file's weights and refused, instead of spending a minute building it on the
    meta device only to report missing keys."""
    edit(folder, "unet", layers_per_block=16, transformer_layers_per_block=64)

    def never(*args, **kwargs):
        raise AssertionError("a network was built")

    monkeypatch.setattr(checkpoint, "materialize", never)
    monkeypatch.setattr(checkpoint, "_NETWORKS", {k: never for k in checkpoint._NETWORKS})
    refused(folder, r"unet/config.json: this unet config describes a network of [\d,]+ weights, but the weight file "
                    r"holds 1,\d{3},\d{3} for it: the config does not belong to these weights")
    edit(folder, "unet", layers_per_block=2, transformer_layers_per_block=1)
    edit(folder, "text_encoder", intermediate_size=65536)
    refused(folder, r"text_encoder/config.json: this text_encoder config describes")


def test_a_config_slightly_off_still_names_the_missing_keys(folder):
    """Within twice the file's weights the network is built on the meta device and the key check names what is
    missing, still before any tensor is read."""
    edit(folder, "unet", layers_per_block=3)
    refused(folder, r"unet: the checkpoint does not match the network .*missing \d+ keys: "
                    r"down_blocks\.0\.attentions\.2")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_weight_counts_by_arithmetic_equal_the_built_networks(name):
    arch = PRESETS[name]
    for cfg, cls in ((arch.unet, UNet), (arch.vae, AutoencoderKL), (arch.text_encoder, CLIPTextModel),
                     (arch.text_encoder_2, CLIPTextModel)):
        if cfg is None:
            continue
        with torch.device("meta"):
            net = cls(cfg)
        assert cfg.num_parameters() == sum(t.numel() for t in net.state_dict().values()), (name, cls.__name__)


def test_weight_counts_equal_the_fixtures_files(sd1, sd2):
    for ref in (sd1, sd2):
        pipe = sdfast.load(ref.path)
        for net in (pipe.unet, pipe.vae, pipe.text_encoder):
            assert net.config.num_parameters() == sum(t.numel() for t in net.state_dict().values())
    default = sdfast.load()
    assert default.unet.config.num_parameters() == sum(t.numel() for t in default.unet.parameters())


@pytest.fixture(scope="module")
def single(sd1, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in original_state(sd1).items()}, str(path))
    return path


@pytest.mark.parametrize("overrides, pattern", [
    ({"unet": {"attention_head_dim": 0}}, (r"\(unet config inferred from the weights, with overrides\): "
                                           r"attention_head_dim=0 out of bounds: allowed an integer 1\.\.4,096")),
    ({"unet": {"sample_size": 10**6}}, r"sample_size=1000000 out of bounds"),
    ({"scheduler": {"num_train_timesteps": 10**10}}, (r"\(scheduler config inferred .*num_train_timesteps="
                                                      r"10000000000 out of bounds")),
    ({"scheduler": {"beta_start": float("nan")}}, r"beta_start=nan out of bounds"),
    ({"vae": {"norm_num_groups": True}}, r"\(vae config .*norm_num_groups=True out of bounds"),
    ({"text_encoder": {"num_attention_heads": "4"}}, r"num_attention_heads='4' out of bounds"),
    ({"unet": {"norm_num_groups": 64}}, r"norm_num_groups=64 does not divide block_out_channels entries \[32\]"),
    ({"unet": {"layers_per_block": 16}}, r"this unet config describes a network of"),
    ("unet", r"overrides must be a dict of configs"),
    ({"unet": ["sample_size"]}, r"overrides\['unet'\] must be a dict of config fields, not list"),
])
def test_single_file_configs_and_overrides_are_bounded(single, overrides, pattern):
    if isinstance(overrides, dict):  # what the tiny file's weights cannot tell, then the bad value
        overrides = {**OVERRIDES["sd1"], **{part: {**OVERRIDES["sd1"].get(part, {}), **fields}
                                            if isinstance(fields, dict) else fields
                                            for part, fields in overrides.items()}}
    message = refused(single, pattern, overrides=overrides)
    assert str(single) in message


def test_single_file_without_overrides_names_the_unrevealed_field(single):
    """What the weights cannot tell follows the family (64-wide heads, 32 norm groups), which the tiny file's widths
    do not fit: the message names the field and says to override it."""
    refused(single, r"\(text_encoder config inferred .*\): num_attention_heads=0 out of bounds: .*if the weights "
                    r"cannot tell it, pass the right value in overrides")
    overrides = {"text_encoder": {"num_attention_heads": 4}, "unet": {"attention_head_dim": 4}}
    refused(single, r"\(vae config inferred .*norm_num_groups=32 does not divide block_out_channels entries "
                    r"\[16, 16\].*if the weights cannot tell it, pass the right value in overrides",
            overrides=overrides)


def test_every_bound_describes_itself():
    for component, fields in BOUNDS.items():
        for name, bound in fields.items():
            text = bound.allowed()
            assert text and "\n" not in text, (component, name)
            if bound.kind in (int, float):
                assert math.isfinite(bound.lo) and math.isfinite(bound.hi) and bound.lo < bound.hi
