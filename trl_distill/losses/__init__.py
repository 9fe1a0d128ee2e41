"""Pure-torch distillation losses (this package imports nothing but torch).

Public API:
- [`distillation_loss`]: token-level KD from student and teacher logits.
- [`linear_distillation_loss`]: the same value from hidden states and `lm_head` weights, chunk by chunk, without
  materializing the logits.
- [`uld_loss`], [`linear_uld_loss`], [`ULDSpec`]: cross-tokenizer (ULD) sorted matching of two vocabularies.
- [`linear_top_k_distillation_loss`]: the `top_k=k` loss with the teacher given only by its top-k ids and bucket
  log-probabilities (an offline teacher store); [`teacher_top_k_targets`] computes those from the teacher.
- [`linear_sampled_distillation_loss`]: forward KL against `K` tokens sampled from the teacher (a sampled store, Sparse
  Logit Sampling); unbiased in value and gradient. [`teacher_sampled_targets`] draws them; [`SampledTargets`].
- [`divergence_terms`], [`KDSpec`], [`OBJECTIVES`]: the divergence formulas and their validated hyper-parameters;
  [`teacher_top_k`] / [`TopKTargets`]: the teacher's side of the top-k loss.
- [`feature_distillation_loss`], [`feature_terms`], [`FEATURE_LOSSES`]: hidden-state (feature) KD, mse or cosine.
- [`reduce_loss`]: the single place where summed losses are reduced (mean / sum / `num_items_in_batch`).
"""

from .chunked import DistillationLossOutput, default_chunk_size, distillation_loss, linear_distillation_loss
from .divergences import OBJECTIVES, KDSpec, SampledTargets, TopKTargets, divergence_terms, kd_chunk, teacher_top_k
from .feature import FEATURE_LOSSES, FeatureLossOutput, feature_distillation_loss, feature_terms
from .reduction import REDUCTIONS, reduce_loss
from .sampled import (
    SampledObjectiveError,
    check_sampled_objective,
    linear_sampled_distillation_loss,
    teacher_sampled_targets,
)
from .top_k import linear_top_k_distillation_loss, teacher_top_k_targets
from .uld import ULD_DISTANCES, ULDSpec, linear_uld_loss, uld_loss


__all__ = [
    "FEATURE_LOSSES",
    "OBJECTIVES",
    "REDUCTIONS",
    "ULD_DISTANCES",
    "ULDSpec",
    "DistillationLossOutput",
    "FeatureLossOutput",
    "KDSpec",
    "SampledObjectiveError",
    "SampledTargets",
    "TopKTargets",
    "check_sampled_objective",
    "default_chunk_size",
    "distillation_loss",
    "divergence_terms",
    "feature_distillation_loss",
    "feature_terms",
    "kd_chunk",
    "linear_distillation_loss",
    "linear_sampled_distillation_loss",
    "linear_uld_loss",
    "reduce_loss",
    "linear_top_k_distillation_loss",
    "teacher_top_k",
    "teacher_sampled_targets",
    "teacher_top_k_targets",
    "uld_loss",
]
