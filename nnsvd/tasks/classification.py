"""MNIST classification with the MLP: build, train, evaluate, bound, save and load."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nnsvd.config import CalibrationConfig, Config, MLPConfig, MNISTDataConfig, TrainConfig, plain
from nnsvd.data.calibration import draw_samples
from nnsvd.data.mnist import MNISTSplits, load_mnist
from nnsvd.errors import DataError
from nnsvd.lowrank.bounds import output_error_bound
from nnsvd.models.checkpoint import load_checkpoint, save_checkpoint
from nnsvd.models.mlp import MLP
from nnsvd.tasks.base import Task
from nnsvd.training.classification import TrainResult, evaluate_classifier, train_classifier

log = logging.getLogger(__name__)

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def build_mlp(model_cfg: Mapping) -> MLP:
    """The MLP of a model config as model.json keeps it."""
    return MLP(
        in_features=model_cfg["in_features"],
        hidden=model_cfg["hidden"],
        num_classes=model_cfg["num_classes"],
        dropout=model_cfg["dropout"],
    )


def _load_splits(mnist_root: Path, data_cfg: MNISTDataConfig, seed: int, device: torch.device,
                 cache_dir: Path | None) -> MNISTSplits:
    """MNIST tensors, through a safetensors copy in the cache so later runs skip torchvision."""
    raw = mnist_root / "MNIST" / "raw"
    stamp = [(f, (raw / f).stat().st_size) for f in RAW_FILES if (raw / f).exists()]
    cached = None
    if cache_dir is not None and len(stamp) == len(RAW_FILES):
        key = hashlib.sha256(repr((str(raw.resolve()), stamp, data_cfg.val_size, seed)).encode()).hexdigest()[:16]
        cached = cache_dir / "mnist" / f"splits-{key}.safetensors"
        if cached.is_file():
            try:
                t = load_file(str(cached), device=str(device))
                return MNISTSplits(**t)
            except Exception as exc:  # a damaged cache file is rebuilt, never trusted
                log.warning("ignoring unreadable MNIST cache %s (%s)", cached, exc)
    splits = load_mnist(
        mnist_root, val_size=data_cfg.val_size, seed=seed, download=data_cfg.download, device=device
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")  # parallel jobs never share a temp file
        save_file({k: v.contiguous().cpu() for k, v in vars(splits).items()}, str(tmp))
        tmp.replace(cached)
    return splits


class ClassificationTask(Task):
    """The MNIST MLP experiment. Main metric: test accuracy (higher is better)."""

    main_metric = "test_acc"
    higher_is_better = True
    length_key = "epochs"
    calibrates_by_block = False  # data-aware compression calibrates the whole MLP at once (or l1, then l2)
    supports_bound = True

    def __init__(self, cfg: Config, data_root: Path, device: torch.device, cache_dir: Path | None):
        self.model_cfg: MLPConfig = cfg.model
        self.data_cfg: MNISTDataConfig = cfg.data
        self.data_root, self.cache_dir = data_root, cache_dir
        self.eval_batch = cfg.eval.batch_size
        self.eval_validation = cfg.eval.validation
        self.device = device
        self.seed = cfg.seed
        self.data: MNISTSplits | None = None

    def length(self, train: TrainConfig) -> int:
        return train.epochs

    def prepare(self) -> None:
        """Load MNIST (a missing or unreadable dataset fails here).

        data.root itself must exist: MNIST may be downloaded into it, but nothing is created
        under a folder that is not there (a typo in data.root would otherwise make one)."""
        root = self.data_root
        if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
            what = "is not a readable directory" if root.exists() else "does not exist"
            raise DataError(
                f"data.root={root} {what}; set data.root (or NNSVD_DATA_ROOT) to the folder holding "
                "mnist/MNIST/raw/*.gz, or to an existing folder to download MNIST into"
            )
        self.data = _load_splits(self.data_root / "mnist", self.data_cfg, self.seed, self.device, self.cache_dir)

    def build(self) -> nn.Module:
        return build_mlp(plain(self.model_cfg)).to(self.device)

    def targets(self, model: nn.Module) -> list[str]:
        return list(self.model_cfg.targets)

    def train(
        self, model: nn.Module, train_cfg: TrainConfig, *, alpha: float, log_fn: Callable[[dict], None], desc: str,
        lr_key: str, should_stop: Callable[[], bool] | None = None, resume_state: dict | None = None,
    ) -> TrainResult:
        d = self.data
        return train_classifier(
            model,
            d.train_x,
            d.train_y,
            epochs=train_cfg.epochs,
            batch_size=train_cfg.batch_size,
            lr=train_cfg.lr,
            weight_decay=train_cfg.weight_decay,
            alpha=alpha,
            seed=self.seed,
            evaluate=lambda m: {"val/acc": evaluate_classifier(m, d.val_x, d.val_y, self.eval_batch)[0]},
            log=log_fn,
            desc=desc,
            lr_key=lr_key,
            resume_state=resume_state,
            should_stop=should_stop,
        )

    def evaluate(self, model: nn.Module) -> dict:
        d = self.data
        test_acc, test_loss = evaluate_classifier(model, d.test_x, d.test_y, self.eval_batch)
        metrics = {"test_acc": test_acc, "test_loss": test_loss}
        if self.eval_validation:
            metrics["val_acc"] = evaluate_classifier(model, d.val_x, d.val_y, self.eval_batch)[0]
        return metrics

    def calibration_batches(self, cal: CalibrationConfig, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """``cal.samples`` images of the training data (never test), drawn with ``cal.seed``, in batches."""
        d = self.data
        x, y = (d.train_x, d.train_y) if cal.split == "train" else (d.val_x, d.val_y)
        idx = draw_samples(len(x), cal, unit="images")
        return list(zip(x[idx].split(cal.batch_size), y[idx].split(cal.batch_size)))

    @staticmethod
    def calibration_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def bound(self, dense: nn.Module, compressed: nn.Module) -> dict:
        """Measured output error and both Lipschitz bounds over the test set (mean and max)."""
        return output_error_bound(dense.linear_layers(), compressed.linear_layers(), self.data.test_x).summary()

    def save(self, model: nn.Module, directory: Path, meta: Mapping | None = None) -> Path:
        return save_checkpoint(model, directory, plain(self.model_cfg), meta)

    def load(self, path: str | Path) -> tuple[nn.Module, dict]:
        """A model this run saved (dense cache, interrupted state): of this run's architecture."""
        model, record = load_checkpoint(path, build_mlp, plain(self.model_cfg))
        return model.to(self.device), record

    def open_checkpoint(self, path: str | Path, explicit: set[str]) -> tuple[nn.Module, dict]:
        """The user's checkpoint=: its own architecture is used; model.* keys given on the
        command line (``explicit``) must agree with it."""
        given = plain(self.model_cfg)
        model, record = load_checkpoint(path, build_mlp, {k: v for k, v in given.items() if k in explicit})
        known = {f.name for f in fields(MLPConfig)}
        saved = {k: v for k, v in record["model"].items() if k in known and k != "targets" and k not in explicit}
        self.model_cfg = replace(self.model_cfg, **saved)
        return model.to(self.device), record
