"""ControlNets on every backend that runs torch modules (torch, triton, compile) equal the torch backend; the export
backends (onnxruntime, tensorrt) run their exported graphs: ``test_controlnet_exported.py``."""

import pytest
import torch

import sdfast
from conftest import rel_err
from controlnets import control_image, random_controlnet
from sdfast.backends.triton import FusedSelfAttention
from sdfast.control import Control
from sdfast.models.layers import GroupNorm
from sdfast.models.layers import group_norm as torch_group_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ARGS = dict(prompt="a red circle", steps=2, seed=3)


@pytest.fixture(scope="module")
def controlnet(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn") / "c"
    random_controlnet(sd1.pipe.unet, seed=9).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def controls():
    return [Control("c", control_image(1, size=32), 0.7, 0.0, 0.8)]


@pytest.fixture(scope="module")
def expected(sd1, controlnet, controls):
    pipe = sdfast.load(sd1.path, device=DEVICE)
    pipe.controlnets.load(controlnet, "c")
    return pipe.generate(**ARGS, controls=controls)


def test_triton_converts_the_controlnet_too(sd1, controlnet, controls, expected):
    pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
    pipe = sdfast.load(sd1.path, device=DEVICE, dtype="fp32", backend="triton", cuda_graph=False)
    pipe.controlnets.load(controlnet, "c")
    net = pipe.controlnets["c"]
    assert isinstance(net.down_blocks[0].attentions[0].transformer_blocks[0].attn1, FusedSelfAttention)
    assert all(m.kernel is not torch_group_norm for m in net.modules() if isinstance(m, GroupNorm))
    assert rel_err(pipe.generate(**ARGS, controls=controls).latents, expected.latents) < 1e-5


def test_compile_traces_the_controlnet_once(sd1, controlnet, controls, expected):
    """One graph (fullgraph=True) for the ControlNet as for the U-Net; a new scale is no recompilation."""
    from torch._dynamo.utils import counters

    from sdfast.backends.compile import CompiledControlNet

    pipe = sdfast.load(sd1.path, device=DEVICE, dtype="fp32", backend="compile", compiler="eager")
    pipe.controlnets.load(controlnet, "c")
    assert isinstance(pipe.controlnets["c"], CompiledControlNet)
    assert rel_err(pipe.generate(**ARGS, controls=controls).latents, expected.latents) < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    pipe.generate(**ARGS, controls=[Control("c", controls[0].image, 0.3, 0.0, 0.8)])
    assert counters["stats"]["unique_graphs"] == graphs  # the same compiled graphs ran the new scale

