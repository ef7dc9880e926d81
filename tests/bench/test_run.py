"""`sdfast bench` on the tiny sd1 model on the CPU: the report follows its schema, the baseline and speed-ups are
there, backends that cannot run are skipped with their reason, the views are written, compare flags regressions.
Timings themselves are never asserted (this is a CPU shared with other jobs); their relations are."""

import copy
import json

import jsonschema
import pytest
import torch

from sdfast.bench import report
from sdfast.bench.arch import preset
from sdfast.bench.env import Peak, device_peak
from sdfast.bench.flops import unet_flops
from sdfast.bench.run import Settings, add_speedups, parse_backend, run
from sdfast.cli import main
from sdfast.models import UNetConfig

SETTINGS = Settings(backends=("torch", "tensorrt", "no-such-backend"), batches=(1, 2), steps=3, device="cpu",
                    dtype="fp32", warmup=1, repeat=2, lora_rank=4)
PEAK = Peak("test", 0.5, "a made-up peak, to check the fraction")


@pytest.fixture(scope="module")
def result(sd1):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sdfast.bench.run.device_peak", lambda gpu, dtype: PEAK)
        return run(sd1.path, SETTINGS, progress=False)


def _row(result, backend, batch=1):
    return next(r for r in result["rows"] if r["backend"] == backend and r["batch"] == batch)


def test_report_matches_its_schema(result):
    jsonschema.validate(result, report.SCHEMA)
    json.dumps(result)  # JSON-ready as is
    assert [(r["backend"], r["batch"]) for r in result["rows"]] == [
        (b, n) for b in ("diffusers", "torch", "tensorrt", "no-such-backend") for n in (1, 2)]
    assert result["settings"]["sizes"] == ["64x64"]  # the model's own size: sample_size 8 x the VAE's 8


def test_rows_hold_consistent_measurements(result, sd1):
    config = UNetConfig.from_diffusers(json.loads((sd1.path / "unet" / "config.json").read_text()))
    for backend in ("diffusers", "torch"):
        for batch in (1, 2):
            row = _row(result, backend, batch)
            assert row["status"] == "ok", row["reason"]
            lat = row["latency_ms"]
            assert lat["unet"]["n"] == lat["step"]["n"] == SETTINGS.steps * SETTINGS.repeat
            assert lat["text_encoder"]["n"] == lat["end_to_end"]["n"] == SETTINGS.repeat
            for stats in lat.values():
                assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"]
            assert lat["step"]["p50"] >= lat["unet"]["p50"]  # every step holds its U-Net call
            assert lat["end_to_end"]["min"] > lat["vae_decode"]["min"]
            assert row["images_per_s"] == pytest.approx(batch / lat["end_to_end"]["p50"] * 1e3)
            assert row["unet_flops"] == unet_flops(config, 2 * batch, 8, 8)  # guided: U-Net batch 2 x images
            assert row["unet_tflops"] == pytest.approx(row["unet_flops"] / lat["unet"]["p50"] / 1e9)
            assert row["fraction_of_peak"] == pytest.approx(row["unet_tflops"] / PEAK.tflops)
            base = _row(result, "diffusers", batch)["latency_ms"]
            assert row["speedup"] == pytest.approx({k: base[k]["p50"] / lat[k]["p50"] for k in ("step", "end_to_end")})


def test_lora_swap_is_timed_per_loaded_backend(result, sd1):
    """--lora-rank: each backend that loaded times a random LoRA of that rank; the pipeline is left without it."""
    rows = [r for r in result["rows"] if r["backend"] == "torch"]
    swap = rows[0]["lora_swap"]
    assert all(r["lora_swap"] == swap for r in rows)
    assert swap["rank"] == 4 and swap["modules"] > 0 and swap["lora_mb"] > 0
    assert all(swap[k] > 0 for k in ("add_ms", "on_ms", "off_ms", "rescale_ms"))
    assert not any("lora_swap" in r for r in result["rows"] if r["backend"] in ("diffusers", "tensorrt"))
    assert "## LoRA swap" in report.markdown(result)


def test_backends_that_cannot_run_are_skipped_with_the_reason(result):
    for batch in (1, 2):
        trt = _row(result, "tensorrt", batch)
        assert trt["status"] == "skipped" and "CUDA GPU" in trt["reason"]
        unknown = _row(result, "no-such-backend", batch)
        assert unknown["status"] == "skipped" and "unknown backend 'no-such-backend'" in unknown["reason"]


def test_markdown_is_a_module_latency_table_per_configuration(result):
    text = report.markdown(result)
    assert "## 64x64, batch 1" in text and "## 64x64, batch 2" in text
    assert "| module, ms | diffusers | torch |" in text
    for module in ("text encoder", "U-Net call p50", "denoising step p50", "VAE decode", "end to end", "images/s",
                   "U-Net TFLOP/s (of peak)", "speed-up: step / end to end"):
        assert f"| {module} |" in text
    assert "| tensorrt | 64x64 | 1 | skipped | ValueError: the tensorrt backend runs on a CUDA GPU" in text
    assert f"{PEAK.tflops} TFLOP/s dense fp16 ({PEAK.source})" in text


