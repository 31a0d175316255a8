"""The task interface: the registry, the defaults of optional abilities, and the main metric's name
that results.json records and the closing line and the summary read."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from nnsvd.errors import ConfigError
from nnsvd.run.console import closing_line
from nnsvd.tasks.base import TASKS, Task, task_class
from nnsvd.tracking import main_metric, main_metric_name
from nnsvd.tracking.summary.rows import job_row


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_provides_the_whole_interface(name):
    cls = task_class(name)
    assert issubclass(cls, Task) and not inspect.isabstract(cls)
    assert cls.main_metric in ("test_acc", "test_ppl") and isinstance(cls.higher_is_better, bool)
    assert cls.length_key in ("epochs", "steps")


def test_the_registry_names_the_known_tasks_for_an_unknown_one():
    with pytest.raises(ConfigError, match="model.name='svm' is unknown; allowed: mlp, gpt2, causal_lm"):
        task_class("svm")


def test_optional_abilities_default_to_not_available():
    assert (Task.supports_bound, Task.supports_sample) == (False, False)
    assert Task.bound(None, None, None) is None and Task.sample(None, None) is None
    assert task_class("mlp").supports_bound and not task_class("mlp").supports_sample
    assert task_class("gpt2").supports_sample and not task_class("causal_lm").supports_bound


def _results(**extra) -> dict:
    return {"status": "ok", "model": "mlp", "mode": "dense", "rank": None, "metrics": {"test_acc": 0.9, "val_acc": 0.8},
            **extra}


def test_the_main_metric_is_the_one_results_json_names():
    results = _results(main_metric_name="val_acc")
    assert (main_metric_name(results), main_metric(results)) == ("val_acc", 0.8)
    assert closing_line(results, Path("/runs/x"), Path("/")).startswith("ok: val_acc=0.8000 (mlp dense)")


def test_older_results_without_the_name_fall_back_to_the_known_metrics():
    results = _results()
    assert (main_metric_name(results), main_metric(results)) == ("test_acc", 0.9)
    assert closing_line(results, Path("/runs/x"), Path("/")).startswith("ok: test_acc=0.9000")
    assert main_metric_name({"metrics": {}}) is None and main_metric({"metrics": {}}) is None


def test_the_summary_row_reads_the_main_metric_from_results(tmp_path):
    job = tmp_path / "0_rank-8"
    job.mkdir()
    (job / "results.json").write_text(json.dumps(_results(main_metric_name="val_acc")))
    row = job_row(job)
    assert (row["metric"], row["value"]) == ("val_acc", 0.8)
    (job / "results.json").write_text(json.dumps(_results()))  # written before the name was recorded
    assert (job_row(job)["metric"], job_row(job)["value"]) == ("test_acc", 0.9)


def test_the_summary_does_not_import_the_pipeline():
    code = "import sys, nnsvd.tracking.summary.rows; print('nnsvd.run.pipeline' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
