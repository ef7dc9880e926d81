"""What keeps full-size exports fast and bounded (issue 21): the parity check's torch reference runs in fp32 on a CPU
(fp16 convolutions there are orders of magnitude slower) and in the graph's dtype on a GPU, leaving the network's
weights exactly as they were; `sdfast export --no-check` skips it and says what is then unchecked; the weights go
from the exporter to disk and stay there while onnxslim works; one VAE dtype rule serves the pipeline and the
export."""

import dataclasses

import pytest
import torch

import sdfast

onnx = pytest.importorskip("onnx", reason='the onnx extra is not installed: pip install -e ".[onnx]"')
pytest.importorskip("onnxruntime", reason='the onnx extra is not installed: pip install -e ".[onnx]"')

from sdfast.cli import main  # noqa: E402
from sdfast.export import external_data, graphs  # noqa: E402
from sdfast.export import onnx as export  # noqa: E402
from sdfast.export.check import TOLERANCE, check, check_memory_problem  # noqa: E402
from sdfast.export.manifest import read_manifest  # noqa: E402


def _spec(pipe, name):
    return next(s for s in graphs.graph_specs(pipe) if s.name == name)


def _weights_during_forward(module) -> list:
    """The dtype and device of the module's first weight at each forward call."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(next(m.parameters()).dtype) or None)
    return seen


def _layers_during_forward(module) -> tuple[list, list]:
    """At each forward of a submodule with weights of its own: their dtypes, and the share of all the module's
    weights then in fp32; and the hooks' handles."""
    total = sum(p.numel() for p in module.parameters())
    seen = []

    def hook(m, args, out):
        fp32 = sum(p.numel() for p in module.parameters() if p.dtype == torch.float32)
        seen.append(({p.dtype for p in m.parameters(recurse=False)}, fp32 / total))

    return seen, [m.register_forward_hook(hook) for m in module.modules() if list(m.parameters(recurse=False))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU reference; on a GPU it runs in fp16 (test below)")
def test_fp16_graph_is_checked_against_an_fp32_reference_on_cpu(sd2_fp16_onnx):
    """The fp16 U-Net graph against the torch U-Net run in fp32, at the fp16 tolerance, each layer's weights in fp32
    only while it runs (never all of them: the reference costs one layer's fp32 copy); after the check the fp16
    weights are bit for bit what they were (converted in place and back)."""
    pipe = sd2_fp16_onnx.torch
    spec = _spec(pipe, "unet")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    seen, hooks = _layers_during_forward(spec.module)
    try:
        report = check(spec, sd2_fp16_onnx.folder / "unet.onnx")
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) > 50 and all(dtypes == {torch.float32} for dtypes, _ in seen)
    assert max(share for _, share in seen) < 0.1
    assert report["reference"] == "torch fp32 on cpu" and report["tolerance"] == TOLERANCE["fp16"]
    assert max(report["rel_err"].values()) < TOLERANCE["fp16"]
    after = pipe.unet.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())
    # what `sdfast export --dtype fp16` recorded for every graph
    for name, net in read_manifest(sd2_fp16_onnx.folder)["networks"].items():
        assert net["check"]["reference"] == "torch fp32 on cpu", name


@pytest.mark.gpu(reason="the reference runs in the graph's dtype on a CUDA GPU")
def test_fp16_graph_is_checked_against_an_fp16_reference_on_a_gpu(sd2_fp16_onnx):
    pipe = sd2_fp16_onnx.torch
    spec = _spec(pipe, "vae_decoder")
    seen = _weights_during_forward(spec.module)
    report = check(spec, sd2_fp16_onnx.folder / "vae_decoder.onnx")
    assert seen == [torch.float16] and report["reference"] == "torch fp16 on cuda"
    assert {p.device.type for p in pipe.vae.parameters()} == {"cpu"}  # moved back


def test_a_failed_reference_still_restores_the_weights(sd2_fp16_onnx):
    """An error inside the check (here: inputs of the wrong shape) leaves the network in fp16 on the CPU."""
    pipe = sd2_fp16_onnx.torch
    spec = _spec(pipe, "vae_decoder")
    with pytest.raises(RuntimeError):
        check(spec, sd2_fp16_onnx.folder / "vae_decoder.onnx", {"latent": torch.randn(1, 3, 8, 8).half()})
    assert {(p.dtype, p.device.type) for p in pipe.vae.parameters()} == {(torch.float16, "cpu")}


