"""nn-svd: low-rank (SVD) compression and factorized training of neural networks."""

from nnsvd.lowrank import (
    CompressionReport,
    Factors,
    LayerReport,
    LowRankLinear,
    RankError,
    SymmetricLowRankLinear,
    compress_model,
    factorize,
    factorize_symmetric,
    lowrank_from_scratch,
    max_useful_rank,
    validate_rank,
)
from nnsvd.lowrank.bounds import BoundResult, output_error_bound
from nnsvd.lowrank.counting import ParamSummary, count_macs, count_params, param_summary
from nnsvd.lowrank.regularizers import orthonormal_penalty

__all__ = [
    "BoundResult",
    "CompressionReport",
    "Factors",
    "LayerReport",
    "LowRankLinear",
    "ParamSummary",
    "RankError",
    "SymmetricLowRankLinear",
    "compress_model",
    "count_macs",
    "count_params",
    "factorize",
    "factorize_symmetric",
    "lowrank_from_scratch",
    "max_useful_rank",
    "orthonormal_penalty",
    "output_error_bound",
    "param_summary",
    "validate_rank",
]
