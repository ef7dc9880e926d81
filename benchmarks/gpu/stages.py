"""The stages of ``benchmarks/gpu/run.sh``: each one a separate process, each leaving its results under ``$OUT``
as soon as it ends, so a hang or a crash costs that stage alone.

    python benchmarks/gpu/stages.py STAGE --out DIR [options]

| stage | writes |
|---|---|
| ``env`` | ``gpu-run.json``: GPU, clocks, versions, the measured bf16 / fp16 matmul rate and copy bandwidth |
| ``models`` | the random-weight models at the released shapes (``$SDFAST_CACHE/random``) |
| ``tests`` | ``gpu-run.json`` ``tests``: pytest's counts and every failure's first line |
| ``bench`` | one row (a backend, or a diffusers baseline) appended to ``REPORT.json``, an ``sdfast bench`` report; a
  triton row also merges the kernels' autotune winners into ``autotune.json`` |
| ``kernels`` | ``gpu-run.json`` ``kernels``: the microbenchmarks' medians and rates, kernel / best torch op |
| ``record`` | ``gpu-run.json`` ``stages``: a stage's status, time and limit (called by run.sh after each) |
| ``summary`` | ``gpu-run.md`` and ``gpu-run.png``, and the short table on stdout |
| ``check`` | nothing: fails unless every stage passed, the reports match their schema and ``$OUT`` is what the device
  tool returns (at most 8 plain files); the rehearsal's verdict |

Only the standard library is imported at the top: ``record`` must start in milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

RUN = "gpu-run.json"  # env, stages, tests, kernels
AUTOTUNE = "autotune.json"  # the Triton kernels' winners, as kernels/tuned/sm_XY.json keeps them
MAX_FILES = 8  # what the device tool brings back from $OUT


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, data: dict) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    _files().write_atomically(path, json.dumps(data, indent=1))


@functools.cache
def _files():
    """sdfast/files.py (sdfast's one atomic write), loaded from its file: importing it through the sdfast package
    would import torch, and cost ``record`` seconds."""
    spec = importlib.util.spec_from_file_location("sdfast_files", Path(__file__).parents[2] / "sdfast" / "files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _update(out: Path, key: str, value) -> None:
    run = _read(out / RUN)
    run[key] = value
    _write(out / RUN, run)


# -- env --


def env(args) -> None:
    import torch

    from sdfast.bench.env import clocks, environment, measure_copy, measure_matmul

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, gib = (8192, 2.0) if device.type == "cuda" else (256, 0.01)  # the rehearsal only exercises the code
    measured = {"matmul_bf16": measure_matmul(device, torch.bfloat16, n=n),
                "matmul_fp16": measure_matmul(device, torch.float16, n=n),
                "copy": measure_copy(device, gib=gib)}
    _update(args.out, "env", {**environment(device), "clocks": clocks(), "measured": measured})
    print(json.dumps(measured, indent=1))


# -- models --


def models(args) -> None:
    from sdfast.backends import cache_dir
    from sdfast.bench.arch import random_model

    for arch in args.arch:
        print(random_model(arch, cache_dir() / "random"))


# -- tests --


def _junit(path: Path) -> dict:
    """pytest's counts and the failures (test id and the message's first line) from a JUnit XML file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        counts[{"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]] += 1
        if outcome.tag != "skipped":
            message = (outcome.get("message") or outcome.text or "").strip().splitlines()
            failures.append(f"{case.get('classname')}::{case.get('name')}: {message[0] if message else ''}")
    return {**counts, "failures": failures}


def tests(args) -> int:
    xml = args.work / f"junit-{args.label}.xml"
    # a hung test fails alone (pytest-timeout, on the GPU image) instead of costing the stage its report
    timeout = ["--timeout=60"] if importlib.util.find_spec("pytest_timeout") else []
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                          *timeout, *args.pytest])
    found = _junit(xml) if xml.is_file() else {"failures": [f"pytest exited {rc} before writing its report"]}
    run = _read(args.out / RUN)
    run.setdefault("tests", {})[args.label] = {"command": "pytest " + " ".join(args.pytest), "exit": rc, **found}
    _write(args.out / RUN, run)
    print(json.dumps(run["tests"][args.label], indent=1))
    return 0 if rc in (0, 5) else rc  # 5: nothing collected (e.g. no gpu-marked test selected)


