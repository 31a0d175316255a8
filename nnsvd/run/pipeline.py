"""The experiment: obtain a model → compress → (fine-tune) → evaluate → report.

``run_job`` is what run.py calls for every Hydra job; ``run_experiment`` is the linear flow.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nnsvd.cluster.requeue import hand_back, in_slurm_job, requeue_signal, restart_count, slurm_job_id
from nnsvd.config import (
    CompressMethod,
    Config,
    EvalConfig,
    RegularizerConfig,
    TrainConfig,
    check_known_keys,
    plain,
)
from nnsvd.errors import ConfigError, NNSVDError
from nnsvd.files import read_json, write_json_atomic
from nnsvd.lowrank import (
    LOWRANK,
    SYMMETRIC,
    BudgetError,
    CalibrationError,
    CompressionReport,
    LayerReport,
    RankError,
    StatisticsStoreError,
    SymmetricLowRankLinear,
    TargetError,
    factorized_layers,
    lowrank_from_scratch,
)
from nnsvd.lowrank.counting import param_summary
from nnsvd.models.checkpoint import KINDS, CheckpointInfo, checkpoint_info
from nnsvd.run.cache import cache_key, locked
from nnsvd.run.compression import check_compression, compress, data_aware, needs_calibration
from nnsvd.run.console import closing_line
from nnsvd.run.overrides import KIND_MODELS, KIND_OPTIONS, explicit_model_keys, override_items
from nnsvd.run.threads import set_job_threads
from nnsvd.tasks.base import Task, task_class
from nnsvd.tracking import (
    Tracker,
    flatten,
    main_metric,
    read_results,
    regularizer_label,
    run_group,
    wandb_group,
    write_results,
)
from nnsvd.training.resume import clear_train_state, has_train_state, load_train_state, save_train_state
from nnsvd.training.zero_shot import ZERO_SHOT_KEYS, check_tasks

log = logging.getLogger("nnsvd")

LAYERS_TABLE = "layers.txt"  # the per-layer report of a compress run, in its run directory
STOP = threading.Event()  # set by SIGTERM/SIGINT: training stops at the next boundary
_received: list[int] = []  # the signals that set it
_phase = ["between phases"]  # what the job is doing now (``doing``): says how a signal stops it
# Phases a signal lets finish (training: to its next boundary); the next phase that is not one of them then stops.
_DEFERRED = ("training", "saving", "between phases")
_finished: dict = {}  # the last training phase that ran to its end: kept if a later phase is interrupted


class Interrupted(BaseException):
    """A signal stopped the job: training with its state saved, any other phase at once. A BaseException,
    as KeyboardInterrupt is, so that no ``except Exception`` on the way (a logging handler, a loader that
    reports unreadable files) takes it for an error of its own."""


@contextmanager
def doing(name: str):
    """Mark the job's current phase (``evaluating the dense model``, ``training (dense)``, …): a
    SIGTERM or Ctrl-C during training stops at the next epoch or step and saves the state; during
    any other phase but saving it stops the job at once, and the message names the phase."""
    previous = _phase[0]
    try:
        _phase[0] = name
        if STOP.is_set() and not name.startswith(_DEFERRED):
            _stop_now(name)  # a signal that came while saving or training wrapped up
        yield
    finally:
        _phase[0] = previous


def _stop_now(phase: str) -> None:
    names = " and ".join(dict.fromkeys(signal.Signals(s).name for s in _received)) or "a signal"
    raise Interrupted(f"{names} received while {phase}: stopped there, nothing recorded as done. "
                      f"Run the same command with resume=true to redo it (a trained model is not trained again)")


# ------------------------------------------------------------------- settings


def resolve_device(name: str) -> torch.device:
    """auto → cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=auto or device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS is not available here; use device=auto or device=cpu")
    return device


