"""ControlNets on every backend that runs torch modules (torch, triton, compile) equal the torch backend; the export
backends (onnxruntime, tensorrt) run their exported graphs: ``test_controlnet_exported.py``."""

import pytest
import torch

import sdfast
from conftest import rel_err
from controlnets import control_image, random_controlnet
from sdfast.backends.triton import CudaGraphUNet, FusedSelfAttention
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


def test_triton_converts_the_controlnet_too(sd1, controlnet, controls):
    """One step, no decode (``denoising_end``): Triton's CPU interpreter takes seconds a U-Net call; the whole
    controlled run is checked against diffusers in tests/control. The window is the run's (one call), so the control
    here acts over all of it."""
    pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
    args = dict(ARGS, denoising_end=0.5, width=32, height=32)  # the control image's size
    one_step = [Control("c", controls[0].image, 0.7)]
    reference = sdfast.load(sd1.path, device=DEVICE)
    reference.controlnets.load(controlnet, "c")
    expected = reference.generate(**args, controls=one_step).latents
    assert rel_err(expected, reference.generate(**args).latents) > 1e-3  # the ControlNet acts in this step
    pipe = sdfast.load(sd1.path, device=DEVICE, dtype="fp32", backend="triton", cuda_graph=False)
    pipe.controlnets.load(controlnet, "c")
    net = pipe.controlnets["c"]
    assert isinstance(net.down_blocks[0].attentions[0].transformer_blocks[0].attn1, FusedSelfAttention)
    assert all(m.kernel is not torch_group_norm for m in net.modules() if isinstance(m, GroupNorm))
    assert rel_err(pipe.generate(**args, controls=one_step).latents, expected) < 1e-5


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


def test_cuda_graph_bookkeeping_with_controlnets(sd1, controlnet, controls, monkeypatch):
    """What ``CudaGraphUNet`` keeps around its replays, with torch.cuda's graph and stream calls stood in for (this
    CPU has none; the replays themselves are the gpu test's): one graph per set of ControlNets and shapes, the scale
    written into the graph's input before each replay, graphs dropped when the backend converts their ControlNet and
    when it is gone, and controls given with residuals refused."""
    import contextlib
    import dataclasses
    import gc

    class Graph:
        def replay(self):
            replays.append(self)

    class Stream:
        def wait_stream(self, other):
            pass

    replays = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    base = sdfast.load(sd1.path)
    graphed = CudaGraphUNet(base.unet)
    pipe = dataclasses.replace(base, unet=graphed)
    pipe.controlnets.load(controlnet, "c")
    net = pipe.controlnets["c"]

    def scales():
        return {len(nets): [round(v.item(), 6) for v in entry[2]] for (nets, _), entry in graphed.graphs.items()}

    pipe.generate(**ARGS, controls=controls)  # 2 steps, the window ends at 0.8: one with the ControlNet, one without
    assert len(replays) == 2 and scales() == {1: [0.7], 0: []}
    pipe.generate(**ARGS, controls=[Control("c", controls[0].image, 0.2, 0.0, 0.8)])
    assert len(replays) == 4 and scales() == {1: [0.2], 0: []}  # the same graphs, the new scale
    assert [nets for nets, _ in graphed.graphs] == [(id(net),), ()]
    graphed.forget(net)  # what the triton backend does as it converts a ControlNet
    assert scales() == {0: []}
    pipe.generate(**ARGS, controls=controls)
    assert scales() == {0: [], 1: [0.7]}
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="either controls or residuals"):
        graphed(x, torch.tensor(1), torch.randn(2, 77, 32), controls=[object()], mid_residual=x)
    pipe.controlnets.unload("c")
    del net
    gc.collect()
    assert scales() == {0: []}


@pytest.mark.gpu(reason="CUDA graphs need a CUDA GPU")
def test_gpu_one_cuda_graph_runs_controlnet_and_unet(sd1, controlnet, controls):
    """On a GPU the triton backend replays a controlled step as one CUDA graph holding the ControlNet and the U-Net:
    the steps inside the window and those after it are two graphs, a new scale replays them (the scale is an input
    of the graph), each result equals the torch backend's in fp16, and the graphs go with the ControlNet."""
    import gc

    reference = sdfast.load(sd1.path, device="cuda", dtype="fp16")
    reference.controlnets.load(controlnet, "c")
    pipe = sdfast.load(sd1.path, device="cuda", backend="triton")
    pipe.controlnets.load(controlnet, "c")
    assert isinstance(pipe.unet, CudaGraphUNet)
    results = []
    for scale in (0.7, 0.2):
        these = [Control("c", controls[0].image, scale, 0.0, 0.8)]
        got, want = pipe.generate(**ARGS, controls=these), reference.generate(**ARGS, controls=these)
        assert rel_err(got.latents, want.latents) < 1e-2
        results.append(got.latents)
        assert sorted(len(nets) for nets, _ in pipe.unet.graphs) == [0, 1]  # with the ControlNet, and without
    assert rel_err(results[0], results[1]) > 1e-3  # the new scale took effect
    pipe.controlnets.unload("c")
    gc.collect()
    assert [len(nets) for nets, _ in pipe.unet.graphs] == [0]