# -- bench --


def _merge(path: Path, part: dict) -> dict:
    """``part``'s rows added to the report at ``path`` (replacing rows of the same backend, size and batch), the
    speed-ups over both baselines recomputed across all rows."""
    from sdfast.bench.env import Peak
    from sdfast.bench.run import BASELINE, COMPILED_BASELINE, add_speedups

    report = _read(path) or {**part, "rows": []}
    fresh = {(r["backend"], r["width"], r["height"], r["batch"]) for r in part["rows"]}
    rows = [r for r in report["rows"] if (r["backend"], r["width"], r["height"], r["batch"]) not in fresh]
    rows += part["rows"]
    peak = report["peak"] and Peak("", report["peak"]["tflops"], report["peak"]["source"])
    add_speedups(rows, peak)
    names = list(dict.fromkeys(r["backend"] for r in rows))
    report["settings"].update(backends=[b for b in names if b not in (BASELINE, COMPILED_BASELINE)],
                              baseline=BASELINE in names, compiled_baseline=COMPILED_BASELINE in names,
                              batches=sorted({r["batch"] for r in rows}),
                              compile_mode=report["settings"]["compile_mode"] or part["settings"]["compile_mode"])
    report.update(rows=rows, created=part["created"], complete=True)
    return report


def bench(args) -> int:
    from sdfast.backends import cache_dir
    from sdfast.bench.arch import random_model
    from sdfast.bench.run import Settings, parse_backend, run

    settings = Settings(
        backends=(args.backend,) if args.backend else (), baseline=args.baseline,
        compiled_baseline=args.compiled_baseline, sizes=((args.size, args.size),), batches=(args.batch,),
        steps=args.steps, dtype=args.dtype, device=args.device, warmup=args.warmup, repeat=args.repeat,
        compile_mode=args.compile_mode, compiler=args.compiler, peak=args.peak or "datasheet",
        lora_rank=args.lora_rank, controlnet=args.controlnet)
    model = random_model(args.arch, cache_dir() / "random")
    part = run(model, settings, label=f"{args.arch} (random weights)", progress=False,
               command=" ".join(["benchmarks/gpu/stages.py", *sys.argv[1:]]))
    path = args.out / f"{args.report}.json"
    _write(path, _merge(path, part))
    for row in part["rows"]:
        print(f"{row['backend']} {row['width']}x{row['height']} batch {row['batch']}: {row['status']}"
              + (f" ({row['reason']})" if row["reason"] else
                 f", U-Net {row['latency_ms']['unet']['p50']:.2f} ms, end to end "
                 f"{row['latency_ms']['end_to_end']['p50']:.0f} ms"))
    if args.backend and parse_backend(args.backend)[0] == "triton" and parse_backend(args.backend)[1].get(
            "kernels", True):
        _save_autotune(args.out / AUTOTUNE)
    return 0 if all(r["status"] == "ok" for r in part["rows"]) else 1


def _save_autotune(path: Path) -> None:
    """This process's autotune winners merged into ``path`` (one entry per kernel, list and key)."""
    from sdfast.kernels import attention, group_norm, tuning

    found = tuning.snapshot({**attention.AUTOTUNERS, **group_norm.AUTOTUNERS})
    saved = _read(path) or {**found, "kernels": {}}
    for kernel, entries in found["kernels"].items():
        merged = {(tuple(e["key"]), e["list"]): e for e in saved["kernels"].get(kernel, []) + entries}
        saved["kernels"][kernel] = list(merged.values())
    _write(path, saved)


# -- kernels --


def kernels(args) -> int:
    raw = args.work / "kernels-benchmark.json"
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                          f"--benchmark-json={raw}", *args.pytest])
    groups: dict[str, dict] = {}
    if raw.is_file() and raw.stat().st_size:  # pytest-benchmark leaves it empty when every benchmark skipped
        for b in json.loads(raw.read_text())["benchmarks"]:
            impl = b["params"]["impl"]
            info = b.get("extra_info", {})
            rate = {k: round(v, 1) for k, v in info.items() if k.endswith("/s")}
            groups.setdefault(b["group"], {})[impl] = {"ms": round(info.get("ms", float("nan")), 4), **rate}
    for impls in groups.values():  # the kernel against the best torch op of its group
        torch_ms = [v["ms"] for k, v in impls.items() if k != "sdfast"]
        if "sdfast" in impls and torch_ms:
            impls["speedup_over_best_torch"] = round(min(torch_ms) / impls["sdfast"]["ms"], 3)
    _update(args.out, "kernels", groups)
    print(f"{len(groups)} kernel benchmark groups")
    return 0 if rc in (0, 5) else rc


