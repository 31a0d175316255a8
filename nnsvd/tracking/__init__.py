"""Where results go: the results.json beside each Hydra run (``results``), the W&B runs
(``tracker``) and the table and plot of a sweep (``summary``). A top layer: it imports the
layers below, and nothing below imports it."""

from nnsvd.tracking.results import (
    LEGACY_MAIN_METRICS,
    RESULTS,
    main_metric,
    main_metric_name,
    read_results,
    regularizer_label,
    write_results,
)
from nnsvd.tracking.tracker import GROUP_LIMIT, Tracker, flatten, run_group, wandb_group

__all__ = [
    "GROUP_LIMIT",
    "LEGACY_MAIN_METRICS",
    "RESULTS",
    "Tracker",
    "flatten",
    "main_metric",
    "main_metric_name",
    "read_results",
    "regularizer_label",
    "run_group",
    "wandb_group",
    "write_results",
]
