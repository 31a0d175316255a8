"""Calibration statistics kept on disk, so that the jobs of a sweep measure them once.

The dense model's statistics (the Grams XᵀX, ASVD's Σ|x|, the token counts, FWSVD's Fisher
rows) do not depend on the rank, the ratio, the allocation or the method's options: only on the
weights, the targets and the calibration batches. A ``StatisticsStore`` is a folder that holds
them for one such combination (the caller keys the folder), one safetensors file per part
(a decoder block: ``block3.safetensors``) and one for the Fisher rows (``fisher.safetensors``).

Layers that share an input (q/k/v; gate/up) share one InputStats in memory and one entry on
disk, and get one shared object back. The tensors are float64 and read back bit for bit, so a
factorization from stored statistics equals the one from fresh statistics exactly. Files are
written to a temporary name and renamed: a reader never sees half a file, and two jobs that
write the same part write the same bytes. Only safetensors is read: no pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from nnsvd.lowrank.calibration import InputStats, LayerStats

FISHER = "fisher"


class StatisticsStore:
    """A folder of one model's calibration statistics, one file per part (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.reads = 0  # files read back: a caller's record of whether the statistics came from here

    def _path(self, part: str) -> Path:
        return self.root / f"{part}.safetensors"

    def has(self, part: str) -> bool:
        return self._path(part).is_file()

    def save(self, part: str, stats: Mapping[str, LayerStats]) -> None:
        """Write the parts' statistics (their inputs; Fisher rows go through ``save_fisher``)."""
        index: dict[int, int] = {}
        tensors: dict[str, Tensor] = {}
        layers: dict[str, int] = {}
        tokens: dict[str, int] = {}
        for name, layer in stats.items():
            key = id(layer.inputs)
            if key not in index:
                i = index[key] = len(index)
                tensors[f"{i}.gram"] = layer.inputs.gram.detach().cpu().contiguous()
                tensors[f"{i}.abs_sum"] = layer.inputs.abs_sum.detach().cpu().contiguous()
                tokens[str(i)] = layer.inputs.tokens
            layers[name] = index[key]
        self._write(part, tensors, {"layers": json.dumps(layers), "tokens": json.dumps(tokens)})

    def load(self, part: str, device=None) -> dict[str, LayerStats]:
        """The part's {name: LayerStats}; layers that shared an input share one InputStats again."""
        tensors, meta = self._read(part)
        tokens = json.loads(meta["tokens"])
        inputs = {
            i: InputStats(tensors[f"{i}.gram"].to(device), tensors[f"{i}.abs_sum"].to(device), int(n))
            for i, n in tokens.items()
        }
        return {name: LayerStats(inputs[str(i)]) for name, i in json.loads(meta["layers"]).items()}

    def has_fisher(self) -> bool:
        return self.has(FISHER)

    def save_fisher(self, rows: Mapping[str, Tensor]) -> None:
        self._write(FISHER, {name: t.detach().cpu().contiguous() for name, t in rows.items()}, {})

    def load_fisher(self, device=None) -> dict[str, Tensor]:
        tensors, _ = self._read(FISHER)
        return {name: t.to(device) for name, t in tensors.items()}

    def _write(self, part: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        path = self._path(part)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)

    def _read(self, part: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        path = self._path(part)
        self.reads += 1
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (OSError, SafetensorError, KeyError, ValueError) as e:
            raise StatisticsStoreError(
                f"calibration statistics {path} cannot be read ({e}); delete that folder to measure them again"
            ) from None
        return tensors, meta


class StatisticsStoreError(RuntimeError):
    """A stored statistics file that cannot be read."""
