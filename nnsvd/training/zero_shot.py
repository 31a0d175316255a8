"""Zero-shot (and few-shot) tasks through lm-evaluation-harness: ``eval.tasks``.

The suite's own model object and tokenizer are wrapped in lm-eval's ``HFLM`` (no reload, no Hub),
so the dense, the compressed and the fine-tuned model are scored exactly as they are. Task names
and ``eval.include_path`` (a folder of your own task YAMLs) are checked at start, before any data
or model is loaded. lm-eval is the optional extra ``eval`` (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping
from pathlib import Path

from nnsvd.errors import ConfigError

log = logging.getLogger(__name__)

ZERO_SHOT_KEYS = ("tasks", "num_fewshot", "limit", "tasks_batch_size", "include_path")
METRICS = ("acc", "acc_norm")  # what a multiple-choice task reports (acc_norm where it has it)


def check_tasks(evaluation: Mapping, start: Path):
    """lm-eval's TaskManager for ``eval.tasks``, with every name checked; None without tasks.

    One-line ConfigErrors: lm-eval missing, an include_path that is not a folder, an unknown task
    (with the nearest known names), a bad num_fewshot, limit or batch size."""
    tasks = evaluation.get("tasks")
    if not tasks:
        return None
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            f"eval.tasks={list(tasks)} runs lm-evaluation-harness, which is not installed: "
            "pip install -e '.[eval]' (or pip install lm-eval), or set eval.tasks=null"
        ) from None
    if evaluation.get("num_fewshot") is not None and evaluation["num_fewshot"] < 0:
        raise ConfigError(f"eval.num_fewshot={evaluation['num_fewshot']} must be ≥ 0, or null for each task's default")
    limit = evaluation.get("limit")
    if limit is not None and not (limit > 0 and (limit < 1 or float(limit).is_integer())):
        raise ConfigError(f"eval.limit={limit} must be a fraction in (0, 1) or a whole number of documents ≥ 1")
    if evaluation.get("tasks_batch_size", 1) < 1:
        raise ConfigError(f"eval.tasks_batch_size={evaluation['tasks_batch_size']} must be ≥ 1")
    include = evaluation.get("include_path")
    if include is not None:
        folder = Path(include) if Path(include).is_absolute() else start / include
        if not folder.is_dir():
            raise ConfigError(f"eval.include_path={include} is not a folder (of lm-eval task YAML files)")
        include = str(folder)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = TaskManager(include_path=include, verbosity="WARNING")
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            nearest = difflib.get_close_matches(name, sorted(known), n=3)
            raise ConfigError(
                f"eval.tasks: unknown lm-eval task '{name}'"
                + (f" (nearest: {', '.join(nearest)})" if nearest else "")
                + "; `lm-eval ls tasks` lists them, and eval.include_path adds a folder of your own"
            )
    return manager


def evaluate_tasks(model, tokenizer, evaluation: Mapping, manager, device, seed: int) -> dict[str, float]:
    """{"<task>_acc": …, "<task>_acc_norm": …} of the model on ``eval.tasks`` (what each task reports)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=evaluation.get("tasks_batch_size", 1),
                  device=str(device))
        limit = evaluation.get("limit")
        out = simple_evaluate(
            model=lm, tasks=list(evaluation["tasks"]), num_fewshot=evaluation.get("num_fewshot"),
            limit=None if limit is None else (limit if limit < 1 else int(limit)), task_manager=manager,
            log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, verbosity="WARNING",
        )
    finally:
        model.train(was_training)
    metrics = {}
    for task, result in (out or {}).get("results", {}).items():
        for metric in METRICS:
            value = result.get(f"{metric},none")
            if isinstance(value, int | float) and math.isfinite(value):
                metrics[f"{task}_{metric}"] = float(value)
    log.info("lm-eval: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics
