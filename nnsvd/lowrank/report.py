"""What compression did to each layer: the per-layer report and its totals."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

SHORT = 12  # reports of at most this many layers are short enough to print whole


@dataclass
class LayerReport:
    """One replaced layer: what it became and what it cost."""

    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    form: str  # "lowrank" or "symmetric"
    params_before: int
    params_after: int
    rel_fro_error: float | None = None  # ‖W − Ŵ‖_F / ‖W‖_F
    sigma_r1: float | None = None  # σ_{r+1}(W): the spectral error of the plain form
    method: str = ""
    time_s: float = 0.0
    calib_tokens: int | None = None  # calibration rows (tokens or images) behind a data-aware factorization
    damping: float | None = None  # λ added to XᵀX (whitening)
    rel_data_error: float | None = None  # ‖(W − Ŵ)·Xᵀ‖_F / ‖W·Xᵀ‖_F on the calibration data


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    memory_estimate: int | None = None  # block-by-block calibration: estimated peak bytes beyond the model
    statistics_cached: bool = False  # the calibration statistics were read from a StatisticsStore
    blocks: list[dict] = field(default_factory=list)  # compress.update=block: each block's held-out error, before/after

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def time_s(self) -> float:
        return sum(layer.time_s for layer in self.layers)

    def forms(self) -> dict[str, str]:
        return {layer.name: layer.form for layer in self.layers}

    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers}

    def to_rows(self) -> list[dict]:
        rows = []
        for layer in self.layers:
            row = asdict(layer)
            row["shape"] = f"{layer.shape[0]}x{layer.shape[1]}"
            rows.append(row)
        return rows

    def summary(self) -> str:
        """The whole table for a few layers; for many, one line per layer kind (block indices as ``*``)
        with its count, ranks and errors."""
        if len(self.layers) <= SHORT:
            return str(self)
        kinds: dict[str, list[LayerReport]] = {}
        for layer in self.layers:
            kinds.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", layer.name), []).append(layer)
        lines = [f"{'layers':<40} {'count':>5} {'ranks':>11} {'rel err':>15}"]
        for kind, layers in kinds.items():
            ranks = sorted(layer.rank for layer in layers)
            errors = sorted(layer.rel_fro_error for layer in layers if layer.rel_fro_error is not None)
            span = f"{ranks[0]}" if ranks[0] == ranks[-1] else f"{ranks[0]}–{ranks[-1]}"
            err = "-" if not errors else f"{errors[0]:.3f}–{errors[-1]:.3f}"
            lines.append(f"{kind:<40} {len(layers):>5} {span:>11} {err:>15}")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"{'layer':<34} {'shape':>10} {'rank':>5} {'form':>9} {'params':>17} {'rel err':>8}"
        lines = [head]
        for r in self.to_rows():
            err = "-" if r["rel_fro_error"] is None else f"{r['rel_fro_error']:.4f}"
            params = f"{r['params_before']}→{r['params_after']}"
            lines.append(
                f"{r['name']:<34} {r['shape']:>10} {r['rank']:>5} {r['form']:>9} "
                f"{params:>17} {err:>8}"
            )
        return "\n".join(lines)


