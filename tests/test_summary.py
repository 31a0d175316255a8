"""Sweep summaries (nnsvd.tracking.summary, nnsvd.cluster.callbacks, scripts/summarize.py) on a synthetic MLP sweep."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import HANG
from omegaconf import OmegaConf

from nnsvd.cluster import callbacks
from nnsvd.config import WandbConfig, WandbMode
from nnsvd.tracking import summary

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DENSE_TOTAL, DENSE_TARGETS = 55050, 54400  # MLP 784 → 64 → 64 → 10; targets l1, l2


def mlp_params(rank: int | None, symmetric: bool) -> dict:
    """The params block of results.json for the MLP factorized at ``rank`` (None: dense)."""
    if rank is None:
        targets = DENSE_TARGETS
    else:  # l1: r·(784+64) + bias; l2: r·(64+64) + bias, or 64·r tied
        targets = rank * 848 + 64 + (64 * rank if symmetric else 128 * rank) + 64
    total = DENSE_TOTAL - DENSE_TARGETS + targets
    return {
        "total": total,
        "dense_total": DENSE_TOTAL,
        "targets": targets,
        "dense_targets": DENSE_TARGETS,
        "macs": total - 10 - 128,
        "dense_macs": 54912,
        "compression_ratio": total / DENSE_TOTAL,
        "target_compression_ratio": targets / DENSE_TARGETS,
    }


def mlp_results(
    overrides: list[str],
    *,
    mode: str,
    rank: int | None = None,
    regularizer: str = "none",
    alpha: float = 0.0,
    acc: float | None = None,
    dense: float | None = None,
    status: str = "ok",
    error: str | None = None,
    method: str = "auto",
    sequential: bool = False,
    ratio: float | None = None,
    allocation: str = "uniform",
) -> dict:
    """results.json as run_job writes it for the MLP."""
    symmetric = "symmetric" in regularizer
    label = "+".join((["symmetric"] if symmetric else []) + (["orthonormal"] if alpha > 0 else [])) or "none"
    metrics = {}
    if status == "ok":
        metrics = {"test_acc": acc, "test_loss": 1.0 - acc, "val_acc": acc - 0.01}
        if mode == "compress":
            metrics.update(dense_test_acc=dense, dense_test_loss=0.1, dense_val_acc=dense - 0.01)
            metrics.update(compressed_test_acc=acc, compressed_test_loss=1.0 - acc, compressed_val_acc=acc)
    return {
        "status": status,
        "error": error,
        "model": "mlp",
        "mode": mode,
        "rank": rank,
        "regularizer": {
            "name": regularizer,
            "label": label,
            "symmetric": symmetric,
            "alpha": alpha,
            "effective": True,
        },
        "seed": 42,
        "overrides": overrides,
        "metrics": metrics,
        "params": mlp_params(rank, symmetric) if status == "ok" else {},
        "bound": None,
        "compress": (
            _compress_record(method, sequential, ratio, allocation) if mode == "compress" and status == "ok" else None
        ),
        "layers": [],
        "timing": {"train_s": 3.0, "compress_s": 0.01, "eval_s": 0.2, "total_s": 3.5},
        "checkpoint": None,
        "history": {},
        "run_dir": "/somewhere",
        "main_metric": metrics.get("test_acc"),
    }


def _compress_record(method: str, sequential: bool, ratio: float | None = None, allocation: str = "uniform") -> dict:
    calibration = None
    if method in ("asvd", "whiten", "fwsvd"):
        calibration = {"samples": 2048, "seq_len": None, "batch_size": 512, "seed": 42, "split": "train",
                       "sequential": sequential, "fisher": method == "fwsvd", "tokens": 2048}
    budget = {"ratio": ratio, "allocation": allocation if ratio is not None else None, "spectrum_loss": None,
              "removed_targets": None if ratio is None else ratio + 0.003, "removed_model": None, "ranks": {}}
    return {"method": method, "options": {}, "calibration": calibration, "budget": budget}


def write_job(
    sweep: Path, num: int, overrides: list[str], results: dict | None, config: dict | None = None
) -> Path:
    """A Hydra job directory: .hydra/overrides.yaml, .hydra/config.yaml and results.json (unless None)."""
    job = sweep / f"{num}-{','.join(o for o in overrides if not o.startswith('wandb.mode='))}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results, indent=2))
    return job


def make_sweep(root: Path, *, failed: bool = True) -> Path:
    """8 jobs: dense, compress r2/r8, scratch symmetric r2/r8/r4 (job 10), and unless ``failed``
    is False a failed job and one without results.json."""
    sweep = root / "multirun" / "2026-11-26" / "12-00-00"
    jobs = [
        (["mode=dense"], dict(mode="dense", acc=0.9612)),
        (["rank=2"], dict(mode="compress", rank=2, acc=0.41, dense=0.9612)),
        (["rank=8"], dict(mode="compress", rank=8, acc=0.86, dense=0.9612)),
        (
            ["mode=scratch", "rank=2", "regularizer=symmetric"],
            dict(mode="scratch", rank=2, regularizer="symmetric", acc=0.70),
        ),
        (
            ["mode=scratch", "rank=8", "regularizer=symmetric"],
            dict(mode="scratch", rank=8, regularizer="symmetric", acc=0.93),
        ),
    ]
    for num, (overrides, kw) in enumerate(jobs):
        write_job(sweep, num, overrides + ["wandb.mode=disabled"], mlp_results(overrides, **kw))
    write_job(
        sweep,
        10,
        ["mode=scratch", "rank=4", "regularizer=symmetric"],
        mlp_results(
            ["mode=scratch", "rank=4", "regularizer=symmetric"],
            mode="scratch",
            rank=4,
            regularizer="symmetric",
            acc=0.88,
        ),
    )
    if failed:
        error = "rank=0 is not a rank: use 1 ≤ rank < min(out, in) | see --help\nsecond line of detail"
        write_job(
            sweep,
            5,
            ["rank=0"],
            mlp_results(["rank=0"], mode="compress", rank=0, status="failed", error=error),
        )
        config = {
            "model": {"name": "mlp"},
            "rank": 4,
            "mode": None,
            "seed": 42,
            "regularizer": {"name": "none", "symmetric": False, "alpha": 0.0},
        }
        write_job(sweep, 6, ["rank=4"], None, config=config)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "not-a-job").mkdir()
    return sweep


@pytest.fixture
def sweep(tmp_path) -> Path:
    return make_sweep(tmp_path)


def by_job(rows: list[dict]) -> dict[str, dict]:
    return {row["job"].split("-")[0]: row for row in rows}


# ------------------------------------------------------------------- collect


def test_collect_gives_one_row_per_job_in_job_number_order(sweep):
    rows = summary.collect(sweep)
    assert [row["job"].split("-")[0] for row in rows] == ["0", "1", "2", "3", "4", "5", "6", "10"]
    assert all(list(row) == summary.COLUMNS for row in rows)
    assert [row["status"] for row in rows] == ["ok"] * 5 + ["failed", "missing", "ok"]


def test_rows_carry_the_metrics_params_and_settings(sweep):
    rows = by_job(summary.collect(sweep))
    dense, compress, scratch = rows["0"], rows["2"], rows["4"]
    assert dense["mode"] == "dense" and dense["rank"] is None and dense["value"] == 0.9612
    assert dense["metric"] == "test_acc" and dense["dense_value"] is None and dense["params"] == DENSE_TOTAL
    assert dense["compression_ratio"] == 1.0
    assert compress["overrides"] == "rank=8,wandb.mode=disabled"
    assert (compress["mode"], compress["rank"], compress["regularizer"], compress["alpha"]) == (
        "compress",
        8,
        "none",
        0.0,
    )
    assert (
        compress["value"] == 0.86
        and compress["dense_value"] == 0.9612
        and compress["compressed_value"] == 0.86
    )
    assert compress["params"] == 976 * 8 + 778 and compress["dense_params"] == DENSE_TOTAL
    assert compress["target_compression_ratio"] == pytest.approx((976 * 8 + 128) / DENSE_TARGETS)
    assert scratch["regularizer"] == "symmetric" and scratch["params"] == 8074 and scratch["time_s"] == 3.5
    assert scratch["compressed_value"] is None


def test_failed_and_missing_jobs_keep_what_is_known(sweep):
    rows = by_job(summary.collect(sweep))
    failed, missing = rows["5"], rows["6"]
    assert failed["status"] == "failed" and failed["error"].startswith("rank=0 is not a rank")
    assert failed["value"] is None and failed["params"] is None
    # no results.json: what the job was meant to run comes from .hydra/config.yaml
    assert missing["status"] == "missing" and "results.json" in missing["error"]
    assert (missing["model"], missing["mode"], missing["rank"], missing["regularizer"]) == (
        "mlp",
        "compress",
        4,
        "none",
    )
    assert missing["overrides"] == "rank=4" and missing["metric"] == "test_acc"


def test_collect_of_a_missing_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        summary.collect(tmp_path / "nope")
    assert summary.collect(tmp_path) == []


def test_curves_and_dense_reference(sweep):
    rows = summary.collect(sweep)
    lines = summary.curves(rows, "mlp")
    assert lines == {
        ("compress", "none", 0.0, "auto", ""): [(2, 0.41), (8, 0.86)],
        ("scratch", "symmetric", 0.0, "", ""): [(2, 0.70), (4, 0.88), (8, 0.93)],
    }
    assert summary.dense_reference(rows, "mlp") == (0.9612, "dense (this sweep)")
    without_dense = [row for row in rows if row["mode"] != "dense"]
    assert summary.dense_reference(without_dense, "mlp") == (0.9612, "dense (measured by compress jobs)")


def test_one_line_per_method(tmp_path):
    sweep = tmp_path / "methods"
    jobs = [("svd", False, 2, 0.17), ("svd", False, 8, 0.84), ("whiten", False, 2, 0.21), ("whiten", False, 8, 0.87),
            ("whiten", True, 8, 0.868)]
    for num, (method, seq, rank, acc) in enumerate(jobs):
        overrides = [f"rank={rank}", f"compress.method={method}"] + (["calibration.sequential=true"] if seq else [])
        write_job(sweep, num, overrides, mlp_results(overrides, mode="compress", rank=rank, acc=acc, dense=0.97,
                                                     method=method, sequential=seq))
    rows = summary.collect(sweep)
    assert [row["method"] for row in rows] == ["svd", "svd", "whiten", "whiten", "whiten+seq"]
    lines = summary.curves(rows, "mlp")
    assert lines == {
        ("compress", "none", 0.0, "svd", ""): [(2, 0.17), (8, 0.84)],
        ("compress", "none", 0.0, "whiten", ""): [(2, 0.21), (8, 0.87)],
        ("compress", "none", 0.0, "whiten+seq", ""): [(8, 0.868)],
    }
    assert [summary.line_label(key) for key in lines] == [
        "compress · svd · none", "compress · whiten · none", "compress · whiten+seq · none"]
    md = summary.markdown_table(rows, title="t")
    assert "| method |" in md and "| whiten+seq |" in md


def test_ratio_sweeps_are_drawn_against_the_ratio_one_line_per_method_and_allocation(tmp_path):
    sweep = tmp_path / "ratios"
    jobs = [("svd", "uniform", 0.2, 0.95), ("svd", "uniform", 0.6, 0.70), ("svd", "spectrum", 0.2, 0.96),
            ("svd", "spectrum", 0.6, 0.80), ("whiten", "spectrum", 0.6, 0.90)]
    for num, (method, allocation, ratio, acc) in enumerate(jobs):
        overrides = [f"compress.ratio={ratio}", f"compress.allocation={allocation}", f"compress.method={method}"]
        write_job(sweep, num, overrides, mlp_results(overrides, mode="compress", acc=acc, dense=0.97, method=method,
                                                     ratio=ratio, allocation=allocation))
    write_job(sweep, 9, ["rank=8"], mlp_results(["rank=8"], mode="compress", rank=8, acc=0.84, dense=0.97))
    rows = summary.collect(sweep)
    assert [(r["ratio"], r["allocation"], r["removed"]) for r in rows[:2]] == [(0.2, "uniform", 0.203), (0.6, "uniform", 0.603)]
    assert summary.axes_of(rows, "mlp") == ["rank", "ratio"]  # both kinds of job: one panel each
    lines = summary.curves(rows, "mlp", "ratio")
    assert lines == {
        ("compress", "none", 0.0, "svd", "spectrum"): [(0.2, 0.96), (0.6, 0.80)],
        ("compress", "none", 0.0, "svd", "uniform"): [(0.2, 0.95), (0.6, 0.70)],
        ("compress", "none", 0.0, "whiten", "spectrum"): [(0.6, 0.90)],
    }
    assert summary.curves(rows, "mlp", "rank") == {("compress", "none", 0.0, "auto", ""): [(8, 0.84)]}
    assert summary.line_label(("compress", "none", 0.0, "whiten", "spectrum")) == "compress · whiten · spectrum · none"
    md = summary.markdown_table(rows, title="t")
    assert "| method | allocation | ratio | removed |" in md and "| svd | spectrum | 0.6 | 0.603 |" in md
    with (sweep / "summary.csv").open("w"):
        pass
    paths = summary.write_summary(sweep, rows)
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert {"method", "allocation", "ratio", "removed"} <= set(header)
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)


# --------------------------------------------------------------------- write


def test_write_summary_writes_csv_markdown_and_png(sweep):
    rows = summary.collect(sweep)
    paths = summary.write_summary(sweep, rows)
    assert paths == {"csv": sweep / "summary.csv", "md": sweep / "summary.md", "png": sweep / "summary.png"}

    with paths["csv"].open(newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == summary.COLUMNS and len(table) == len(rows) == 8
    assert table[2]["job"] == "2-rank=8" and float(table[2]["value"]) == 0.86 and table[0]["rank"] == ""

    md = paths["md"].read_text()
    assert "8 jobs: 6 ok, 1 failed, 1 missing." in md
    for row in rows:
        assert f"| {row['job']} |" in md
    failed_line = next(line for line in md.splitlines() if line.startswith("| 5-rank=0 |"))
    assert "**failed**" in failed_line and "rank=0 is not a rank" in failed_line
    assert "second line" not in failed_line and "\\|" in failed_line  # one line, pipes escaped
    assert md.count("\n|") == len(rows) + 2  # header, rule, rows: one table

    png = paths["png"].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000


def test_reference_overlay_and_an_empty_plot_render(sweep, tmp_path):
    rows = summary.collect(sweep)
    summary.write_summary(sweep, rows, reference=summary.REFERENCE_CSV)
    assert (sweep / "summary.png").read_bytes().startswith(PNG_SIGNATURE)
    published, dense = summary.read_reference(summary.REFERENCE_CSV)
    assert dense == 0.9049 and published[("compress", "none", 0.0, "auto", "")][0] == (1, 0.1987)
    assert published[("scratch", "symmetric+orthonormal", 0.01, "", "")] == [(8, 0.8218)]

    failed_only = [row for row in rows if row["status"] != "ok"]
    summary.plot_summary(tmp_path / "empty.png", failed_only, title="nothing ok")
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG_SIGNATURE)


def test_shipped_reference_is_the_shared_copy():
    shared = REPO.parent / "shared" / "reference" / "seed_mlp_results.csv"
    if not shared.exists():
        pytest.skip(f"{shared} not found")
    assert summary.REFERENCE_CSV.read_bytes() == shared.read_bytes()


def test_shorten_keeps_the_first_line_within_width():
    assert summary.shorten(None) == ""
    assert summary.shorten("  a   b \nmore") == "a b"
    assert summary.shorten("x" * 300, width=20) == "x" * 19 + "…"


# ----------------------------------------------------------------------- W&B


def test_summarize_offline_writes_a_wandb_summary_run(sweep, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")

    rows, paths = summary.summarize(sweep, wandb_mode="offline", reference=summary.REFERENCE_CSV)
    assert len(rows) == 8 and paths["png"].is_file()
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = [p.relative_to(runs[0]).as_posix() for p in runs[0].rglob("*") if p.is_file()]
    assert any(f.endswith(".wandb") for f in files)
    assert any("summary/jobs" in f and f.endswith(".table.json") for f in files)
    assert any("summary/mlp_test_acc_vs_rank" in f and f.endswith(".table.json") for f in files)
    assert any(f.endswith(".png") for f in files)
    # the W&B folder is not mistaken for a job on the next collect
    assert len(summary.collect(sweep)) == 8


# ------------------------------------------------------------ callback, CLI


def multirun_config(sweep_dir: str, cwd: Path) -> OmegaConf:
    """The parts of a composed multirun config the callback reads (wandb.mode is an Enum node)."""
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": sweep_dir}, "runtime": {"cwd": str(cwd)}}})
    cfg.wandb = OmegaConf.structured(WandbConfig(mode=WandbMode.disabled))
    return cfg


def test_callback_summarizes_a_relative_sweep_dir_and_counts_failures(sweep, tmp_path):
    cfg = multirun_config(str(sweep.relative_to(tmp_path)), cwd=tmp_path)
    assert callbacks.wandb_settings(cfg) == {
        "mode": "disabled",
        "project": "nn-svd",
        "entity": None,
        "group": None,
    }
    callbacks.SweepSummary(reference=True).on_multirun_end(cfg)
    assert callbacks.SweepSummary.failed_jobs == 2 and callbacks.sweep_failed()
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()

    clean = make_sweep(tmp_path / "clean", failed=False)
    callbacks.SweepSummary().on_multirun_end(multirun_config(str(clean), cwd=tmp_path))
    assert callbacks.SweepSummary.failed_jobs == 0 and not callbacks.sweep_failed()


def test_callback_counts_its_own_error_as_a_failure(tmp_path, caplog):
    cfg = multirun_config(str(tmp_path / "never-created"), cwd=tmp_path)
    callbacks.SweepSummary().on_multirun_end(cfg)
    assert callbacks.sweep_failed()
    assert "sweep summary failed" in caplog.text and "does not exist" in caplog.text


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "summarize.py"), *args],
        capture_output=True,
        text=True,
        timeout=HANG,
        cwd=REPO,
    )


def test_cli_exit_code_says_whether_every_job_finished_ok(tmp_path):
    failing = make_sweep(tmp_path / "a")
    clean = make_sweep(tmp_path / "b", failed=False)
    proc = cli(str(failing))
    assert proc.returncode == 1, proc.stderr
    assert "| 5-rank=0 | **failed** |" in proc.stdout and (failing / "summary.png").is_file()
    proc = cli(str(clean), "--reference")
    assert proc.returncode == 0, proc.stderr
    assert "6 jobs: 6 ok." in proc.stdout


def test_cli_rejects_a_missing_or_empty_sweep_dir(tmp_path):
    proc = cli(str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    proc = cli(str(tmp_path))
    assert (
        proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no job directories" in proc.stderr
    )


def test_zero_shot_accuracies_get_table_columns_csv_json_and_a_plot_panel(tmp_path):
    """eval.tasks' accuracies: a column per task metric, JSON in the CSV, and curves of their own."""
    sweep = tmp_path / "tasks"
    for num, (ratio, ppl, acc) in enumerate([(0.2, 100.0, 0.61), (0.4, 300.0, 0.48)]):
        overrides = [f"compress.ratio={ratio}", "compress.method=whiten"]
        results = {
            "status": "ok", "model": "causal_lm", "mode": "compress", "rank": None, "seed": 42,
            "regularizer": {"label": "none", "alpha": 0.0}, "overrides": overrides,
            "metrics": {"test_ppl": ppl, "dense_test_ppl": 24.3, "compressed_test_ppl": ppl,
                        "capitals_acc": acc, "capitals_acc_norm": acc + 0.01,
                        "dense_capitals_acc": 0.75, "compressed_capitals_acc": acc},
            "params": {"total": 100, "dense_total": 135}, "timing": {"total_s": 60.0},
            "compress": _compress_record("whiten", False, ratio=ratio),
        }
        write_job(sweep, num, overrides, results)
    rows = summary.collect(sweep)
    assert rows[0]["zero_shot"] == {"capitals_acc": 0.61, "capitals_acc_norm": 0.62}
    assert rows[0]["dense_zero_shot"] == {"capitals_acc": 0.75}
    assert summary.curves(rows, "causal_lm", "ratio", "capitals_acc") == {
        ("compress", "none", 0.0, "whiten", "uniform"): [(0.2, 0.61), (0.4, 0.48)]}
    assert summary.dense_reference(rows, "causal_lm", "capitals_acc") == (0.75, "dense (measured by compress jobs)")
    md = summary.markdown_table(rows, title="t")
    assert "| capitals_acc | capitals_acc_norm |" in md and "| 0.6100 | 0.6200 |" in md
    paths = summary.write_summary(sweep, rows)
    with paths["csv"].open(newline="") as f:
        table = list(csv.DictReader(f))
    assert json.loads(table[1]["zero_shot"]) == {"capitals_acc": 0.48, "capitals_acc_norm": 0.49}
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)
