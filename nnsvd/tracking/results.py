"""results.json, the record beside each Hydra run that the console line and the sweep summary read."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from nnsvd.files import read_json, write_json_atomic

RESULTS = "results.json"


def read_results(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / RESULTS)


def write_results(run_dir: Path, results: Mapping) -> Path:
    path = Path(run_dir) / RESULTS
    write_json_atomic(path, _finite(results))
    return path


# What results.json written before it named its main metric holds: the first of these in its metrics.
LEGACY_MAIN_METRICS = ("test_acc", "test_ppl")


def main_metric_name(results: Mapping) -> str | None:
    """The name of a run's main metric: results.json's ``main_metric_name`` (the task's), else, for
    an older file, the first of LEGACY_MAIN_METRICS among its metrics."""
    name = results.get("main_metric_name")
    if name:
        return name
    metrics = results.get("metrics") or {}
    return next((key for key in LEGACY_MAIN_METRICS if key in metrics), None)


def main_metric(results: Mapping) -> float | None:
    """The value of a run's main metric, or None."""
    name = main_metric_name(results)
    return None if name is None else (results.get("metrics") or {}).get(name)


def regularizer_label(reg: Mapping) -> str:
    """The regularizer in a word or two: none, symmetric, orthonormal, symmetric+orthonormal."""
    parts = (["symmetric"] if reg["symmetric"] else []) + (["orthonormal"] if reg["alpha"] > 0 else [])
    return "+".join(parts) or "none"


def _finite(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
