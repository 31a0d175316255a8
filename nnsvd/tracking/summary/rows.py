"""The rows of a sweep summary: one per job directory of a Hydra multirun, ok or not."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import yaml

from nnsvd.tracking import RESULTS, read_results, regularizer_label

# The main metric of each model, where a job's results.json does not name it (written before it did, or
# no results.json at all), and how to show each: (axis label, y scale, number format).
METRICS = {"mlp": "test_acc", "gpt2": "test_ppl", "causal_lm": "test_ppl"}
METRIC_STYLES = {
    "test_acc": ("test accuracy", "linear", "{:.4f}"),
    "test_ppl": ("test perplexity", "log", "{:.2f}"),
}

COLUMNS = [
    "job",
    "overrides",
    "status",
    "error",
    "model",
    "mode",
    "rank",
    "method",  # compress.method of a compress job (with "+seq" when calibrated sequentially, "+block" when updated)
    "allocation",  # compress.allocation of a job sized by compress.ratio
    "ratio",  # compress.ratio requested: the fraction of the target layers' weights removed
    "removed",  # the fraction of the target layers' weights removed, achieved
    "regularizer",
    "alpha",
    "seed",
    "metric",
    "value",  # the main metric of the final model (after fine-tuning if there was any)
    "dense_value",  # the dense model's, measured by a compress job
    "compressed_value",  # right after compression, before fine-tuning
    "params",
    "dense_params",
    "compression_ratio",  # params / dense params of the whole model
    "target_compression_ratio",  # the same over the factorized layers only
    "time_s",
    "zero_shot",  # {"<task>_acc": …} of the final model (eval.tasks), JSON in summary.csv
    "dense_zero_shot",  # the same for the dense model, measured by a compress job
]

ZERO_SHOT_SUFFIXES = ("_acc", "_acc_norm")


def zero_shot_metrics(metrics: dict, prefix: str = "") -> dict:
    """{"<task>_acc": …} among ``metrics`` (eval.tasks' accuracies), with ``prefix`` ("dense_") or none."""
    phases = ("dense_", "compressed_", "finetuned_")
    out = {}
    for key, value in metrics.items():
        if not key.endswith(ZERO_SHOT_SUFFIXES) or not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if prefix or not name.startswith(phases):
            out[name] = value
    return out


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job directory of the sweep, in job-number order.

    A job directory is a subdirectory holding ``.hydra/overrides.yaml`` or ``results.json``.
    A job without results.json (killed before it could write one) has status "missing";
    what it was meant to run is then read from its ``.hydra/config.yaml``.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    jobs = [
        d
        for d in sweep_dir.iterdir()
        if d.is_dir() and ((d / ".hydra" / "overrides.yaml").is_file() or (d / RESULTS).is_file())
    ]
    return [job_row(d) for d in sorted(jobs, key=_job_order)]


def _job_order(job_dir: Path) -> tuple[int, str]:
    """Job directories are named "<job num>_<overrides>" (before: "<job num>-<overrides>");
    sort by the number, not the text."""
    match = re.match(r"(\d+)(?:[_-]|$)", job_dir.name)
    return (int(match.group(1)) if match else 1 << 62, job_dir.name)


def job_row(job_dir: Path) -> dict:
    """The summary row of one job directory."""
    results = read_results(job_dir)
    row = dict.fromkeys(COLUMNS)
    row["job"] = job_dir.name
    row["overrides"] = ",".join(_overrides(job_dir, results))
    if results is None:
        row.update(status="missing", error=f"no {RESULTS}: the job did not finish", **_planned(job_dir))
        row["metric"] = METRICS.get(row["model"])
        return row

    reg = results.get("regularizer") or {}
    budget = (results.get("compress") or {}).get("budget") or {}
    metrics = results.get("metrics") or {}
    params = results.get("params") or {}
    metric = results.get("main_metric_name") or METRICS.get(results.get("model"))
    value = metrics.get(metric) if metric else None
    row.update(
        status=results.get("status", "unknown"),
        error=results.get("error"),
        model=results.get("model"),
        mode=results.get("mode"),
        rank=results.get("rank"),
        method=_method_label(results.get("compress")),
        allocation=budget.get("allocation"),
        ratio=budget.get("ratio"),
        removed=budget.get("removed_targets"),
        regularizer=reg.get("label"),
        alpha=reg.get("alpha"),
        seed=results.get("seed"),
        metric=metric,
        value=value if value is not None else results.get("main_metric"),
        dense_value=metrics.get(f"dense_{metric}"),
        compressed_value=metrics.get(f"compressed_{metric}"),
        params=params.get("total"),
        dense_params=params.get("dense_total"),
        compression_ratio=params.get("compression_ratio"),
        target_compression_ratio=params.get("target_compression_ratio"),
        time_s=(results.get("timing") or {}).get("total_s"),
        zero_shot=zero_shot_metrics(metrics) or None,
        dense_zero_shot=zero_shot_metrics(metrics, "dense_") or None,
    )
    return row


def _method_label(compress: dict | None) -> str | None:
    """The compression method of a job, e.g. "whiten", "whiten+seq" or "whiten+seq+block" (with a block-wise
    update); None for dense and scratch jobs."""
    if not compress:
        return None
    calibration = compress.get("calibration") or {}
    update = (compress.get("update") or {}).get("method")
    return compress.get("method") + ("+seq" if calibration.get("sequential") else "") + (f"+{update}" if update else "")


def _overrides(job_dir: Path, results: dict | None) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return [str(o) for o in yaml.safe_load(path.read_text()) or []]
    return list((results or {}).get("overrides") or [])


def _planned(job_dir: Path) -> dict:
    """Model, mode, rank and regularizer a job was configured with, from .hydra/config.yaml."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    c = yaml.safe_load(path.read_text()) or {}
    reg = c.get("regularizer") or {}
    comp = c.get("compress") or {}
    rank, ratio = c.get("rank"), comp.get("ratio")
    return {
        "model": (c.get("model") or {}).get("name"),
        # the default run_job applies when mode is unset
        "mode": c.get("mode") or ("dense" if rank is None and ratio is None else "compress"),
        "rank": rank,
        "ratio": ratio,
        "allocation": comp.get("allocation") if ratio is not None else None,
        "regularizer": regularizer_label(reg) if {"symmetric", "alpha"} <= reg.keys() else reg.get("name"),
        "alpha": reg.get("alpha"),
        "seed": c.get("seed"),
    }


def status_counts(rows: Sequence[dict]) -> str:
    """The jobs counted by status, ok first: "4 ok, 1 failed, 1 missing"."""
    counts = Counter(row["status"] for row in rows)
    ordered = sorted(counts.items(), key=lambda kv: (kv[0] != "ok", kv[0]))
    return ", ".join(f"{n} {status}" for status, n in ordered) or "no jobs"


def not_ok(rows: Sequence[dict]) -> list[dict]:
    return [row for row in rows if row["status"] != "ok"]


def shorten(error: str | None, width: int = 100) -> str:
    """The first line of an error message, cut to ``width`` characters."""
    if not error:
        return ""
    line = " ".join(error.strip().splitlines()[0].split())
    return line if len(line) <= width else line[: width - 1] + "…"