def resolve_mode(config: Config) -> str:
    """The flow this run takes: dense, compress, scratch, or evaluate (a checkpoint as it is).

    mode=null means dense without a size (rank or compress.ratio) and compress with one; a
    checkpoint without a size is evaluated as it is, whatever it holds.
    """
    ratio, rank = config.compress.ratio, config.rank
    sized = rank is not None or ratio is not None
    mode = config.mode.value if config.mode is not None else ("compress" if sized else "dense")
    if mode in ("compress", "scratch") and not sized:
        raise ConfigError(
            f"mode={mode} needs a size: add rank=R (e.g. rank=8) or compress.ratio=F (e.g. compress.ratio=0.4)"
        )
    if mode == "dense" and sized:
        given = f"rank={rank}" if rank is not None else f"compress.ratio={ratio}"
        raise ConfigError(f"mode=dense compresses nothing (got {given}); use mode=compress or mode=scratch")
    if mode == "scratch" and config.checkpoint:
        raise ConfigError("mode=scratch trains from random init and takes no checkpoint; drop checkpoint=")
    return "evaluate" if mode == "dense" and config.checkpoint else mode


def absolute(path: str | None, start: Path) -> Path | None:
    """Relative paths are taken from the directory the command was started in, not Hydra's run dir."""
    if path is None:
        return None
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else (start / p).resolve()


def compress_label(config: Config, flow: str) -> str | None:
    """How a compress run sizes and factorizes, where not the default: ratio0.4-spectrum, whiten+seq…"""
    if flow != "compress":
        return None
    comp = config.compress
    parts = [] if comp.ratio is None else [f"ratio{comp.ratio:g}", comp.allocation.value]
    if comp.method != CompressMethod.auto:
        seq = data_aware(comp) and config.calibration.sequential
        update = f"+{comp.update.value}" if comp.update is not None else ""
        parts.append(comp.method.value + ("+seq" if seq else "") + update)
    return "-".join(parts) or None


def run_name(results: Mapping, flow: str, method: str | None = None) -> str:
    """The W&B run name: model, mode, rank, compress label, regularizer and seed
    (mlp-compress-r8-whiten-none-s42, mlp-compress-ratio0.4-spectrum-none-s42); a checkpoint
    evaluated as it is says so (…-s42-from-checkpoint)."""
    reg = results["regularizer"]
    rank = "" if results["rank"] is None else f"-r{results['rank']}"
    alpha = f"-a{reg['alpha']:g}" if (reg.get("alpha") or 0) > 0 else ""
    method = f"-{method}" if method else ""
    tail = "-from-checkpoint" if flow == "evaluate" else ""
    return f"{results['model']}-{results['mode']}{rank}{method}-{reg['label']}{alpha}-s{results['seed']}{tail}"


def describe_regularizer(reg: RegularizerConfig) -> dict:
    """The regularizer as results.json records it."""
    return {
        "name": reg.name,
        "label": regularizer_label(plain(reg)),
        "symmetric": reg.symmetric,
        "alpha": reg.alpha,
        "effective": True,
    }


def describe_checkpoint(info: CheckpointInfo) -> dict:
    """Mode, rank, regularizer and seed of a checkpoint: as saved with it, else read off its layers
    (a checkpoint from elsewhere: "dense" without factorized layers, "factorized" with)."""
    meta, layers = info.meta, info.layers
    ranks = {layer["rank"] for layer in layers}
    symmetric = any(layer["form"] == SYMMETRIC for layer in layers)
    mode = meta.get("mode") or "dense"
    if layers and mode == "dense":  # saved before meta was written, or with a mislabel
        mode = "factorized"
    rank = meta.get("rank")
    if rank is None and len(ranks) == 1:
        rank = next(iter(ranks))
    reg = meta.get("regularizer") or {
        "name": None, "label": "symmetric" if symmetric else "none", "symmetric": symmetric, "alpha": None,
        "effective": None,
    }
    return {
        "mode": mode,
        "rank": rank,
        "regularizer": reg,
        "seed": meta.get("seed"),
        "method": meta.get("method"),
        "made_in": meta.get("run_dir"),
    }


