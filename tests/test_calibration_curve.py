"""scripts/calibration_curve.py: the calibration curve's table, JSON and plot from a sweep's results."""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import calibration_curve  # noqa: E402


def job(sweep, name, ratio, samples, ppl, status="ok"):
    d = sweep / name
    d.mkdir(parents=True)
    r = {"status": status, "metrics": {"dense_test_ppl": 24.0, "compressed_test_ppl": ppl},
         "timing": {"compress_s": 10.0 * samples, "total_s": 12.0 * samples},
         "compress": {"budget": {"ratio": ratio},
                      "calibration": {"samples": samples, "tokens": samples * 1024, "statistics_cached": ratio > 0.3}}}
    (d / "results.json").write_text(json.dumps(r))


def test_the_curve_is_sorted_by_ratio_and_samples_and_leaves_out_failed_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    job(sweep, "3", 0.4, 16, 300.0)
    job(sweep, "0", 0.2, 16, 100.0)
    job(sweep, "1", 0.2, 8, 140.0)
    job(sweep, "2", 0.4, 8, 400.0, status="failed")
    assert calibration_curve.main([str(sweep), "--out", str(tmp_path / "out" / "curve")]) == 1  # a job failed
    saved = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert [(p["ratio"], p["samples"], p["test_ppl"]) for p in saved["points"]] == [
        (0.2, 8, 140.0), (0.2, 16, 100.0), (0.4, 16, 300.0)]
    assert saved["not_ok"] == ["2"] and saved["dense_test_ppl"] == 24.0
    assert (tmp_path / "out" / "curve.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert "| 20% | 8 | 8,192 | 140.00 | 5.83× | 80 | 96 |" in out
    assert "| 40% | 16 | 16,384 | 300.00 | 12.50× | 160 (cached statistics) | 192 |" in out


def test_an_empty_sweep_exits_2(tmp_path):
    assert calibration_curve.main([str(tmp_path)]) == 2
    assert calibration_curve.main([str(tmp_path / "missing")]) == 2


def test_an_earlier_curve_joins_the_sweep_and_a_point_measured_again_is_replaced(tmp_path):
    first, later = tmp_path / "first", tmp_path / "later"
    job(first, "0", 0.2, 8, 140.0)
    job(first, "1", 0.2, 16, 100.0)
    assert calibration_curve.main([str(first), "--out", str(tmp_path / "a")]) == 0
    job(later, "0", 0.2, 128, 90.0)
    job(later, "1", 0.2, 16, 99.0)  # measured again: this one counts
    assert calibration_curve.main([str(later), "--with", str(tmp_path / "a.json"), "--out", str(tmp_path / "b")]) == 0
    saved = json.loads((tmp_path / "b.json").read_text())
    assert [(p["samples"], p["test_ppl"]) for p in saved["points"]] == [(8, 140.0), (16, 99.0), (128, 90.0)]
    assert saved["dense_test_ppl"] == 24.0
    assert calibration_curve.main([str(later), "--with", str(tmp_path / "missing.json")]) == 2