def test_chart_is_a_png(result, tmp_path):
    """A real picture: a PNG of the figure's size, with the bars drawn (more than a blank canvas's colours)."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    path = report.chart(result, tmp_path / "chart.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height == 480  # 4 in at 120 dpi
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 10


def _slower(result, backend, factor):
    new = copy.deepcopy(result)
    for row in new["rows"]:
        if row["backend"] == backend:
            for stats in row["latency_ms"].values():
                stats.update({k: v * factor for k, v in stats.items() if k != "n"})
    return new


def test_compare_flags_a_regression_over_the_threshold(result):
    table, regressions = report.compare(result, result)
    assert regressions == [] and table.count("| ok |") == 4
    table, regressions = report.compare(result, _slower(result, "torch", 1.5), threshold=0.1)
    assert regressions == ["torch 64x64 batch 1: step +50%, end_to_end +50%",
                           "torch 64x64 batch 2: step +50%, end_to_end +50%"]
    assert "| torch | 64x64 | 1 | 1.500 | 1.500 | 1.500 | 1.500 | 1.500 | REGRESSION" in table
    assert report.compare(result, _slower(result, "torch", 1.05), threshold=0.1)[1] == []  # within the threshold
    failed = copy.deepcopy(result)
    _row(failed, "torch")["status"], _row(failed, "torch")["reason"] = "failed", "RuntimeError: out of memory"
    assert report.compare(result, failed)[1] == ["torch 64x64 batch 1: ran before, now failed "
                                                 "(RuntimeError: out of memory)"]
    dropped = copy.deepcopy(result)
    dropped["rows"].remove(_row(dropped, "torch"))
    assert report.compare(result, dropped)[1] == ["torch 64x64 batch 1: ran before, missing from the new run"]


def test_cli_writes_the_reports_and_compare_exits_1_on_regression(sd1, tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["bench", "--model", str(sd1.path), "--backends", "torch", "--steps", "2", "--repeat", "1",
                 "--scheduler", "heun", "--device", "cpu", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    jsonschema.validate(saved, report.SCHEMA)
    assert saved["command"].startswith(f"sdfast bench --model {sd1.path} --backends torch")
    assert (tmp_path / "run.md").read_text() == report.markdown(saved)
    assert (tmp_path / "run.png").is_file() == report.HAS_MATPLOTLIB
    for backend in ("diffusers", "torch"):  # both ran Heun: 2 steps are 3 U-Net calls
        assert _row(saved, backend)["latency_ms"]["unet"]["n"] == 3
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(_slower(saved, "torch", 2.0)))
    capsys.readouterr()
    assert main(["bench", "--compare", str(out), str(out)]) == 0
    assert "no regression" in capsys.readouterr().out
    assert main(["bench", "--compare", str(out), str(slow)]) == 1
    assert "regression: torch 64x64 batch 1: step +100%, end_to_end +100%" in capsys.readouterr().out


def test_sdxl_bench_runs_beside_diffusers_sdxl_pipeline(tmp_path, monkeypatch):
    """`sdfast bench --arch tiny-sdxl`: the baseline is StableDiffusionXLPipeline (StableDiffusionPipeline cannot
    run the U-Net without its added conditioning), both rows measure every step, and the FLOPs include the added
    embedding."""
    monkeypatch.setenv("SDFAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "xl.json"
    assert main(["bench", "--arch", "tiny-sdxl", "--backends", "torch", "--steps", "2", "--warmup", "0",
                 "--repeat", "1", "--device", "cpu", "--no-chart", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    jsonschema.validate(saved, report.SCHEMA)
    assert saved["settings"]["sizes"] == ["64x64"] and saved["model"]["label"] == "tiny-sdxl (random weights)"
    for backend in ("diffusers", "torch"):
        row = _row(saved, backend)
        assert row["status"] == "ok", row["reason"]
        assert row["latency_ms"]["unet"]["n"] == 2 and row["latency_ms"]["text_encoder"]["p50"] > 0
        assert row["unet_flops"] == unet_flops(preset("tiny-sdxl").unet, 2, 8, 8)


def test_options_baselines_and_rows_saved_as_they_finish(sd1):
    """Backend options in the spec reach the backend and label the row; the compiled baseline (traced only here)
    gives every row a second speed-up; the report is handed over after each backend, valid at every point."""
    settings = Settings(backends=("triton:kernels=off:cuda_graph=off", "compile"), compiled_baseline=True,
                        compiler="eager", compile_mode="reduce-overhead", steps=1, warmup=0, repeat=1,
                        device="cpu", dtype="fp32", peak="0.5")
    saved = []
    final = run(sd1.path, settings, progress=False, on_rows=lambda r: saved.append(copy.deepcopy(r)))
    assert [[row["backend"] for row in r["rows"]] for r in saved] == [
        ["diffusers"], ["diffusers", "diffusers-compile"], ["diffusers", "diffusers-compile",
                                                            "triton:kernels=off:cuda_graph=off"]]
    for partial in saved:
        jsonschema.validate(partial, report.SCHEMA)
        assert partial["complete"] is False
    jsonschema.validate(final, report.SCHEMA)
    assert final["complete"] is True and len(final["rows"]) == 4
    assert all(row["status"] == "ok" for row in final["rows"]), [row["reason"] for row in final["rows"]]
    assert final["peak"] == {"tflops": 0.5, "source": "measured earlier in this run (0.5 TFLOP/s, given as --peak)"}
    compiled = _row(final, "diffusers-compile")["latency_ms"]
    for row in final["rows"]:
        assert row["speedup_compiled"] == pytest.approx(
            {k: compiled[k]["p50"] / row["latency_ms"][k]["p50"] for k in ("step", "end_to_end")})
        assert row["fraction_of_peak"] == pytest.approx(row["unet_tflops"] / 0.5)
    assert "| speed-up over diffusers-compile |" in report.markdown(final)


def test_speedups_need_their_baseline_at_the_same_shape():
    def row(backend, step, batch=1, status="ok"):
        stats = {"p50": step}
        return {"backend": backend, "width": 64, "height": 64, "batch": batch, "status": status,
                "unet_tflops": 1.0, "latency_ms": {"step": stats, "end_to_end": {"p50": 10 * step}}}

    rows = [row("diffusers", 4.0), row("diffusers-compile", 2.0), row("triton", 1.0), row("triton", 1.0, batch=4),
            row("torch", 3.0, status="failed")]
    add_speedups(rows, Peak("gpu", 2.0, "test"))
    assert rows[2]["speedup"] == {"step": 4.0, "end_to_end": 4.0}
    assert rows[2]["speedup_compiled"] == {"step": 2.0, "end_to_end": 2.0}
    assert rows[2]["fraction_of_peak"] == 0.5
    assert rows[3]["speedup"] is None and rows[3]["speedup_compiled"] is None  # no baseline at batch 4
    assert "speedup" not in rows[4]  # a failed row has no figures


def test_backend_specs():
    assert parse_backend("torch") == ("torch", {})
    assert parse_backend("triton:kernels=off:autotune=full:cuda_graph=true") == (
        "triton", {"kernels": False, "autotune": "full", "cuda_graph": True})
    assert parse_backend("compile:mode=reduce-overhead") == ("compile", {"mode": "reduce-overhead"})


@pytest.mark.parametrize("args, message", [
    (["--backends", "triton:kernels"], "options are written NAME:OPTION=VALUE (e.g. triton:kernels=off), not 'kernels'"),
    (["--backends", "diffusers-compile"], "--compiled-baseline adds diffusers-compile"),
    (["--compile-mode", "fast"], "compile mode 'fast': choose one of default, reduce-overhead"),
    (["--peak", "-3"], "peak '-3': use datasheet, measure, or a positive number of TFLOP/s"),
    (["--peak", "inf"], "peak 'inf'"),
    (["--sizes", "500"], "size 500x500 is not a positive multiple of 8"),
    (["--sizes", "big"], "--sizes 'big'"),
    (["--steps", "0"], "need steps >= 1"),
    (["--backends", "torch,torch"], "name each once"),
    (["--scheduler", "nope"], "unknown scheduler 'nope'"),
    (["--arch", "sd3"], "unknown --arch 'sd3'"),
    (["--compare", "missing.json", "missing.json"], "cannot read benchmark report missing.json"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["bench", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_device_peaks():
    assert device_peak("NVIDIA H100 80GB HBM3", torch.float16).tflops == 989.4
    assert device_peak("NVIDIA H100 PCIe", torch.bfloat16).tflops == 756.5
    assert device_peak("NVIDIA H100 80GB HBM3", torch.float32) is None  # no fp16 tensor peak
    assert device_peak("NVIDIA L40S", torch.float16).tflops == 362.05
    assert device_peak(None, torch.float16) is None  # a CPU


def test_controlnet_rows_run_it_on_both_sides(sd1, monkeypatch):
    """--controlnet: the baseline runs diffusers' ControlNet pipeline and sdfast its ControlNet, on every step;
    the markdown says to compare steps (sdfast's U-Net call holds the ControlNet, diffusers' does not)."""
    from diffusers import ControlNetModel

    from sdfast.models.controlnet import ControlNet

    calls = {"diffusers": 0, "sdfast": 0}
    for cls, side in ((ControlNetModel, "diffusers"), (ControlNet, "sdfast")):
        def counted(self, *args, _forward=cls.forward, _side=side, **kwargs):
            calls[_side] += 1
            return _forward(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", counted)
    settings = Settings(backends=("torch",), steps=2, device="cpu", dtype="fp32", warmup=0, repeat=1,
                        controlnet=True)
    result = run(sd1.path, settings, progress=False)
    jsonschema.validate(result, report.SCHEMA)
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"]
    assert calls == {"diffusers": 2, "sdfast": 2}  # one per step (guided: one call on the doubled batch)
    assert "Every row runs one ControlNet" in report.markdown(result)