def check_checkpoint_kind(info: CheckpointInfo, model_name: str, choice: str | None) -> None:
    """A model= given with checkpoint= must build the checkpoint's kind of model."""
    if model_name not in KIND_MODELS[info.kind]:
        fits = " or ".join(f"model={option}" for option in KIND_OPTIONS[info.kind])
        builds = KINDS.get(model_name, model_name).split(" (")[0]
        raise ConfigError(
            f"checkpoint={info.path} holds {KINDS[info.kind]} checkpoint, but model={choice or model_name} "
            f"builds {builds}; drop model= (checkpoint= infers it) or use {fits}"
        )


def read_source(config: Config, flow: str, start: Path, model_choice: str | None,
                results: dict) -> CheckpointInfo | None:
    """The checkpoint= of this run, read from its JSON files before anything is loaded, and
    recorded in ``results``; an evaluated checkpoint labels the run as what it is."""
    if not config.checkpoint:
        return None
    source = checkpoint_info(absolute(config.checkpoint, start))
    check_checkpoint_kind(source, config.model.name, model_choice)
    described = describe_checkpoint(source)
    results["from_checkpoint"] = {"path": str(source.path), "kind": source.kind, **described}
    if flow == "evaluate":
        results.update({k: described[k] for k in ("mode", "rank", "regularizer")})
        results["seed"] = config.seed if described["seed"] is None else described["seed"]
    return source


def inherit_evaluation(config: Config, source: CheckpointInfo | None, overrides: list[str], results: dict) -> None:
    """checkpoint=RUN_DIR evaluates as the run that made it did: the eval.* settings saved in its
    .hydra/config.yaml replace this run's (``config.eval``), except those given on the command line."""
    saved = None if source is None else source.directory / ".hydra" / "config.yaml"
    if saved is None or not saved.is_file():
        return
    try:
        settings = OmegaConf.to_container(OmegaConf.load(saved).get("eval") or {}, resolve=True)
    except (OSError, ValueError, OmegaConfBaseException) as e:  # unreadable or unresolvable: this run's own stand
        log.warning("could not read the evaluation settings of %s (%s): using this run's", saved, e)
        return
    given = {key.lstrip("+~").split("=", 1)[0] for key in overrides}
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    current = plain(config.eval)
    taken = {k: v for k, v in settings.items() if k in known and f"eval.{k}" not in given and current[k] != v}
    if taken:
        config.eval = dataclasses.replace(config.eval, **taken)
        log.info("evaluating as the run that made the checkpoint did: %s",
                 " ".join(f"eval.{k}={v}" for k, v in taken.items()))
    results["eval_from"] = str(saved)


def _local_or_name(value: str | None, start: Path) -> str | None:
    """A path that exists relative to the start directory becomes absolute; a Hub name stays."""
    if value is None:
        return None
    path = absolute(value, start)
    return str(path) if path.exists() or value.startswith((".", "/", "~")) else value


def local_paths(config: Config, start: Path) -> Config:
    """``config`` with the data files made absolute and a model or tokenizer that is a local path
    (from the start directory) made absolute; Hub names stay. The dense-cache key is made from these."""
    data, model = plain(config.data), plain(config.model)
    files = {k: str(absolute(data[k], start)) for k in ("train_file", "validation_file", "test_file") if data.get(k)}
    names = {k: _local_or_name(model[k], start) for k in ("name_or_path", "tokenizer") if k in model}
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **files),
                               model=dataclasses.replace(config.model, **names))


def make_task(config: Config, device: torch.device, start: Path) -> Task:
    """The task of ``model.name``, for a config whose paths ``local_paths`` has made absolute."""
    data_root = absolute(config.data.root, start)
    cache_dir = absolute(config.cache.dir, start)
    return task_class(config.model.name)(config, data_root, device, cache_dir)


# ------------------------------------------------------------------ the flows


def _data_key(data: object) -> dict:
    """The data settings a trained model depends on: not where the data lies or whether it may be downloaded."""
    return {k: v for k, v in plain(data).items() if k not in ("root", "download")}


