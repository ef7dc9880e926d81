"""ONNX export (sdfast.export.onnx, .check, .manifest): every graph equals the torch model on ONNX Runtime's CPU
provider, its dynamic axes work, the manifest says what is in the folder, and onnxslim's changes are reported."""

import dataclasses
import json

import pytest
import torch

from conftest import rel_err

onnx = pytest.importorskip("onnx", reason='the onnx extra is not installed: pip install -e ".[onnx]"')

from sdfast.export import graphs  # noqa: E402
from sdfast.export import onnx as export  # noqa: E402
from sdfast.export.check import TOLERANCE, check  # noqa: E402
from sdfast.export.errors import ExportError  # noqa: E402
from sdfast.export.files import file_hash  # noqa: E402
from sdfast.export.manifest import FORMAT, read_manifest, weights_hash  # noqa: E402
from sdfast.export.session import ort_session  # noqa: E402
from sdfast.models.layers import GroupNorm  # noqa: E402

FP32_TOL = 1e-4


def test_every_network_matches_torch(sd1_onnx):
    """The export checks each graph against the torch model (batch 3, a 16x24 latent, two prompt chunks: none of
    them the export example's) and records the errors; all four are far inside 1e-4."""
    manifest = read_manifest(sd1_onnx.folder)
    assert sorted(manifest["networks"]) == sorted(graphs.pipeline_networks(sd1_onnx.torch))
    assert sorted(manifest["networks"]) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    for name, net in manifest["networks"].items():
        assert net["check"]["provider"] == "CPUExecutionProvider"
        assert net["check"]["tolerance"] == FP32_TOL
        assert all(err < FP32_TOL for err in net["check"]["rel_err"].values()), (name, net["check"])


@pytest.mark.parametrize("batch,latent,tokens", [(1, (8, 8), 77), (4, (12, 16), 231)])
def test_dynamic_axes(sd1_onnx, batch, latent, tokens):
    """Two batch sizes, two image sizes (one not square), two context lengths, on every graph."""
    specs = {spec.name: spec for spec in graphs.graph_specs(sd1_onnx.torch)}
    for name, spec in specs.items():
        inputs = spec.example(batch, latent, tokens, seed=batch)
        report = check(spec, sd1_onnx.folder / f"{name}.onnx", inputs)
        assert max(report["rel_err"].values()) < FP32_TOL, name


def test_manifest_describes_the_folder(sd1_onnx):
    folder, pipe = sd1_onnx.folder, sd1_onnx.torch
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["dtype"] == "fp32" and manifest["opset"] == 21
    assert manifest["model_hash"] == weights_hash(pipe)
    assert manifest["configs"]["unet"]["block_channels"] == list(pipe.unet.config.block_channels)
    assert manifest["configs"]["text_encoder"]["num_layers"] == pipe.text_encoder.config.num_layers
    assert set(manifest["tools"]) == {"sdfast", "torch", "onnx", "onnxscript", "onnxslim", "onnxruntime"}
    unet = manifest["networks"]["unet"]
    assert unet["inputs"] == [
        {"name": "sample", "shape": ["batch", 4, "height", "width"], "dtype": "float32"},
        {"name": "timestep", "shape": ["batch"], "dtype": "float32"},
        {"name": "context", "shape": ["batch", "tokens", 32], "dtype": "float32"}]
    assert unet["outputs"] == [{"name": "noise", "shape": ["batch", 4, "height", "width"], "dtype": "float32"}]
    te = manifest["networks"]["text_encoder"]
    assert te["inputs"] == [{"name": "input_ids", "shape": ["batch", 77], "dtype": "int64"}]
    assert [o["name"] for o in te["outputs"]] == ["hidden_states", "pooled"]
    assert te["outputs"][0]["shape"] == ["batch", 4, 77, 32]  # every layer, for any clip_skip
    assert [o["name"] for o in manifest["networks"]["vae_encoder"]["outputs"]] == ["mean", "logvar"]
    for net in manifest["networks"].values():
        assert net["sha256"] == file_hash(folder / net["file"]) and net["external_data"] is None
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((folder / manifest["scheduler_config"]).read_text()) == pipe.scheduler_config


def test_group_norm_is_one_node_and_onnxslim_is_reported(sd1_onnx):
    """Opset 21: every GroupNorm module is one GroupNormalization node. onnxslim's report adds up."""
    manifest = read_manifest(sd1_onnx.folder)
    for name, module in (("unet", sd1_onnx.torch.unet), ("vae_decoder", sd1_onnx.torch.vae.decoder)):
        ops = export.op_counts(onnx.load(str(sd1_onnx.folder / f"{name}.onnx")))
        assert ops["GroupNormalization"] == sum(isinstance(m, GroupNorm) for m in module.modules())
        assert ops["InstanceNormalization"] == 0
    for name, net in manifest["networks"].items():
        slim = net["slim"]
        assert slim["nodes_after"] <= slim["nodes_before"]
        assert slim["nodes_before"] - slim["nodes_after"] == sum(slim["removed"].values()) - sum(slim["added"].values())
    # the causal mask of CLIP's attention is constant: onnxslim folds its construction away
    assert manifest["networks"]["text_encoder"]["slim"]["removed"].get("Trilu", 0) > 0