def test_the_network_is_parked_on_disk_while_onnx_runtime_runs(sd2_fp16_onnx, monkeypatch):
    """While ONNX Runtime runs the graph, the torch network's weights (in the process's own memory) are in an
    unnamed scratch file, not in memory; after the check (and after a failed run too) they are bit for bit what they
    were and no file is left; weights mapped from a file stay where they are."""
    from sdfast.export import check as check_module

    pipe, folder = sd2_fp16_onnx.torch, sd2_fp16_onnx.folder
    spec = _spec(pipe, "vae_decoder")
    before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    files = sorted(folder.iterdir())
    real, seen = check_module.ort_session, []

    def session(path, **kwargs):
        seen.append((sum(p.numel() for p in spec.module.parameters()), sorted(folder.iterdir()) == files))
        if len(seen) == 1:
            raise RuntimeError("ONNX Runtime failed")
        return real(path, **kwargs)

    def unchanged():
        after = pipe.vae.state_dict()
        return all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())

    monkeypatch.setattr(check_module, "ort_session", session)
    with pytest.raises(RuntimeError, match="ONNX Runtime failed"):
        check(spec, folder / "vae_decoder.onnx")
    assert unchanged() and sorted(folder.iterdir()) == files
    check(spec, folder / "vae_decoder.onnx")
    assert unchanged() and sorted(folder.iterdir()) == files
    assert seen == [(0, True), (0, True)]
    monkeypatch.setattr(check_module, "file_backed_ranges", lambda: [(0, 2**64)])  # as if all were mapped
    paged = []
    monkeypatch.setattr(check_module, "page_out", lambda address, nbytes: paged.append(nbytes))
    check(spec, folder / "vae_decoder.onnx")
    assert seen[-1] == (sum(p.numel() for p in spec.module.parameters()), True) and unchanged()
    assert sum(paged) == sum(p.numel() * p.element_size() for p in spec.module.parameters())


def test_page_out_keeps_mapped_weights():
    """Weights mapped from their file (the shipped model in fp16) handed back to the kernel read the same after."""
    from sdfast.export.memory import file_backed_ranges, in_ranges, page_out

    unet = sdfast.load(dtype="fp16").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    mapped = file_backed_ranges()
    weights = [p for p in unet.parameters() if in_ranges(p.data_ptr(), mapped)]
    assert weights  # fp16 weights from an fp16 safetensors file are mapped, not copied
    for p in weights:
        page_out(p.data_ptr(), p.numel() * p.element_size())
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())


def test_weights_stay_on_disk_while_onnxslim_works(sd1, tmp_path):
    """to_onnx leaves every constant of 1 MiB or more (here: the 6 MB token embedding) in the exporter's external
    data; onnxslim runs without reading it; save streams it into a self-contained file that needs nothing else."""
    pipe = sdfast.load(sd1.path)
    spec = _spec(pipe, "text_encoder")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    model = export.to_onnx(spec, export.DEFAULT_OPSET, scratch / "text_encoder.onnx")
    big = [t.name for t in model.graph.initializer if external_data.nbytes(t) >= export.SLIM_INLINE_BYTES]
    assert big and all(external_data.is_external(t) for t in model.graph.initializer if t.name in big)
    assert not any(external_data.is_external(t) for t in model.graph.initializer if t.name not in big)
    model, report = export.slim(model)
    assert "skipped" not in report and report["nodes_after"] < report["nodes_before"]
    assert external_data.save(model, tmp_path / "text_encoder.onnx", scratch) is None
    for f in scratch.iterdir():
        f.unlink()
    loaded = onnx.load(str(tmp_path / "text_encoder.onnx"))
    assert not any(external_data.is_external(t) for t in loaded.graph.initializer)
    assert max(check(spec, tmp_path / "text_encoder.onnx")["rel_err"].values()) < TOLERANCE["fp32"]


def test_onnxslim_is_skipped_with_the_reason_when_it_needs_a_weight_on_disk(sd1, tmp_path, monkeypatch):
    """With nothing read in before onnxslim, it needs a constant left on disk: the graph is saved unslimmed, the
    report and the log line say why, and the graph still equals torch."""
    monkeypatch.setattr(export, "SLIM_INLINE_BYTES", 0)
    lines = []
    manifest = export.export_pipeline(sdfast.load(sd1.path), tmp_path, networks=("text_encoder",),
                                      log=lines.append)
    net = manifest["networks"]["text_encoder"]
    assert "stays on disk to bound memory" in net["slim"]["skipped"]
    assert net["slim"]["nodes_before"] == net["slim"]["nodes_after"]
    assert "onnxslim skipped: onnxslim needed a weight" in lines[0]
    assert max(net["check"]["rel_err"].values()) < TOLERANCE["fp32"]


def test_unchecked_export_says_so(sd1, tmp_path):
    """check_graphs=False: no check entry, and the log line says the graph was not checked; the peak memory of
    each network is recorded (Linux)."""
    lines = []
    manifest = export.export_pipeline(sdfast.load(sd1.path), tmp_path, networks=("vae_decoder",),
                                      check_graphs=False, log=lines.append)
    net = manifest["networks"]["vae_decoder"]
    assert net["check"] is None and net["check_s"] is None
    assert "not checked against torch" in lines[0] and "rel. error" not in lines[0]
    assert net["peak_rss_bytes"] is None or net["peak_rss_bytes"] > 2**20
    read_manifest(tmp_path)  # an unchecked folder is still a valid export