def dense_cache_entry(config: Config, cache_dir: Path, weights: str | None = None) -> Path:
    """Cache slot of the dense model trained with this model/data/train config and seed; for a
    model used as it is, ``weights`` (what was loaded) is part of the key too."""
    model = {k: v for k, v in plain(config.model).items() if k not in ("targets", "sample_prompt", "sample_tokens")}
    parts = {"model": model, "data": _data_key(config.data), "train": plain(config.train), "seed": config.seed}
    key = cache_key(parts if weights is None else {**parts, "weights": weights})
    return cache_dir / "dense" / f"{config.model.name}-{key}"


def obtain_dense(task: Task, config: Config, start: Path, tracker: Tracker, results: dict, run_dir: Path,
                 fresh: torch.nn.Module) -> tuple[torch.nn.Module, Path | None]:
    """(the dense model, its dense-cache entry or None): from the dense cache, else ``fresh`` (a
    just-built model) trained now. A model with nothing to train (a pretrained one) is used as it
    is; its entry then holds only its cached evaluations."""
    cache_dir = absolute(config.cache.dir, start)
    if task.length(config.train) == 0:
        results["dense_source"] = "built"
        entry = dense_cache_entry(config, cache_dir, task.weights) if config.cache.dense else None
        return fresh, entry
    if not config.cache.dense:
        results["dense_source"] = "trained"
        return _train_dense(task, fresh, config, tracker, results, run_dir), None
    entry = dense_cache_entry(config, cache_dir)
    # parallel jobs wait here instead of training the same model twice
    with doing("getting the dense model from the cache"), locked(entry):
        if entry.is_dir():
            model, _ = task.load(entry)
            results["dense_source"] = f"cache:{entry}"
            log.info("dense model loaded from cache %s", entry)
            return model, entry
        model = _train_dense(task, fresh, config, tracker, results, run_dir)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")  # atomic: readers never see half a model
        meta = {"model": config.model.name, "mode": "dense", "rank": None, "seed": config.seed,
                "train": plain(config.train)}
        with doing("saving the dense model to the cache"):
            task.save(model, tmp, meta=meta)
            os.replace(tmp, entry)
        _finished.clear()  # the cache holds it: an interrupted later phase need not keep a copy
        results["dense_source"] = f"trained, cached at {entry}"
        log.info("dense model trained and cached at %s", entry)
        return model, entry


def evaluate_dense(task: Task, model: torch.nn.Module, config: Config, entry: Path | None,
                   device: torch.device) -> dict:
    """The dense model's metrics, kept beside it in the dense cache (keyed by the evaluation and
    data settings and the device type) so that the jobs of a sweep evaluate it once."""
    if entry is None:
        return task.evaluate(model)
    evaluation = plain(config.eval)
    if not evaluation.get("tasks"):  # without zero-shot tasks: the key the cache had before those keys existed
        for key in ZERO_SHOT_KEYS:
            evaluation.pop(key, None)
    parts = {"eval": evaluation, "data": _data_key(config.data), "device": device.type}
    path = entry / f"eval-{cache_key(parts)}.json"
    with locked(path):
        cached = read_json(path)
        if cached is not None:
            log.info("dense metrics from the cache (%s)", path.name)
            return cached
        metrics = task.evaluate(model)
        write_json_atomic(path, metrics)
        return metrics


def _train_dense(task: Task, model: torch.nn.Module, config: Config, tracker: Tracker, results: dict,
                 run_dir: Path) -> torch.nn.Module:
    return train_phase(task, model, "dense", config.train, 0.0, tracker, results, run_dir, config.resume)