# -- record, summary, check --


def record(args) -> None:
    run = _read(args.out / RUN)
    run.setdefault("stages", []).append({"stage": args.stage, "status": args.status, "seconds": args.seconds,
                                         "limit_s": args.limit, "exit": args.rc})
    _write(args.out / RUN, run)


def _reports(out: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))
            if path.name not in (RUN, AUTOTUNE)}


def _ratio(speedup: dict | None) -> str:
    return "" if speedup is None else f"{speedup['step']:.2f}x"


def _table(name: str, report: dict) -> list[str]:
    """The short table: per row, U-Net step p50, end to end, TFLOP/s and fraction of the measured peak, and the
    ratios to both diffusers baselines."""
    s = report["settings"]
    lines = [f"{name}: {report['model']['label']}, {s['sizes'][0]}, {s['steps']} steps {s['scheduler']}, "
             f"{s['dtype']}, guidance {s['guidance_scale']}",
             "| backend | batch | U-Net step p50 ms | end to end ms | TFLOP/s | of peak | vs diffusers | vs compiled |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['batch']} | {r['status']}: {r['reason'][:70]} | | | | | |")
            continue
        lat, fraction = r["latency_ms"], r["fraction_of_peak"]
        ratios = [_ratio(r["speedup"]), _ratio(r.get("speedup_compiled"))]
        share = "" if fraction is None else f"{fraction:.1%}"
        lines.append(f"| {r['backend']} | {r['batch']} | {lat['unet']['p50']:.2f} | {lat['end_to_end']['p50']:.0f} | "
                     f"{r['unet_tflops']:.1f} | {share} | {ratios[0]} | {ratios[1]} |")
    swaps = {r["backend"]: r["lora_swap"] for r in report["rows"] if "lora_swap" in r}
    lines += [f"LoRA swap, {b}: " + (sw.get("reason") or f"rank {sw['rank']}, {sw['modules']} modules: add "
                                      f"{sw['add_ms']:.1f} ms, on {sw['on_ms']:.1f} ms, off {sw['off_ms']:.1f} ms")
              for b, sw in swaps.items()]
    return lines


def summary(args) -> None:
    from sdfast.bench import report as views

    run = _read(args.out / RUN)
    reports = _reports(args.out)
    env = run.get("env", {})
    measured = env.get("measured", {})
    head = [f"# sdfast GPU run: {env.get('gpu') or env.get('cpu')}", "",
            f"torch {env.get('versions', {}).get('torch')}, triton {env.get('versions', {}).get('triton')}, "
            f"CUDA {env.get('cuda')}, driver {env.get('driver')}, commit {env.get('git_commit')}; clocks "
            f"{env.get('clocks')}.",
            "Measured ceilings: " + ", ".join(f"{k} {v.get('tflops', v.get('gb_per_s'))} "
                                              f"({v['what']})" for k, v in measured.items()) + ".", "",
            "| stage | status | seconds | limit |", "|---|---|---|---|"]
    head += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit_s']} |" for s in run.get("stages", [])]
    for label, t in run.get("tests", {}).items():
        head += ["", f"Tests `{label}`: {t.get('passed')} passed, {t.get('failed')} failed, {t.get('errors')} errors, "
                 f"{t.get('skipped')} skipped (exit {t.get('exit')})."] + [f"- {f}" for f in t.get("failures", [])]
    short = []
    for name, report in reports.items():
        short += _table(name, report) + [""]
    kernel_lines = [f"| {group} | {impls['sdfast']['ms']} | {impls.get('speedup_over_best_torch')}x |"
                    for group, impls in run.get("kernels", {}).items() if "sdfast" in impls]
    if kernel_lines:
        short += ["| kernel group | sdfast ms | vs best torch op |", "|---|---|---|", *kernel_lines, ""]
    full = [views.markdown(report) for report in reports.values()]
    (args.out / "gpu-run.md").write_text("\n".join(head + ["", *short, *full]))
    ok_rows = [r for report in reports.values() for r in report["rows"] if r["status"] == "ok"]
    if "sd15" in reports and ok_rows and views.HAS_MATPLOTLIB:
        views.chart(reports["sd15"], args.out / "gpu-run.png")
    print("\n".join(short))


