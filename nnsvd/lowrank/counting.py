"""Parameter and multiply-accumulate counts, dense versus factorized."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from nnsvd.lowrank import (
    LowRankLinear,
    SymmetricLowRankLinear,
    factorized_layers,
    is_factorizable,
    linear_weight,
)


def count_params(model: nn.Module) -> int:
    """Parameters of the model; tied (shared) tensors count once."""
    return sum(p.numel() for p in model.parameters())


def layer_macs(module: nn.Module) -> int:
    """Multiply-accumulates per input row: out·in dense, r·(out+in) factorized, 2·n·r tied."""
    if isinstance(module, LowRankLinear):
        return module.rank * (module.in_features + module.out_features)
    if isinstance(module, SymmetricLowRankLinear):
        return 2 * module.in_features * module.rank
    W, _ = linear_weight(module)
    return W.numel()


def count_macs(model: nn.Module) -> int:
    """MACs per input row (per token for GPT-2) of all Linear, Conv1D and factorized layers.

    Attention score products and elementwise operations are not counted.
    """
    return sum(
        layer_macs(m)
        for _, m in model.named_modules()
        if is_factorizable(m) or isinstance(m, LowRankLinear | SymmetricLowRankLinear)
    )


def _dense_params(layer: LowRankLinear | SymmetricLowRankLinear) -> int:
    bias = layer.out_features if layer.bias is not None else 0
    return layer.out_features * layer.in_features + bias


@dataclass
class ParamSummary:
    total: int  # parameters of the model as it is
    dense_total: int  # the same model with every factorized layer dense
    targets: int  # parameters of the factorized layers
    dense_targets: int  # the same layers dense
    macs: int
    dense_macs: int

    @property
    def compression_ratio(self) -> float:
        """Whole model: params after / params before."""
        return self.total / self.dense_total

    @property
    def target_compression_ratio(self) -> float:
        """Target layers only: params after / params before (1.0 when nothing is factorized)."""
        return self.targets / self.dense_targets if self.dense_targets else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression_ratio"] = self.compression_ratio
        d["target_compression_ratio"] = self.target_compression_ratio
        return d


def param_summary(model: nn.Module) -> ParamSummary:
    """Counts of the model against its dense equivalent, read off its factorized layers."""
    layers = [m for _, m in factorized_layers(model)]
    # parameters shared between factorized layers (tied factors) count once, as in count_params
    targets = count_params(nn.ModuleList(layers))
    dense_targets = sum(_dense_params(m) for m in layers)
    total, macs = count_params(model), count_macs(model)
    return ParamSummary(
        total=total,
        dense_total=total - targets + dense_targets,
        targets=targets,
        dense_targets=dense_targets,
        macs=macs,
        dense_macs=macs - sum(layer_macs(m) for m in layers) + sum(m.out_features * m.in_features for m in layers),
    )