def train_phase(
    task: Task, model: torch.nn.Module, phase: str, train_cfg: TrainConfig, alpha: float, tracker: Tracker,
    results: dict, run_dir: Path, resume: bool,
) -> torch.nn.Module:
    """Train ``model`` for one phase (dense, scratch, finetune), resumable after a signal.

    With resume, a state saved by an interrupted run of this phase is loaded first (weights,
    optimizer, RNG, epochs done), so the result equals an uninterrupted run's.
    """
    saved = load_train_state(run_dir, phase, task.load) if resume else None
    resume_state = None
    if saved is not None:
        model, resume_state = saved
        if resume_state.get("finished"):
            log.info("resume: %s training had finished before the stop; its model is loaded from %s", phase, run_dir)
            results["history"][phase] = resume_state["history"]
            _finished.update(phase=phase, model=model, save=task.save, history=resume_state["history"])
            return model
        done = resume_state.get("epoch", resume_state.get("step"))
        log.info("resuming %s training after %s %d from %s", phase, task.length_key, done, run_dir)
    lr_key = "finetune.lr" if phase == "finetune" else "train.lr"
    with doing(f"training ({phase})"):
        out = task.train(
            model, train_cfg, alpha=alpha, log_fn=_logger(tracker, phase), desc=phase, lr_key=lr_key,
            should_stop=STOP.is_set, resume_state=resume_state,
        )
    results["timing"]["train_s"] += out.train_s
    results["history"][phase] = out.history
    if not out.interrupted:
        if saved is not None:
            clear_train_state(run_dir)  # the state this phase resumed from is done with
        _finished.update(phase=phase, model=model, save=task.save, history=out.history)
    if out.interrupted:
        where = save_train_state(run_dir, phase, model, task.save, out.resume_state)
        raise Interrupted(
            f"{phase} training stopped after {out.epochs} {task.length_key}; state saved in {where}. "
            f"Continue with the same command plus resume=true (and hydra.run.dir={run_dir} for a single run)"
        )
    return model


