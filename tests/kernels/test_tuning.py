"""Autotune lists (``sdfast.kernels.tuning``): the quick list comes from a GPU run's saved winners when there are
some (most frequent first, only configs of the full list, at most QUICK_LIMIT), else from the fallback; what
``snapshot`` saves after a run is what ``quick`` reads back; both lists compute the same function."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import rel_err

pytest.importorskip("triton", reason="Triton is not installed: pip install triton")
import triton  # noqa: E402

from sdfast.kernels import attention as fa  # noqa: E402
from sdfast.kernels import group_norm as gn  # noqa: E402
from sdfast.kernels import tuning  # noqa: E402

FULL = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b in (32, 64, 128) for w in (4, 8) for s in (2, 3)]


def _entry(block, warps, stages):
    return {"kwargs": {"BLOCK": block}, "num_warps": warps, "num_stages": stages}


def _save(folder, arch, kernel, configs):
    folder.mkdir(exist_ok=True)
    entries = [{"key": [str(i)], "config": c, "list": "full"} for i, c in enumerate(configs)]
    entries.append({"key": ["q"], "config": _entry(32, 8, 2), "list": "quick"})  # a quick list's: no evidence
    (folder / f"{arch}.json").write_text(json.dumps({"capability": arch, "kernels": {kernel: entries}}))


def test_quick_takes_the_measured_winners_most_frequent_first(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TUNED", tmp_path / "tuned")
    wins = [_entry(64, 4, 3)] + [_entry(128, 8, 2)] * 3 + [_entry(32, 4, 2)] * 2 + [_entry(999, 4, 2)]
    _save(tmp_path / "tuned", "sm_90", "attention", wins)
    picked = tuning.quick("attention", FULL, [_entry(32, 8, 3)], arch="sm_90")
    assert [tuning.describe(c) for c in picked] == [_entry(128, 8, 2), _entry(32, 4, 2), _entry(64, 4, 3)]
    assert all(c in FULL for c in picked)  # the same objects: a quick winner is a config the full sweep tries


def test_quick_falls_back_without_results_for_this_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TUNED", tmp_path / "tuned")
    _save(tmp_path / "tuned", "sm_80", "attention", [_entry(64, 4, 3)])
    fallback = [_entry(32, 8, 3), _entry(128, 4, 2)]
    assert [tuning.describe(c) for c in tuning.quick("attention", FULL, fallback, arch="sm_90")] == fallback
    assert [tuning.describe(c) for c in tuning.quick("attention", FULL, fallback, arch=None)] == fallback
    # nothing usable at all (a fallback of configs the full list no longer has): the full list's first
    assert tuning.quick("attention", FULL, [_entry(7, 1, 1)], arch=None) == FULL[:1]


def test_quick_is_at_most_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TUNED", tmp_path / "tuned")
    _save(tmp_path / "tuned", "sm_90", "group_norm", [tuning.describe(c) for c in FULL])
    assert len(tuning.quick("group_norm", FULL, [], arch="sm_90")) == tuning.QUICK_LIMIT


def test_snapshot_is_what_quick_reads_back(tmp_path, monkeypatch):
    """The winners a full sweep leaves in the kernels' own autotuners (their real names), saved as
    kernels/tuned/sm_XY.json, become each kernel's quick list; a quick list's winners do not."""
    monkeypatch.setattr(tuning, "TUNED", tmp_path)
    tuners = {name: SimpleNamespace(cache={}) for name in {**fa.AUTOTUNERS, **gn.AUTOTUNERS}}
    tuners["attention:quick"].cache[(4096, 4096, 40, False, "torch.float16")] = FULL[0]
    tuners["attention:full"].cache.update({(4096, 77, 40, False, "torch.float16"): FULL[2],
                                           (1024, 1024, 80, False, "torch.float16"): FULL[5],
                                           (256, 256, 160, False, "torch.float16"): FULL[5]})
    tuners["group_norm_stats:full"].cache[(10, 4096, 16, True)] = FULL[1]
    tuners["group_norm_apply:full"].cache[(10, 4096, 16, True, True)] = FULL[3]
    saved = tuning.snapshot(tuners)
    assert {"key": ["4096", "4096", "40", "False", "torch.float16"], "config": tuning.describe(FULL[0]),
            "list": "quick"} in saved["kernels"]["attention"]
    (tmp_path / "sm_90.json").write_text(json.dumps(saved))
    assert tuning.quick("attention", FULL, [], arch="sm_90") == [FULL[5], FULL[2]]
    assert tuning.quick("group_norm_stats", FULL, [], arch="sm_90") == [FULL[1]]
    assert tuning.quick("group_norm_apply", FULL, [], arch="sm_90") == [FULL[3]]


def test_an_unknown_mode_is_one_line():
    with pytest.raises(ValueError, match=r"autotune='fast': choose 'quick' .* or 'full'"):
        tuning.check_mode("fast")
    q = torch.randn(1, 16, 32)
    with pytest.raises(ValueError, match="autotune='fast'"):
        fa.attention(q, q, q, 2, autotune="fast")
    with pytest.raises(ValueError, match="autotune='fast'"):
        gn.group_norm(torch.randn(1, 8, 4, 4), torch.ones(8), torch.zeros(8), 2, 1e-5, True, autotune="fast")


@pytest.mark.parametrize("mode", tuning.MODES)
def test_both_lists_compute_the_kernels(mode):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 2 * 40, generator=g).to(device) for n in (33, 77, 77))
    assert rel_err(fa.attention(q, k, v, 2, autotune=mode), fa.attention_reference(q, k, v, 2)) < 1e-5
    x = torch.randn(2, 16, 8, 8, generator=g).to(device)
    w, b = torch.randn(16, generator=g).to(device), torch.randn(16, generator=g).to(device)
    assert rel_err(gn.group_norm(x, w, b, 4, 1e-5, True, autotune=mode),
                   gn.group_norm_reference(x, w, b, 4, 1e-5, True)) < 1e-5
