"""The denoising loop (``sdfast.sampler``) on its own, with a stand-in U-Net: guidance's arithmetic, the
conditioning reaching every U-Net call the same way, the start / end window, the callback's stop, previews, and
the clean-image estimate for both parameterisations."""

import pytest
import numpy as np
import torch
from PIL import Image

from sdfast.control.controls import Active
from sdfast.sampler import Conditioning, LatentRGB, denoise, guided, predicted_x0
from sdfast.schedulers import make_scheduler
from sdfast.timing import Recorder

CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              steps_offset=1, timestep_spacing="leading")


class Recording:
    """A U-Net stand-in: returns a fixed function of its inputs and records every call's keyword inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, **added):
        self.calls.append({"batch": len(x), "t": float(t), "context": context, **added})
        return 0.1 * x + context.mean() + sum(v.float().mean() for v in added.values() if torch.is_tensor(v))


def test_guidance_is_uncond_plus_scale_times_the_difference():
    x = torch.randn(2, 4, 8, 8)
    cond = Conditioning(torch.stack([torch.zeros(1, 3), torch.ones(1, 3)]).repeat_interleave(2, 0))  # (4, 1, 3)

    def unet(x2, t, context):  # the unconditional half gives 0, the conditional half 1
        return context.mean(dim=(1, 2))[:, None, None, None].expand_as(x2)

    out = guided(unet, x, torch.tensor(500), cond, 7.5)
    assert torch.allclose(out, torch.full_like(x, 7.5))
    assert guided(unet, x, torch.tensor(500), Conditioning(torch.ones(2, 1, 3)), 1.0).eq(1).all()  # one pass


def test_the_added_conditioning_reaches_every_call():
    """SDXL's text_embeds / time_ids ride in the Conditioning: the loop calls unet(x, t, context, **added)."""
    unet, sched = Recording(), make_scheduler("euler", CONFIG)
    start, end = sched.window(4)
    cond = Conditioning(torch.randn(2, 77, 8), {"text_embeds": torch.randn(2, 5), "time_ids": torch.randn(2, 6)})
    denoise(unet, sched, torch.randn(1, 4, 8, 8), cond, guidance_scale=5.0, start=start, end=end, generator=None,
            recorder=Recorder(torch.device("cpu")))
    assert len(unet.calls) == 4
    assert all(c["batch"] == 2 and set(c) >= {"text_embeds", "time_ids"} for c in unet.calls)


class ControlStandIn:
    """A ControlNet stand-in: residuals that are its offset times the scale, recording the scales it ran at."""

    def __init__(self, offset: float):
        self.offset, self.scales = offset, []

    def __call__(self, x, t, context, image, scale, **added):
        self.scales.append(scale)
        return [torch.full_like(x, self.offset * scale)], torch.full_like(x, self.offset * scale)


def test_controls_reach_the_unet_as_residuals_or_whole():
    """Each control's residuals at its scale, summed in order, reach an ordinary U-Net callable; a U-Net that runs
    the ControlNets itself (``runs_controls``: the triton backend's CUDA graphs) gets the controls instead and is
    never handed residuals."""
    a, b = ControlStandIn(1.0), ControlStandIn(10.0)
    image = torch.zeros(2, 3, 64, 64)
    controls = (Active(a, image, 0.5, 0.0, 1.0), Active(b, image, 2.0, 0.0, 1.0))
    cond = Conditioning(torch.randn(2, 77, 8), {"text_embeds": torch.randn(2, 5)}, controls)
    unet = Recording()
    guided(unet, torch.randn(1, 4, 8, 8), torch.tensor(500), cond, 5.0)
    (call,) = unet.calls
    assert call["mid_residual"].eq(20.5).all() and [d.eq(20.5).all() for d in call["down_residuals"]] == [True]
    assert call["batch"] == len(call["mid_residual"]) == 2  # the ControlNets saw the guided batch, [x; x]
    assert a.scales == [0.5] and b.scales == [2.0] and "text_embeds" in call

    class RunsControls(Recording):
        runs_controls = True

    unet = RunsControls()
    guided(unet, torch.randn(1, 4, 8, 8), torch.tensor(500), cond, 5.0)
    (call,) = unet.calls
    assert call["controls"] is controls and "down_residuals" not in call and "text_embeds" in call
    assert a.scales == [0.5]  # not run by the sampler
    guided(unet, torch.randn(1, 4, 8, 8), torch.tensor(500), Conditioning(cond.context), 5.0)
    assert "controls" not in unet.calls[-1]  # no controls: the plain call


