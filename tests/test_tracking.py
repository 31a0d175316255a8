"""W&B naming and results files (nnsvd.tracking), without a W&B run."""

from __future__ import annotations

from datetime import datetime

from nnsvd.tracking import GROUP_LIMIT, run_group, wandb_group

STARTED = datetime(2026, 11, 27, 12, 4, 13)


def test_a_single_run_group_carries_the_date_and_its_overrides():
    assert run_group(STARTED, []) == "run-2026-11-27_12-04-13"
    assert run_group(STARTED, ["rank-8", "regularizer-symmetric"]) == "run-2026-11-27_12-04-13_rank-8_regularizer-symmetric"


def test_a_long_single_run_group_keeps_whole_items_only():
    items = [f"regularizer.alpha-1e-{i}_and_some_more_text" for i in range(10)]
    group = run_group(STARTED, items)
    assert len(group) <= GROUP_LIMIT
    kept = group.removeprefix("run-2026-11-27_12-04-13_")
    assert kept == "_".join(items[: len(kept.split("_and_some_more_text_"))])  # no item cut in the middle


def test_sweep_group_is_unchanged():
    assert wandb_group("/x/outputs/multirun/2026-11-27/18-00-00-123456") == "sweep-multirun_2026-11-27_18-00-00-123456"
