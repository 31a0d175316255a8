"""MNIST as in-memory tensors: loaded once from torchvision's files, batched on the device."""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nnsvd.errors import DataError

log = logging.getLogger(__name__)

MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel statistics


@dataclass
class MNISTSplits:
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor


def _cause(exc: BaseException) -> str:
    """One line for an error whose text may span lines. torchvision's download error is
    "Error downloading X:" then "Tried <mirror>, got:" / "<the error>" per mirror: keep the
    first line and the last error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"


def _read(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import MNIST

    # torchvision creates root/MNIST/raw before downloading; a failed download must not leave them behind
    created = [d for d in (root, root / "MNIST", root / "MNIST" / "raw") if not d.exists()]
    try:
        ds = MNIST(root=str(root), train=train, download=download)
    except Exception as exc:  # torchvision raises RuntimeError or URLError, among others
        if created:  # the topmost folder this call made, and what torchvision put in it
            shutil.rmtree(created[0], ignore_errors=True)
        how = "downloading it failed" if download else "data.download=false"
        raise DataError(
            f"MNIST not found in {root}/MNIST/raw and {how} ({_cause(exc)}); "
            f"set data.root (or NNSVD_DATA_ROOT) to a folder holding mnist/MNIST/raw/*.gz"
        ) from exc
    return ds.data, ds.targets


def _unpack_lock(root: Path):
    """Parallel jobs of a sweep on a fresh data root: one unpacks the .gz files, the others wait
    (torchvision unpacks in place, and a job reading a half-written file fails). Nothing is
    unpacked into a folder that is missing or read-only, so there is nothing to lock there."""
    from filelock import FileLock

    raw = root / "MNIST" / "raw"
    return FileLock(str(raw / ".unpack.lock")) if raw.is_dir() and os.access(raw, os.W_OK) else nullcontext()


def load_mnist(
    root: str | Path, *, val_size: int = 5000, seed: int = 42, download: bool = True, device: str | torch.device = "cpu"
) -> MNISTSplits:
    """Train/val/test tensors: images flattened to 784 floats, normalized (x/255 − μ)/σ.

    ``root`` is the folder holding torchvision's ``MNIST/raw`` (i.e. ``<data.root>/mnist``).
    The 60k training images are split by a seeded permutation into 60k − val_size / val_size.
    """
    root = Path(root)
    with _unpack_lock(root):
        train_x, train_y = _read(root, True, download)
        test_x, test_y = _read(root, False, download)
    if not 0 < val_size < len(train_x):
        raise DataError(f"data.val_size={val_size} must be between 1 and {len(train_x) - 1}")

    def prep(x: Tensor) -> Tensor:
        return ((x.flatten(1).float() / 255.0 - MEAN) / STD).to(device)

    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    return MNISTSplits(
        train_x=prep(train_x[train_idx]),
        train_y=train_y[train_idx].to(device),
        val_x=prep(train_x[val_idx]),
        val_y=train_y[val_idx].to(device),
        test_x=prep(test_x),
        test_y=test_y.to(device),
    )
