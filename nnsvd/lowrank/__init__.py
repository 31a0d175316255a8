"""The low-rank engine: factorized layers, truncated-SVD factorization and in-place model compression.

Plain PyTorch: no Hydra, no W&B. Usable from a notebook::

    from nnsvd.lowrank import compress_model
    report = compress_model(model, ["l1", "l2"], rank=8)

One module per concept:

- ``layers``: LowRankLinear (W = A·B), SymmetricLowRankLinear (W = B·Bᵀ), the dense layers they replace;
- ``factorize``: plain truncated SVD of one matrix (exact, Gram, randomized);
- ``weighted``: data-aware truncated SVD, Ŵ = L⁻¹·trunc_r(L·W·R)·R⁻¹ (ASVD, whitening, FWSVD);
- ``calibration``: the input statistics those methods weight by, collected with forward hooks
  (one Gram per distinct input), and the Fisher rows, collected with gradient hooks;
- ``blockwise``: calibrated compression of a decoder-only transformer one block at a time, and
  block-wise reconstruction of the factors against the dense block's output;
- ``stats_store``: calibration statistics kept on disk for the other jobs of a sweep;
- ``methods``: the methods by name, and ``factorize`` (one method, one weight);
- ``ranks``: which ranks save parameters;
- ``allocation``, ``sensitivity``: per-layer ranks under a parameter budget (compress.ratio);
- ``report``: what compression did to each layer;
- ``surgery``: finding targets, swapping layers in, rebuilding saved structures.
"""

from nnsvd.lowrank.allocation import (
    BudgetError,
    Shape,
    greedy_allocation,
    loss_allocation,
    spectrum_allocation,
    target_shapes,
    uniform_ranks,
)
from nnsvd.lowrank.blockwise import (
    BlockInputs,
    BlockUpdate,
    MemoryEstimate,
    capture_block_inputs,
    compress_blockwise,
    decoder_blocks,
    dense_block_statistics,
    reconstruct_block,
    targets_by_block,
)
from nnsvd.lowrank.calibration import (
    FisherCollector,
    InputStats,
    LayerStats,
    StatsCollector,
    collect_fisher,
    collect_statistics,
    sequential_stages,
    shared_input_groups,
    stats_nbytes,
)
from nnsvd.lowrank.factorize import (
    Factorizer,
    Factors,
    factorize_symmetric,
    svd_auto,
    svd_exact,
    svd_full,
    svd_gram,
    svd_randomized,
)
from nnsvd.lowrank.layers import (
    LOWRANK,
    SYMMETRIC,
    FactorizedLayer,
    LowRankLinear,
    SymmetricLowRankLinear,
    is_factorizable,
    linear_weight,
)
from nnsvd.lowrank.methods import (
    DATA_AWARE_METHODS,
    FACTORIZERS,
    PLAIN_METHODS,
    factorize,
    is_data_aware,
    method_name,
    resolve_factorizer,
)
from nnsvd.lowrank.ranks import RankError, max_useful_rank, validate_rank
from nnsvd.lowrank.report import CompressionReport, LayerReport
from nnsvd.lowrank.sensitivity import measure_sensitivity, sensitivity_allocation
from nnsvd.lowrank.stats_store import StatisticsStore, StatisticsStoreError
from nnsvd.lowrank.surgery import (
    TargetError,
    compress_model,
    compress_with_calibration,
    factorized_layers,
    find_targets,
    layer_records,
    lowrank_from_scratch,
    plan_compression,
    rebuild_structure,
)
from nnsvd.lowrank.weighted import (
    CalibrationError,
    asvd,
    damped_cholesky,
    fwsvd,
    relative_data_error,
    weighted_truncation,
    whiten,
)

__all__ = [
    "BudgetError",
    "Shape",
    "greedy_allocation",
    "loss_allocation",
    "measure_sensitivity",
    "sensitivity_allocation",
    "spectrum_allocation",
    "target_shapes",
    "uniform_ranks",
    "BlockInputs",
    "BlockUpdate",
    "FisherCollector",
    "MemoryEstimate",
    "capture_block_inputs",
    "collect_fisher",
    "compress_blockwise",
    "decoder_blocks",
    "dense_block_statistics",
    "reconstruct_block",
    "shared_input_groups",
    "StatisticsStore",
    "StatisticsStoreError",
    "targets_by_block",
    "DATA_AWARE_METHODS",
    "FACTORIZERS",
    "PLAIN_METHODS",
    "CalibrationError",
    "InputStats",
    "LayerStats",
    "StatsCollector",
    "asvd",
    "collect_statistics",
    "compress_with_calibration",
    "damped_cholesky",
    "fwsvd",
    "is_data_aware",
    "method_name",
    "relative_data_error",
    "sequential_stages",
    "stats_nbytes",
    "svd_exact",
    "weighted_truncation",
    "whiten",
    "LOWRANK",
    "SYMMETRIC",
    "CompressionReport",
    "FactorizedLayer",
    "Factorizer",
    "Factors",
    "LayerReport",
    "LowRankLinear",
    "RankError",
    "SymmetricLowRankLinear",
    "TargetError",
    "compress_model",
    "factorize",
    "factorize_symmetric",
    "factorized_layers",
    "find_targets",
    "is_factorizable",
    "layer_records",
    "linear_weight",
    "lowrank_from_scratch",
    "max_useful_rank",
    "plan_compression",
    "rebuild_structure",
    "resolve_factorizer",
    "svd_auto",
    "svd_full",
    "svd_gram",
    "svd_randomized",
    "validate_rank",
]