def test_older_opset_and_external_data(sd1_onnx, tmp_path):
    """Opset 18 has no GroupNormalization: the exporter decomposes it (and the graph still matches). Weights past
    the threshold go to NAME.onnx.data, which ONNX Runtime reads and the file hash covers. The log line says what
    onnxslim removed."""
    lines = []
    manifest = export.export_pipeline(sd1_onnx.torch, tmp_path, opset=18, networks=("vae_decoder",),
                                      external_data_bytes=0, log=lines.append)
    net = manifest["networks"]["vae_decoder"]
    removed = ", ".join(f"{op} {n}" for op, n in sorted(net["slim"]["removed"].items(), key=lambda kv: -kv[1])[:4])
    assert len(lines) == 1 and f"nodes after onnxslim (removed {removed}" in lines[0], lines
    assert net["external_data"] == "vae_decoder.onnx.data" and (tmp_path / net["external_data"]).is_file()
    assert max(net["check"]["rel_err"].values()) < FP32_TOL
    ops = export.op_counts(onnx.load(str(tmp_path / "vae_decoder.onnx"), load_external_data=False))
    assert ops["GroupNormalization"] == 0 and ops["InstanceNormalization"] > 0
    before = file_hash(tmp_path / "vae_decoder.onnx")
    with open(tmp_path / "vae_decoder.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    assert file_hash(tmp_path / "vae_decoder.onnx") != before


def test_fp16_graphs(sd2_fp16_onnx):
    """fp16 graphs (written by `sdfast export --dtype fp16`) match the fp16 torch model within 1e-2; the timestep
    stays fp32 (its sinusoidal embedding is fp32 maths in the torch model too), the token ids int64."""
    manifest = read_manifest(sd2_fp16_onnx.folder)
    assert manifest["dtype"] == "fp16"
    for name, net in manifest["networks"].items():
        assert all(err < TOLERANCE["fp16"] for err in net["check"]["rel_err"].values()), name
    dtypes = {i["name"]: i["dtype"] for net in manifest["networks"].values() for i in net["inputs"]}
    assert dtypes == {"input_ids": "int64", "sample": "float16", "timestep": "float32", "context": "float16",
                      "latent": "float16", "image": "float16"}
    te = sd2_fp16_onnx.torch.text_encoder.config
    assert manifest["networks"]["text_encoder"]["outputs"][0]["shape"] == ["batch", te.num_layers, 77, 48]


def test_a_wrong_graph_is_caught(sd1_onnx):
    """The parity check fails loudly when the graph and the module disagree."""
    spec = next(s for s in graphs.graph_specs(sd1_onnx.torch) if s.name == "vae_decoder")
    spec.module = graphs.VAEDecoderGraph(type(sd1_onnx.torch.vae)(sd1_onnx.torch.vae.config))  # other weights
    with pytest.raises(ExportError, match=r"vae_decoder.onnx does not match the torch model"):
        check(spec, sd1_onnx.folder / "vae_decoder.onnx")


def test_bad_requests_are_clear_errors(sd1_onnx, tmp_path):
    pipe = sd1_onnx.torch
    with pytest.raises(ExportError, match="opset 17 is not supported"):
        export.export_pipeline(pipe, tmp_path, opset=17)
    with pytest.raises(ExportError, match=r"unknown network\(s\) \['clip'\]; this pipeline has text_enc"):
        export.export_pipeline(pipe, tmp_path, networks=("clip",))
    with pytest.raises(ExportError, match="supports fp32 and fp16, not torch.bfloat16"):
        export.export_pipeline(dataclasses.replace(pipe, dtype=torch.bfloat16), tmp_path)
    with pytest.raises(ExportError, match="has no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "sdfast-onnx/0"}))
    with pytest.raises(ExportError, match="format 'sdfast-onnx/0'"):
        read_manifest(tmp_path)


def test_graph_outputs_equal_the_torch_calls(sd1_onnx):
    """What the backends rely on: hidden_states[:, L - clip_skip] is the torch text encoder's output for that
    clip_skip, and vae_encoder's (mean, logvar) is the posterior that AutoencoderKL.encode samples."""
    pipe = sd1_onnx.torch
    session = ort_session(sd1_onnx.folder / "text_encoder.onnx")
    ids = pipe.tokenizer.encode(["a cat", "a dog on a hill"])[:, 0]
    states, pooled = session.run(None, {"input_ids": ids.numpy()})
    layers = pipe.text_encoder.config.num_layers
    for clip_skip in (1, 2, layers):
        hidden, ref_pooled = pipe.text_encoder(ids, clip_skip=clip_skip)
        assert rel_err(torch.from_numpy(states[:, layers - clip_skip]), hidden) < FP32_TOL
        assert rel_err(torch.from_numpy(pooled), ref_pooled) < FP32_TOL