def check(args) -> int:
    """The rehearsal's verdict: every stage ok, the reports valid, the tests green, $OUT returnable."""
    import jsonschema

    from sdfast.bench import report as views

    problems = []
    run = _read(args.out / RUN)
    stages = {s["stage"]: s for s in run.get("stages", [])}
    for name in args.expect:
        if stages.get(name, {}).get("status") != "ok":
            problems.append(f"stage {name}: {stages.get(name, {}).get('status', 'did not run')}")
    for label, t in run.get("tests", {}).items():
        if t.get("failed") or t.get("errors"):
            problems.append(f"tests {label}: {t['failures']}")
    for name, report in _reports(args.out).items():
        try:
            jsonschema.validate(report, views.SCHEMA)
        except jsonschema.ValidationError as e:
            problems.append(f"{name}.json does not match the bench schema: {e.message}")
        problems += [f"{name}: {r['backend']} {r['status']}: {r['reason']}" for r in report["rows"]
                     if r["status"] != "ok"]
    if not run.get("env", {}).get("measured"):
        problems.append("gpu-run.json has no measured ceilings")
    files = [p for p in args.out.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES or any(p.parent != args.out for p in files):
        problems.append(f"$OUT holds {[str(p.relative_to(args.out)) for p in files]}: at most {MAX_FILES} files, "
                        "no folders")
    problems += [f"{p.name}: not a name the device tool returns" for p in files
                 if not re.fullmatch(r"[A-Za-z0-9._-]+", p.name)]
    print("\n".join(problems) or f"rehearsal ok: {len(stages)} stages, {len(files)} files")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("env", "models", "tests", "bench", "kernels", "record", "summary", "check"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
        p.add_argument("--work", type=Path, default=Path(os.environ.get("WORK", "/tmp")))
    sub.choices["models"].add_argument("--arch", nargs="+", default=["sd15"])
    for name in ("tests", "kernels"):
        sub.choices[name].add_argument("--label", default=name)
        sub.choices[name].add_argument("pytest", nargs=argparse.REMAINDER, help="pytest's arguments, after --")
    b = sub.choices["bench"]
    b.add_argument("--report", required=True, help="the report's name under --out, e.g. sd15")
    b.add_argument("--arch", required=True)
    who = b.add_mutually_exclusive_group(required=True)
    who.add_argument("--backend", help="an sdfast backend spec, e.g. triton or triton:kernels=off")
    who.add_argument("--baseline", action="store_true", help="diffusers eager")
    who.add_argument("--compiled-baseline", action="store_true", help="diffusers with its U-Net compiled")
    b.add_argument("--size", type=int, required=True)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--steps", type=int, default=30)
    b.add_argument("--dtype", default="fp16")
    b.add_argument("--device", default="cuda")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--compile-mode", default=None)
    b.add_argument("--compiler", default="inductor")
    b.add_argument("--lora-rank", type=int, default=0, help="also time a random LoRA of this rank being swapped")
    b.add_argument("--controlnet", action="store_true",
                   help="every row with one ControlNet (sdfast bench --controlnet)")
    b.add_argument("--peak", default=None, help="TFLOP/s measured by the env stage (default: the datasheet)")
    r = sub.choices["record"]
    r.add_argument("--stage", required=True)
    r.add_argument("--status", required=True, choices=["ok", "failed", "timeout", "skipped"])
    r.add_argument("--seconds", type=int, required=True)
    r.add_argument("--limit", type=int, required=True)
    r.add_argument("--rc", type=int, required=True)
    sub.choices["check"].add_argument("--expect", nargs="+", default=[], help="stages that must have passed")
    args = parser.parse_args(argv)
    if getattr(args, "pytest", None) and args.pytest[0] == "--":
        args.pytest = args.pytest[1:]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    return {"env": env, "models": models, "tests": tests, "bench": bench, "kernels": kernels, "record": record,
            "summary": summary, "check": check}[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())
