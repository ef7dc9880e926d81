"""What a benchmark run leaves behind: the JSON (its schema below), a markdown table, a PNG chart, and the
comparison of two runs that flags regressions.

The JSON is the record; the markdown and the chart are views of it, so both can be redrawn from a saved run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .run import BASELINE, COMPILED_BASELINE, SCHEMA_VERSION

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

_STATS = {
    "type": "object",
    "description": "milliseconds over the samples: median, nearest-rank p90 / p99, min, mean, sample count",
    "required": ["p50", "p90", "p99", "min", "mean", "n"],
    "properties": {**{k: {"type": "number", "minimum": 0} for k in ("p50", "p90", "p99", "min", "mean")},
                   "n": {"type": "integer", "minimum": 1}},
}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_SPEEDUP = {"type": "object", "required": ["step", "end_to_end"],
            "properties": {"step": {"type": "number"}, "end_to_end": {"type": "number"}}}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sdfast bench report",
    "type": "object",
    "required": ["schema_version", "created", "model", "settings", "environment", "peak", "rows"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "created": {"type": "string", "description": "UTC time the run ended, ISO 8601"},
        "complete": {"type": "boolean", "description": "false while a run is still going (rows so far)"},
        "command": {"type": ["string", "null"], "description": "the command line that made it"},
        "model": {"type": "object", "required": ["path", "label"],
                  "properties": {"path": {"type": "string"}, "label": {"type": "string"}}},
        "settings": {
            "type": "object", "description": "what was run: sdfast.bench.run.Settings, sizes as WxH",
            "required": ["backends", "sizes", "batches", "steps", "scheduler", "dtype", "device", "warmup", "repeat",
                         "baseline", "prompt", "guidance_scale", "seed"],
        },
        "environment": {
            "type": "object", "description": "sdfast.bench.env.environment(): device, GPU, driver, CUDA, versions",
            "required": ["device", "gpu", "driver", "cuda", "cpu", "python", "versions"],
            "properties": {"versions": {"type": "object", "additionalProperties": {"type": ["string", "null"]}}},
        },
        "peak": {
            "description": "the device's dense fp16/bf16 tensor peak and its source; null on a CPU, in fp32, or for "
                           "a GPU sdfast.bench.env.PEAKS does not list",
            "oneOf": [{"type": "null"},
                      {"type": "object", "required": ["tflops", "source"],
                       "properties": {"tflops": {"type": "number"}, "source": {"type": "string"}}}],
        },
        "rows": {"type": "array", "items": {"$ref": "#/$defs/row"}},
    },
    "$defs": {
        "row": {
            "type": "object",
            "description": "one configuration: a backend (or the diffusers baseline) at one size and batch",
            "required": ["backend", "width", "height", "batch", "status", "reason"],
            "properties": {
                "backend": {"type": "string"},
                "width": {"type": "integer"}, "height": {"type": "integer"}, "batch": {"type": "integer"},
                "status": {"enum": ["ok", "skipped", "failed"]},
                "reason": {"type": ["string", "null"], "description": "why it was skipped or failed"},
                "load_s": {"type": "number", "description": "first-run cost: load, export or engine build"},
                "first_call_ms": {"type": "number", "description": "first generation at this shape, wall clock "
                                                                   "(compilation, autotuning, allocator growth)"},
                "latency_ms": {
                    "type": "object",
                    "required": ["text_encoder", "unet", "scheduler", "step", "vae_decode", "end_to_end"],
                    "properties": {
                        "text_encoder": _STATS, "vae_decode": _STATS,
                        "unet": {**_STATS, "description": "one guided U-Net call, every step of every repeat"},
                        "scheduler": {**_STATS, "description": "the scheduler update (+ guidance for diffusers)"},
                        "step": {**_STATS, "description": "a whole denoising step, host gaps included"},
                        "end_to_end": {**_STATS, "description": "prompt in, PIL images out, wall clock"},
                    },
                },
                "images_per_s": {"type": "number"},
                "memory_mb": {"type": "object", "required": ["torch_peak", "device_used", "process_peak_rss"],
                              "properties": {"torch_peak": _NUMBER_OR_NULL, "device_used": _NUMBER_OR_NULL,
                                             "process_peak_rss": {"type": "number"}}},
                "unet_flops": {"type": "integer", "description": "FLOPs of one guided U-Net call, from its shapes"},
                "unet_tflops": {"type": "number", "description": "unet_flops / median U-Net call"},
                "fraction_of_peak": _NUMBER_OR_NULL,
                "speedup": {"description": "diffusers eager p50 / this row's p50 (> 1: faster); null without it",
                            "oneOf": [{"type": "null"}, _SPEEDUP]},
                "speedup_compiled": {"description": "diffusers-compile p50 / this row's p50; null without it",
                                     "oneOf": [{"type": "null"}, _SPEEDUP]},
                "lora_swap": {"type": "object", "required": ["rank"],
                              "description": "sdfast.bench.swap.measure_swap on this backend (--lora-rank): ms to "
                                             "add a random LoRA, switch it on / off, rescale it"},
            },
            "if": {"properties": {"status": {"const": "ok"}}},
            "then": {"required": ["load_s", "first_call_ms", "latency_ms", "images_per_s", "memory_mb", "unet_flops",
                                  "unet_tflops", "fraction_of_peak", "speedup"]},
        },
    },
}


def read(path: str | Path) -> dict:
    """A saved report, with a clear error for anything that is not one of this schema version."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read benchmark report {path}: {e}") from e
    if not isinstance(report, dict) or "rows" not in report:
        raise ValueError(f"{path} is not an sdfast bench report (no 'rows'): write one with `sdfast bench --out`")
    if report.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema version {report.get('schema_version')!r}; this sdfast reads "
                         f"{SCHEMA_VERSION}: re-run the benchmark with this version")
    return report