def test_no_check_flag(sd1, tmp_path, monkeypatch, capsys):
    """`sdfast export --no-check` hands check_graphs=False down and its last line names what is unchecked;
    without it the check runs."""
    calls = []

    def fake_export(pipe, folder, *, opset, check_graphs, log, controlnets):
        assert controlnets is None  # no --controlnet: no controlled U-Net either
        calls.append(check_graphs)
        check = {"rel_err": {"noise": 1e-6}} if check_graphs else None
        return {"networks": {"unet": {"check": check}, "vae_decoder": {"check": check and vae_check}}}

    monkeypatch.setattr(export, "export_pipeline", fake_export)
    vae_check = {"rel_err": {"image": 2e-6}}
    assert main(["export", str(sd1.path), "-o", str(tmp_path / "x"), "--no-check"]) == 0
    assert "not checked (--no-check): no graph was run against the torch model" in capsys.readouterr().out
    assert main(["export", str(sd1.path), "-o", str(tmp_path / "x")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("largest relative error on ONNX Runtime 2.0e-06")
    vae_check = {"skipped": "needs about 9 GiB"}
    assert main(["export", str(sd1.path), "-o", str(tmp_path / "x")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        "largest relative error on ONNX Runtime 1.0e-06; not checked for lack of memory: vae_decoder")
    assert calls == [False, True, True]


def test_a_check_that_would_not_fit_is_skipped_with_the_numbers(sd1, tmp_path, monkeypatch):
    """With less memory available than the check needs (CHECK_MEMORY x the graph + 1 GiB), the graph is written,
    its check is skipped, and the manifest and the log line say how much was needed and available."""
    monkeypatch.setattr("sdfast.export.check.available_memory", lambda: 2**29)
    lines = []
    manifest = export.export_pipeline(sdfast.load(sd1.path), tmp_path, networks=("vae_decoder",),
                                      log=lines.append)
    skipped = manifest["networks"]["vae_decoder"]["check"]["skipped"]
    assert "fp32 graph needs about 1.0 GiB more and 0.5 GiB is available; it was not run" in skipped
    assert f"check skipped: {skipped}" in lines[-1]
    assert (tmp_path / "vae_decoder.onnx").is_file()
    monkeypatch.setattr("sdfast.export.check.available_memory", lambda: 2 * 2**30)
    assert check_memory_problem(graphs.graph_specs(sdfast.load(sd1.path))[0], 2**20, tmp_path) is None


def _aliases(weights: list) -> list:
    """Tensors other than ``weights`` that share the memory of one of them."""
    import gc

    gc.collect()
    own, memory = {id(t) for t in weights}, {t.data_ptr() for t in weights if t.numel()}
    found = []
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and id(o) not in own and o.numel() and o.data_ptr() in memory:
                found.append(o)
        except RuntimeError:  # a tensor without storage (fake, meta)
            continue
    return found


def test_the_exporter_keeps_no_hold_on_the_weights(tmp_path):
    """Once a graph is written, nothing but the network holds its weights' memory, so parking them for the check
    frees it: onnxscript's rewriter keeps the last graph it matched, whose initializers alias the weights (the
    Linear ones) until the next export (SDXL fp32: 21.8 GiB resident after the U-Net's check, not 13.5)."""
    import itertools

    spec = _spec(sdfast.load(dtype="fp32"), "text_encoder")
    weights = list(itertools.chain(spec.module.parameters(), spec.module.buffers()))
    assert not _aliases(weights)
    export.to_onnx(spec, export.DEFAULT_OPSET, tmp_path / "text_encoder.onnx")
    assert not _aliases(weights)


def test_the_memory_estimate_counts_what_parking_frees(tmp_path, monkeypatch):
    """The network's weights in the process's own memory go to disk while ONNX Runtime runs, so they count against
    the check's need, when the disk has room for them."""
    import collections
    import types

    spec = types.SimpleNamespace(dtype=torch.float32, module=torch.nn.Linear(4096, 4096, bias=False))  # 64 MiB
    graph = 64 * 2**20
    monkeypatch.setattr("sdfast.export.check.available_memory", lambda: 2**30 + 48 * 2**20)
    assert check_memory_problem(spec, graph, tmp_path) is None  # 1.5 x 64 MiB - 64 MiB + 1 GiB
    full = collections.namedtuple("usage", "total used free")(2**40, 2**40, 0)
    monkeypatch.setattr("sdfast.export.check.shutil.disk_usage", lambda path: full)
    assert "needs about 1.1 GiB more" in check_memory_problem(spec, graph, tmp_path)


@pytest.mark.parametrize("force_upcast,expected", [(True, torch.float32), (False, torch.float16)])
def test_one_vae_dtype_rule_for_pipeline_and_export(sdxl, force_upcast, expected):
    """VAEConfig.compute_dtype decides both where the fp16 SDXL pipeline decodes and the VAE graphs' dtype."""
    pipe = sdfast.load(sdxl.path, dtype="fp16")
    pipe.vae.config = dataclasses.replace(pipe.vae.config, force_upcast=force_upcast)
    specs = {s.name: s for s in graphs.graph_specs(pipe)}
    assert pipe._vae_dtype == expected
    assert specs["vae_decoder"].dtype == specs["vae_encoder"].dtype == expected
    assert specs["vae_decoder"].inputs["latent"].dtype == expected
    assert specs["unet"].dtype == torch.float16
