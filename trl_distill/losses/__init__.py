"""Pure-torch distillation losses (this package imports nothing but torch).

Public API:
- [`distillation_loss`]: token-level KD from student and teacher logits.
- [`linear_distillation_loss`]: the same value from hidden states and `lm_head` weights, chunk by chunk, without
  materializing the logits.
- [`divergence_terms`], [`KDSpec`], [`OBJECTIVES`]: the divergence formulas and their validated hyper-parameters.
- [`feature_distillation_loss`], [`feature_terms`], [`FEATURE_LOSSES`]: hidden-state (feature) KD, mse or cosine.
- [`reduce_loss`]: the single place where summed losses are reduced (mean / sum / `num_items_in_batch`).
"""

from .chunked import DistillationLossOutput, default_chunk_size, distillation_loss, linear_distillation_loss
from .divergences import OBJECTIVES, KDSpec, divergence_terms, kd_chunk
from .feature import FEATURE_LOSSES, FeatureLossOutput, feature_distillation_loss, feature_terms
from .reduction import REDUCTIONS, reduce_loss


__all__ = [
    "FEATURE_LOSSES",
    "OBJECTIVES",
    "REDUCTIONS",
    "DistillationLossOutput",
    "FeatureLossOutput",
    "KDSpec",
    "default_chunk_size",
    "distillation_loss",
    "divergence_terms",
    "feature_distillation_loss",
    "feature_terms",
    "kd_chunk",
    "linear_distillation_loss",
    "reduce_loss",
]
