"""Pure-torch distillation losses (this package imports nothing but torch).

Public API:
- [`distillation_loss`]: token-level KD from student and teacher logits.
- [`linear_distillation_loss`]: the same value from hidden states and `lm_head` weights, chunk by chunk, without
  materializing the logits.
- [`divergence_terms`], [`KDSpec`], [`OBJECTIVES`]: the divergence formulas and their validated hyper-parameters.
- [`uld_loss`], [`linear_uld_loss`], [`ULDSpec`]: cross-tokenizer (ULD) sorted matching of two vocabularies.
- [`reduce_loss`]: the single place where summed losses are reduced (mean / sum / `num_items_in_batch`).
"""

from .chunked import DistillationLossOutput, default_chunk_size, distillation_loss, linear_distillation_loss
from .divergences import OBJECTIVES, KDSpec, divergence_terms, kd_chunk
from .reduction import REDUCTIONS, reduce_loss
from .uld import ULD_DISTANCES, ULDSpec, linear_uld_loss, uld_loss


__all__ = [
    "OBJECTIVES",
    "REDUCTIONS",
    "ULD_DISTANCES",
    "ULDSpec",
    "DistillationLossOutput",
    "KDSpec",
    "default_chunk_size",
    "distillation_loss",
    "divergence_terms",
    "kd_chunk",
    "linear_distillation_loss",
    "linear_uld_loss",
    "reduce_loss",
    "uld_loss",
]
