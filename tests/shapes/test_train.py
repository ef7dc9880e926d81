"""``python -m sdfast.shapes.train --quick``: every stage runs, and the folder it writes is a Stable Diffusion
pipeline that both sdfast and diffusers load, generating the same image."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import sdfast
from sdfast.shapes.train import main


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "model"
    threads = torch.get_num_threads()
    main(["--out", str(out), "--quick", "--threads", "1"])
    torch.set_num_threads(threads)
    return out


def test_writes_a_diffusers_folder_in_fp16(quick_model):
    for part, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):
        with safe_open(quick_model / part / f"{weights}.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert (quick_model / "tokenizer" / "vocab.json").is_file() and (quick_model / "tokenizer" / "merges.txt").is_file()
    assert json.loads((quick_model / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "EulerDiscreteScheduler"
    scaling = json.loads((quick_model / "vae" / "config.json").read_text())["scaling_factor"]
    assert isinstance(scaling, float) and 0.05 < scaling < 20  # measured from the latents, not left at None


def test_sdfast_and_diffusers_load_it_and_agree(quick_model):
    from diffusers import StableDiffusionPipeline

    pipe = sdfast.load(quick_model)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == 64
    ours = pipe.generate("a red circle", steps=4, seed=2, scheduler="euler")
    reference = StableDiffusionPipeline.from_pretrained(quick_model)  # fp32
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(2),
                       output_type="latent").images
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-3, atol=1e-3)
    assert np.asarray(ours.images[0]).shape == (64, 64, 3)


def test_same_arguments_give_the_same_weights(quick_model, tmp_path):
    threads = torch.get_num_threads()
    main(["--out", str(tmp_path / "again"), "--quick", "--threads", "1"])
    torch.set_num_threads(threads)
    for weights in quick_model.rglob("*.safetensors"):
        again = tmp_path / "again" / weights.relative_to(quick_model)
        assert weights.read_bytes() == again.read_bytes(), weights.relative_to(quick_model)


@pytest.mark.parametrize("stage,trained", [("3", "text_encoder/model"), ("4", "unet/diffusion_pytorch_model")])
def test_from_runs_one_stage_alone_and_changes_only_its_network(quick_model, tmp_path, stage, trained):
    """--stages 3 (phrasings) trains the text encoder alone, --stages 4 (alignment) the U-Net alone."""
    threads = torch.get_num_threads()
    main(["--out", str(tmp_path / "again"), "--from", str(quick_model), "--stages", stage, "--quick", "--threads",
          "1", "--text-lr", "0.1", "--align-lr", "0.1"])
    torch.set_num_threads(threads)
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        same = (quick_model / f"{part}.safetensors").read_bytes() == \
            (tmp_path / "again" / f"{part}.safetensors").read_bytes()
        assert same == (part != trained), part


@pytest.mark.parametrize("stages,message", [(["2", "3"], "give consecutive stages, 1 and 2 together"),
                                            (["1", "3"], "give consecutive stages"),
                                            (["3", "4"], "pass its folder with --from"),
                                            (["1", "2", "3", "4", "--from", "m"], "stages 1 and 2 train a new model")])
def test_stages_that_cannot_run_are_refused(stages, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--quick", "--stages", *stages])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_phrasing_table_pairs_each_wording_with_its_template():
    from sdfast.shapes.dataset import ALL_SCENES
    from sdfast.shapes.train import caption_table, phrasing_table
    from sdfast.tokenizer import Tokenizer

    tokenizer = Tokenizer.clip()
    table = phrasing_table(tokenizer, wordings=3, seed=0)
    assert table.shape == (len(ALL_SCENES) + 1, 8 + 3, 2, 77)
    assert torch.equal(table[:, :8, 0], caption_table(tokenizer)) and torch.equal(table[:, :8, 1], table[:, :8, 0])
    assert torch.equal(table[-1, :, 0], table[-1, :, 1])  # the empty caption beside itself
    assert not torch.equal(table[:-1, 8:, 0], table[:-1, 8:, 1])  # phrasings are not their templates
    templates = {tuple(row.tolist()) for row in caption_table(tokenizer)[0]}
    assert all(tuple(row.tolist()) in templates for row in table[0, 8:, 1])  # each beside one of its scene's 8