# -- markdown --

def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _cells(row: dict) -> dict[str, str]:
    """One column of a module | latency table: each module's figure for this row."""
    if row["status"] != "ok":
        return {}
    lat = row["latency_ms"]
    mem = row["memory_mb"]
    peak = "" if row["fraction_of_peak"] is None else f" ({row['fraction_of_peak']:.0%})"
    memory = (f"{mem['process_peak_rss']:.0f} (process)" if mem["torch_peak"] is None else  # a CPU run
              f"{mem['torch_peak']:.0f} (device {mem['device_used']:.0f})")  # ORT / TensorRT: only the device's
    speedup, compiled = row["speedup"], row.get("speedup_compiled")
    return {
        "text encoder": _ms(lat["text_encoder"]["p50"]),
        "U-Net call p50": _ms(lat["unet"]["p50"]),
        "U-Net call p90 / p99 / min": " / ".join(_ms(lat["unet"][k]) for k in ("p90", "p99", "min")),
        "scheduler": _ms(lat["scheduler"]["p50"]),
        "denoising step p50": _ms(lat["step"]["p50"]),
        "VAE decode": _ms(lat["vae_decode"]["p50"]),
        "end to end": _ms(lat["end_to_end"]["p50"]),
        "images/s": f"{row['images_per_s']:.3g}",
        "U-Net TFLOP/s (of peak)": f"{row['unet_tflops']:.3g}{peak}",
        "peak memory, MiB": memory,
        "load, s / first call, ms": f"{row['load_s']:.1f} / {_ms(row['first_call_ms'])}",
        "speed-up: step / end to end": "" if speedup is None else
        f"{speedup['step']:.2f}x / {speedup['end_to_end']:.2f}x",
        "speed-up over diffusers-compile": "" if compiled is None else
        f"{compiled['step']:.2f}x / {compiled['end_to_end']:.2f}x",
    }


def markdown(report: dict) -> str:
    """Per size and batch, a module | latency table with one column per backend (milliseconds, medians unless
    said), the environment above, and every skipped or failed configuration with its reason below."""
    env, s = report["environment"], report["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    peak = report["peak"]
    lines = [
        f"# sdfast bench: {report['model']['label']} on {env['gpu'] or env['cpu']}",
        "",
        f"{s['steps']} steps of {s['scheduler']}, {s['dtype']}, guidance {s['guidance_scale']}, {s['warmup']} warm-up "
        f"and {s['repeat']} timed generations per configuration; {report['created']}."
        + (" Every row runs one ControlNet (diffusers: its ControlNet pipeline); sdfast's U-Net call includes it, "
           "diffusers' does not: compare the denoising step." if s.get("controlnet") else ""),
        f"Device: {env['device']}" + (f", driver {env['driver']}, CUDA {env['cuda']}" if env["gpu"] else "")
        + f". {versions}.",
        "U-Net FLOPs are counted from its shapes (convolutions and matrix products, attention included); peak: "
        + (f"{peak['tflops']} TFLOP/s dense fp16 ({peak['source']})." if peak else "none for this device/dtype."),
        "",
    ]
    rows = report["rows"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for key in dict.fromkeys((r["width"], r["height"], r["batch"]) for r in rows):
        group = {r["backend"]: _cells(r) for r in rows if (r["width"], r["height"], r["batch"]) == key}
        shown = [b for b in backends if group.get(b)]
        if not shown:
            continue
        lines += [f"## {key[0]}x{key[1]}, batch {key[2]}", "",
                  "| module, ms | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for module in group[shown[0]]:
            lines.append(f"| {module} | " + " | ".join(group[b][module] for b in shown) + " |")
        lines.append("")
    swaps = {r["backend"]: r["lora_swap"] for r in rows if "lora_swap" in r}
    if swaps:
        lines += ["## LoRA swap (random LoRA, medians)", "",
                  "| backend | rank | modules | add, ms | on, ms | off, ms | rescale, ms |", "|---" * 7 + "|"]
        for backend, sw in swaps.items():
            if "reason" in sw:
                lines.append(f"| {backend} | {sw['rank']} | {sw['reason'].replace('|', '/')} | | | | |")
            else:
                lines.append(f"| {backend} | {sw['rank']} | {sw['modules']} | " + " | ".join(
                    _ms(sw[k]) for k in ("add_ms", "on_ms", "off_ms", "rescale_ms")) + " |")
        lines.append("")
    missing = [r for r in rows if r["status"] != "ok"]
    if missing:
        lines += ["## Not run", "", "| backend | size | batch | status | reason |", "|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['width']}x{r['height']} | {r['batch']} | {r['status']} | "
                  f"{r['reason'].replace('|', '/')} |" for r in missing]
        lines.append("")
    return "\n".join(lines)


# -- the chart --

def chart(report: dict, path: str | Path) -> Path:
    """A PNG bar chart of the median U-Net call by backend, grouped by size and batch."""
    if not HAS_MATPLOTLIB:
        raise ValueError('the chart needs matplotlib: pip install "sdfast[bench]" (or pass --no-chart)')
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    ok = [r for r in report["rows"] if r["status"] == "ok"]
    groups = list(dict.fromkeys((r["width"], r["height"], r["batch"]) for r in ok))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(len(backends), 1) ** 0.5), 4.0))
    for i, backend in enumerate(backends):
        values = {(r["width"], r["height"], r["batch"]): r["latency_ms"]["unet"]["p50"] for r in ok
                  if r["backend"] == backend}
        xs = [g + (i - (len(backends) - 1) / 2) * width for g, key in enumerate(groups) if key in values]
        heights = [values[key] for key in groups if key in values]
        bars = ax.bar(xs, heights, width, label=backend,
                      hatch="//" if backend in (BASELINE, COMPILED_BASELINE) else None)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{w}x{h}\nbatch {b}" for w, h, b in groups])
    ax.set_ylabel("U-Net call, median ms (lower is better)")
    env, s = report["environment"], report["settings"]
    ax.set_title(f"{report['model']['label']}, {s['dtype']}, {env['gpu'] or env['cpu']}", fontsize=10)
    ax.margins(y=0.25)  # headroom for the legend above the tallest bar
    ax.legend(fontsize=8, loc="upper left", ncols=min(len(backends), 4))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- comparing two runs --