def _logger(tracker: Tracker, phase: str):
    def log_fn(record: dict) -> None:
        tracker.log({f"{phase}/{k}": v for k, v in record.items()})
        log.info("%s %s", phase, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    return log_fn


def run_experiment(
    config: Config, flow: str, source: CheckpointInfo | None, run_dir: Path, start: Path, tracker: Tracker,
    results: dict,
) -> None:
    """The linear flow. Fills ``results`` in place so a failure keeps what was measured."""
    reg = config.regularizer
    alpha, symmetric = float(reg.alpha), bool(reg.symmetric)
    rank = config.rank
    timing = results["timing"]
    device = resolve_device(config.device)
    results["device"] = str(device)

    if config.eval.tasks and config.model.name == "mlp":
        raise ConfigError(f"eval.tasks={list(config.eval.tasks)} scores language models with lm-eval; model=mlp "
                          "is scored by accuracy: use eval.tasks=null")
    zero_shot = check_tasks(plain(config.eval), start)  # lm-eval present, every task known: before any data or model
    config = local_paths(config, start)
    task = make_task(config, device, start)
    task.zero_shot = zero_shot
    results["weights"] = task.weights
    results["main_metric_name"] = task.main_metric
    torch.manual_seed(config.seed)
    with doing("loading the model"):
        if source is not None:
            model, _ = task.open_checkpoint(source.path, explicit_model_keys(results["overrides"]))
            results["dense_source"] = f"checkpoint:{source.path}"
        else:
            model = task.build()  # random init (or pretrained): the model trained below
    # Validate targets, ranks and compression settings on the architecture before any data is read or any training.
    targets: list[str] = []
    if flow in ("compress", "scratch"):
        targets = task.targets(model)  # model.targets, or (causal_lm, null) the model type's defaults
        rank = check_compression(config, flow, task, model, targets, symmetric)  # the rank, uniform ranks, or None (allocated later)
    with doing("reading the data"):
        task.prepare()  # loads the data: a missing dataset fails here
        batches = None
        if needs_calibration(config.compress, flow):
            batches = task.calibration_batches(config.calibration, model)  # drawn now: a bad setting fails before training
    if flow == "compress" and alpha > 0 and task.length(config.finetune) == 0:
        log.warning(
            "regularizer.alpha=%g has no effect: compress mode applies the orthonormal penalty only while "
            "fine-tuning; set finetune.%s > 0", alpha, task.length_key,
        )
        results["regularizer"]["effective"] = False

    metrics = results["metrics"]
    report, entry = None, None
    if flow == "scratch":
        report = lowrank_from_scratch(model, targets, rank, symmetric=symmetric)
        model = train_phase(task, model, "scratch", config.train, alpha, tracker, results, run_dir, config.resume)
    elif flow == "evaluate":
        report = structure_report(model)
    elif source is None:
        model, entry = obtain_dense(task, config, start, tracker, results, run_dir, fresh=model)

    t = time.perf_counter()
    with doing("evaluating the dense model" if flow in ("dense", "compress") else f"evaluating the {flow} model"):
        final = evaluate_dense(task, model, config, entry, device) if flow in ("dense", "compress") else task.evaluate(model)
    timing["eval_s"] += time.perf_counter() - t

    if flow == "compress":
        metrics.update({f"dense_{k}": v for k, v in final.items()})
        dense = copy.deepcopy(model) if task.supports_bound else None
        if _finished.get("phase") == "dense":
            _finished.clear()  # compression changes that model in place: it is no longer the trained dense one
        t = time.perf_counter()
        with doing("calibrating and compressing"):
            report, results["compress"] = compress(task, model, config, targets, symmetric, batches,
                                                   absolute(config.cache.dir, start))
        timing["compress_s"] = time.perf_counter() - t
        (run_dir / LAYERS_TABLE).write_text(f"{report}\n")
        log.info("compressed %d layers in %.2fs (every layer: %s)\n%s", len(report.layers), timing["compress_s"],
                 run_dir / LAYERS_TABLE, report.summary())
        t = time.perf_counter()
        with doing("evaluating the compressed model"):
            final = task.evaluate(model)
        timing["eval_s"] += time.perf_counter() - t
        metrics.update({f"compressed_{k}": v for k, v in final.items()})
        if task.length(config.finetune) > 0:
            model = train_phase(task, model, "finetune", config.finetune, alpha, tracker, results, run_dir,
                                config.resume)
            t = time.perf_counter()
            with doing("evaluating the fine-tuned model"):
                final = task.evaluate(model)
            timing["eval_s"] += time.perf_counter() - t
            metrics.update({f"finetuned_{k}": v for k, v in final.items()})
        if dense is not None:
            with doing("checking the error bound"):
                results["bound"] = task.bound(dense, model)
        del dense

    metrics.update(final)
    results["params"] = param_summary(model).to_dict()
    if report is not None:
        results["layers"] = report.to_rows()
    if task.supports_sample:
        with doing("generating the sample"):
            results["sample"] = task.sample(model)
        tracker.text("sample", results["sample"])

    if should_save(config, flow):
        with doing("saving the model"):
            meta = checkpoint_meta(config, flow, results, run_dir)
            results["checkpoint"] = str(task.save(model, run_dir, meta=meta))
    clear_train_state(run_dir)


def should_save(config: Config, flow: str) -> bool:
    """save=null writes the model of every run that made one (dense, compress, scratch), not of a
    checkpoint evaluated as it is (its copy would be the checkpoint again)."""
    return flow != "evaluate" if config.save is None else bool(config.save)


def structure_report(model: torch.nn.Module) -> CompressionReport:
    """The factorized layers of a loaded model, as a report (nothing was compressed in this run)."""
    report = CompressionReport()
    for name, layer in factorized_layers(model):
        (out_f, in_f), bias = (layer.out_features, layer.in_features), layer.bias
        before = out_f * in_f + (0 if bias is None else bias.numel())
        after = sum(p.numel() for p in layer.parameters())
        form = SYMMETRIC if isinstance(layer, SymmetricLowRankLinear) else LOWRANK
        report.layers.append(LayerReport(name, (out_f, in_f), layer.rank, form, before, after, method="checkpoint"))
    return report


def checkpoint_meta(config: Config, flow: str, results: Mapping, run_dir: Path) -> dict:
    """What is saved with a model so that a later checkpoint= run can say what it is."""
    source = results.get("from_checkpoint") or {}
    method = {"compress": config.compress.method.value, "evaluate": source.get("method")}.get(flow)
    return {
        "model": results["model"],
        "mode": results["mode"],
        "rank": results["rank"],
        "regularizer": results["regularizer"],
        "method": method,
        "seed": results["seed"],
        "run_dir": str(run_dir),
        "dense_source": results.get("dense_source"),
        "from_checkpoint": source.get("path"),
    }


# ------------------------------------------------------------------ the job


def _install_stop_handlers():
    """SIGTERM (how SLURM preempts) and SIGINT ask training to stop and save; a second SIGINT
    stops at once. In a SLURM job of submitit's, so does submitit's time-limit signal (USR2), whose
    own handler runs once the state is saved (``requeue.hand_back``). Returns a function that
    restores the previous handlers."""
    STOP.clear()
    _received.clear()
    _finished.clear()
    _phase[0] = "between phases"
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def request_stop(signum, frame):
        if STOP.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _received.append(signum)
        STOP.set()
        name, phase = signal.Signals(signum).name, _phase[0]
        if phase.startswith("training"):
            log.warning("%s received while %s: stopping at the next epoch or step and saving the state", name, phase)
        elif phase.startswith(_DEFERRED):
            log.warning("%s received while %s: stopping once that is done", name, phase)
        else:
            log.warning("%s received while %s: stopping now", name, phase)
            _stop_now(phase)

    signals = [signal.SIGTERM, signal.SIGINT]
    if (usr := requeue_signal()) is not None:
        signals.append(usr)
    previous = {sig: signal.signal(sig, request_stop) for sig in signals}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def keep_finished_training(run_dir: Path) -> None:
    """A phase after training was interrupted: save the trained model in the run directory, so
    that resume=true redoes only that phase (a dense model in the dense cache needs nothing)."""
    if not _finished or has_train_state(run_dir):
        return
    state = {"finished": True, "history": _finished["history"]}
    where = save_train_state(run_dir, _finished["phase"], _finished["model"], _finished["save"], state)
    log.info("the %s training had finished: its model is kept in %s for resume=true", _finished["phase"], where)


def default_group(hc, multirun: bool) -> str:
    """The W&B group when wandb.group is null: the sweep's, or a single run's own (dated)."""
    if multirun:
        return wandb_group(hc.sweep.dir)
    exclude = hc.job.config.override_dirname.exclude_keys
    return run_group(datetime.now(), override_items(hc.overrides.task, exclude))


def run_job(cfg: DictConfig) -> float | None:
    """Run one configured experiment; record it whatever happens.

    Returns the main metric on success. On failure the error is logged as one line,
    results.json says "failed", the W&B run is marked failed, and — for a single run —
    the process exits with status 1 (in a multirun the sweep goes on).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    start = Path(hc.runtime.cwd)
    multirun = hc.mode == RunMode.MULTIRUN
    config: Config = OmegaConf.to_object(cfg)
    set_job_threads(OmegaConf.to_container(hc.launcher), multirun)  # parallel jobs share the cores

    if restart_count() and not config.resume:
        # SLURM ran this job before, in this job dir: never start over what it saved.
        config.resume = True
        if has_train_state(run_dir) or (read_results(run_dir) or {}).get("status") == "ok":
            log.info("SLURM requeued job %s (restart %d): continuing where it stopped, as with resume=true",
                     slurm_job_id(), restart_count())
        else:
            log.warning("SLURM requeued job %s (restart %d) but %s holds no saved state (the job was killed before "
                        "it could save): starting over", slurm_job_id(), restart_count(), run_dir)
    if config.resume:
        previous = read_results(run_dir)
        if previous and previous.get("status") == "ok":
            log.info("resume: %s already finished ok; skipping", run_dir)
            return previous.get("main_metric")

    results: dict = {
        "status": "running",
        "error": None,
        "model": config.model.name,
        "mode": None,  # what the model is: dense, compress, scratch (or a checkpoint's)
        "flow": None,  # what this run did: dense, compress, scratch, or evaluate (a checkpoint as it is)
        "rank": config.rank,
        "regularizer": describe_regularizer(config.regularizer),
        "seed": config.seed,
        "from_checkpoint": None,
        "weights": None,
        "eval_from": None,
        "overrides": list(hc.overrides.task),
        "main_metric_name": None,  # the task's: which of the metrics main_metric is
        "metrics": {},
        "params": {},
        "bound": None,
        "compress": None,
        "layers": [],
        "timing": {"train_s": 0.0, "compress_s": 0.0, "eval_s": 0.0, "total_s": 0.0},
        "checkpoint": None,
        "history": {},
        "run_dir": str(run_dir),
        "threads": torch.get_num_threads(),  # CPU results depend on it (the order of float sums in training)
    }
    started = time.perf_counter()
    tracker = None
    ok = False
    restore = _install_stop_handlers()
    try:
        check_known_keys(cfg)  # +rnak=8 would otherwise be ignored
        flow = resolve_mode(config)
        results["flow"] = flow
        results["mode"] = None if flow == "evaluate" else flow  # evaluate: the checkpoint's, below
        source = read_source(config, flow, start, hc.runtime.choices.get("model"), results)
        inherit_evaluation(config, source, results["overrides"], results)
        wandb = config.wandb
        tracker = Tracker(
            mode=wandb.mode.value,
            project=wandb.project,
            entity=wandb.entity,
            group=wandb.group or default_group(hc, multirun),
            name=run_name(results, flow, compress_label(config, flow)),
            job_type=flow,
            tags=list(wandb.tags),
            config={**plain(config), **{k: results[k] for k in ("mode", "rank", "regularizer", "from_checkpoint")}},
            run_dir=run_dir,
        )
        run_experiment(config, flow, source, run_dir, start, tracker, results)
        ok = True
        results["status"] = "ok"
    except (NNSVDError, RankError, TargetError, CalibrationError, BudgetError, StatisticsStoreError) as exc:
        results["status"], results["error"] = "failed", str(exc)
    except Interrupted as exc:
        results["status"], results["error"] = "interrupted", str(exc)
        keep_finished_training(run_dir)
    except KeyboardInterrupt:
        results["status"], results["error"] = "interrupted", "interrupted before training could save its state"
    except Exception as exc:  # a bug, not bad input: keep the traceback in the run directory
        (run_dir / "traceback.txt").write_text(traceback.format_exc())
        results["status"] = "failed"
        results["error"] = f"{type(exc).__name__}: {exc} (traceback in {run_dir / 'traceback.txt'})"
    finally:
        _phase[0] = "between phases"
        results["timing"]["total_s"] = time.perf_counter() - started
        main = main_metric(results)
        results["main_metric"] = main
        write_results(run_dir, results)
        if tracker is not None:
            if ok:
                tracker.summary(flatten({k: results[k] for k in ("metrics", "params", "timing")}))
                for key in ("bound", "compress"):
                    if results.get(key):
                        tracker.summary(flatten({key: results[key]}))
                tracker.table("layers", results["layers"])
            tracker.finish(ok)
        restore()
    if ok:
        log.info("metrics: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in results["metrics"].items()})
    # The last line of every run: where it is, and its main metric or its error (stderr on failure).
    log.log(logging.INFO if ok else logging.ERROR, "%s", closing_line(results, run_dir, start))
    if not ok:
        if multirun:
            if signal.SIGINT in _received:
                raise KeyboardInterrupt  # Ctrl-C stops the whole sweep; resume=true picks it up
            if results["status"] == "interrupted" and in_slurm_job():
                hand_back(_received)  # requeue: the next run continues from the saved state
            return None
        sys.exit(1)
    return main
