"""nnsvd.training.zero_shot: the checks that run before anything is loaded."""

from __future__ import annotations

import sys

import pytest

from nnsvd.errors import ConfigError
from nnsvd.training.zero_shot import check_tasks


def test_no_tasks_needs_no_lm_eval():
    assert check_tasks({"tasks": None}, start=None) is None


def test_a_missing_lm_eval_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # import lm_eval.tasks now raises ImportError
    with pytest.raises(ConfigError, match=r"lm-evaluation-harness, which is not installed: pip install -e '.\[eval\]'"):
        check_tasks({"tasks": ["arc_easy"]}, tmp_path)


@pytest.mark.parametrize(("setting", "match"), [
    ({"num_fewshot": -1}, "eval.num_fewshot=-1 must be ≥ 0"),
    ({"limit": 2.5}, "eval.limit=2.5 must be a fraction in"),
    ({"tasks_batch_size": 0}, "eval.tasks_batch_size=0 must be ≥ 1"),
])
def test_bad_lm_eval_settings_fail_in_one_line(setting, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        check_tasks({"tasks": ["arc_easy"], "num_fewshot": None, "limit": None, "tasks_batch_size": 1, **setting},
                    tmp_path)