COMPARED = ("unet", "step", "text_encoder", "vae_decode", "end_to_end")  # medians, new / old
GATED = ("step", "end_to_end")  # the figures that count as a regression; the others are shown only


def compare(old: dict, new: dict, threshold: float = 0.05) -> tuple[str, list[str]]:
    """Ratios new / old of every configuration in both runs (> 1: slower), as a markdown table, and the
    regressions: a median step or end-to-end time slower by more than ``threshold``, or a configuration that ran
    in the old run and does not in the new one."""
    before = {(r["backend"], r["width"], r["height"], r["batch"]): r for r in old["rows"]}
    lines = [f"ratios new / old of the medians (> 1 is slower); a regression is {' or '.join(GATED)} slower by "
             f"more than {threshold:.0%}", ""]
    for field, label in (("gpu", "GPU"), ("device", "device")):
        if old["environment"][field] != new["environment"][field]:
            lines += [f"note: the runs are on different hardware ({label} {old['environment'][field]} vs "
                      f"{new['environment'][field]}): ratios compare machines, not code", ""]
    lines += ["| backend | size | batch | " + " | ".join(COMPARED) + " | verdict |", "|---" * (len(COMPARED) + 4) + "|"]
    regressions = []
    for r in new["rows"]:
        key = (r["backend"], r["width"], r["height"], r["batch"])
        name = f"{r['backend']} {r['width']}x{r['height']} batch {r['batch']}"
        o = before.get(key)
        if o is None or o["status"] != "ok":
            continue
        if r["status"] != "ok":
            regressions.append(f"{name}: ran before, now {r['status']} ({r['reason']})")
            lines.append(f"| {r['backend']} | {r['width']}x{r['height']} | {r['batch']} | "
                         + " | ".join("" for _ in COMPARED) + f" | REGRESSION: {r['status']} |")
            continue
        ratios = {k: r["latency_ms"][k]["p50"] / o["latency_ms"][k]["p50"] for k in COMPARED}
        slower = [f"{k} +{ratios[k] - 1:.0%}" for k in GATED if ratios[k] > 1 + threshold]
        if slower:
            regressions.append(f"{name}: {', '.join(slower)}")
        lines.append(f"| {r['backend']} | {r['width']}x{r['height']} | {r['batch']} | "
                     + " | ".join(f"{ratios[k]:.3f}" for k in COMPARED)
                     + f" | {'REGRESSION: ' + ', '.join(slower) if slower else 'ok'} |")
    lost = [k for k, o in before.items() if o["status"] == "ok"
            and k not in {(r["backend"], r["width"], r["height"], r["batch"]) for r in new["rows"]}]
    if lost:  # a configuration that stopped being measured must not pass the gate unnoticed
        names = [f"{b} {w}x{h} batch {n}" for b, w, h, n in lost]
        lines += ["", "REGRESSION: ran in the old run, missing from the new one: " + ", ".join(names)]
        regressions += [f"{name}: ran before, missing from the new run" for name in names]
    return "\n".join(lines), regressions
