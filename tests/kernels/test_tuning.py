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
    """The winners a run leaves in its autotuners' caches, saved as kernels/tuned/sm_XY.json, become the quick list."""
    monkeypatch.setattr(tuning, "TUNED", tmp_path)
    tuners = {"attention:quick": SimpleNamespace(cache={(4096, 4096, 40, False, "torch.float16"): FULL[5]}),
              "attention:full": SimpleNamespace(cache={(4096, 77, 40, False, "torch.float16"): FULL[2],
                                                       (1024, 1024, 80, False, "torch.float16"): FULL[5]}),
              "group_norm_stats:full": SimpleNamespace(cache={(10, 4096, 16, True): FULL[0]})}
    saved = tuning.snapshot(tuners)
    assert saved["kernels"]["attention"][0] == {"key": ["4096", "4096", "40", "False", "torch.float16"],
                                                "config": tuning.describe(FULL[5]), "list": "quick"}
    assert len(saved["kernels"]["attention"]) == 3 and len(saved["kernels"]["group_norm_stats"]) == 1
    (tmp_path / "sm_90.json").write_text(json.dumps(saved))
    assert tuning.quick("attention", FULL, [], arch="sm_90") == [FULL[5], FULL[2]]


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