def test_window_callback_and_previews():
    unet, sched = Recording(), make_scheduler("ddim", CONFIG)
    start, end = sched.window(10, strength=0.5)
    assert (start, end) == (5, None)
    steps, previews = [], []

    def callback(step, t, latents):
        steps.append(step)
        return step < 3  # stop after the third step

    denoise(unet, sched, torch.randn(1, 4, 8, 8), Conditioning(torch.randn(1, 77, 8)), guidance_scale=1.0,
            start=start, generator=None, recorder=Recorder(torch.device("cpu")), callback=callback,
            preview=lambda step, x0: previews.append((step, x0.shape)), preview_every=2)
    assert steps == [1, 2, 3] and [c["t"] for c in unet.calls] == [float(t) for t in sched.timesteps[5:8]]
    assert previews == [(2, (1, 4, 8, 8))]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_forward_process(prediction):
    sched = make_scheduler("euler", {**CONFIG, "prediction_type": prediction})
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor(400)
    abar = sched.alphas_cumprod[400]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    out = eps if prediction == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    assert torch.allclose(predicted_x0(sched, x_t, t, out), x0, atol=1e-5)


def test_latent_preview_is_one_picture_per_latent_at_the_size_asked():
    pictures = LatentRGB(torch.randn(4, 3), torch.zeros(3))(torch.randn(3, 4, 8, 8), (64, 48))
    assert [p.size for p in pictures] == [(64, 48)] * 3 and {p.mode for p in pictures} == {"RGB"}


@pytest.fixture(scope="module")
def shipped():
    import sdfast

    return sdfast.load()  # the default model: its VAE is unlike SD's, so SD's preview factors paint wrong colours


def test_linear_previews_exist_for_sd_and_sdxl_vaes_only(shipped):
    from sdfast.models import VAEConfig

    sd, xl = VAEConfig(scaling_factor=0.18215), VAEConfig(scaling_factor=0.13025)
    assert LatentRGB.for_vae(sd).matrix[3].tolist() == pytest.approx([-0.2120, -0.2616, -0.7177])
    assert LatentRGB.for_vae(xl).matrix[0].tolist() == pytest.approx([0.3920, 0.4054, 0.4549])
    assert LatentRGB.for_vae(shipped.vae.config) is None and not shipped.facts.linear_preview


def test_a_preview_has_the_final_images_colours(shipped):
    """The new user's case: a green star on white, whose SD-factor previews showed a blue star on green. The last
    preview (decoded: this VAE has no linear map) agrees in colour with the image (per 8x8 cell, mean error under
    10% of the range); so does one five steps earlier, more loosely."""
    result = shipped.generate("a large green star in the center on a white background", steps=20, seed=1,
                              preview_every=5)
    final = np.asarray(result.images[0].resize((8, 8), Image.BOX), dtype=float)
    preview = np.asarray(result.previews[-1][1][0].resize((8, 8), Image.BOX), dtype=float)
    assert np.abs(preview - final).mean() < 0.1 * 255
    earlier = np.asarray(result.previews[-2][1][0].resize((8, 8), Image.BOX), dtype=float)
    assert np.abs(earlier - final).mean() < 0.2 * 255
    assert preview[0, 0].min() > 200 and preview[4, 4, 1] > preview[4, 4, 0] + 60  # white corner, green middle


@pytest.mark.parametrize("window, message", [
    (dict(denoising_start=0.9999), r"denoising_start=0.9999 with steps=10 leaves no denoising step"),
    (dict(denoising_end=0.0001), r"denoising_end=0.0001 with steps=10 leaves no denoising step"),
    (dict(strength=0.01), r"strength=0.01 with steps=10 leaves no denoising step"),
])
def test_an_empty_window_is_an_error_not_zero_steps(window, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler("euler", CONFIG).window(10, **window)
