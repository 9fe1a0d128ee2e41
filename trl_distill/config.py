"""`DistillConfig`: TRL's `SFTConfig` plus the distillation knobs, validated in one place (no I/O here)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from .features import FEATURE_PROJECTION_MODES, parse_layer_map
from .losses import FEATURE_LOSSES, OBJECTIVES, REDUCTIONS


DISTILL_MODES = ("token",)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class DistillConfig(SFTConfig):
    r"""
    Configuration for [`DistillTrainer`]: every [`~trl.SFTConfig`] field plus the distillation settings below.

    The token-level loss at each response position is `alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE`, with
    `T = kd_temperature` and `D` chosen by `objective`; it is reduced per `loss_reduction`.

    Parameters that control the teacher:
        teacher_model_name_or_path (`str`, *optional*):
            Teacher model id or local path, used when the trainer's `teacher_model` argument is not given (e.g. from a
            YAML recipe).
        teacher_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the teacher is given as a string.

    Parameters that control what is matched:
        distill_mode (`str`, *optional*, defaults to `"token"`):
            `"token"`: token-level (logit) KD on the dataset's response tokens; needs a shared vocabulary.

    Parameters that control how the gap is measured:
        objective (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"` = KL(teacher || student) (mode-covering), `"reverse_kl"` = KL(student || teacher)
            (mode-seeking), `"jsd"` (beta = 0.5) or `"generalized_jsd"` (uses `beta`).
        beta (`float`, *optional*, defaults to `0.5`):
            Generalized-JSD interpolation with TRL's meaning (0 = forward KL, 1 = reverse KL). Only used with
            `objective="generalized_jsd"`.
        kd_temperature (`float`, *optional*, defaults to `2.0`):
            Temperature of both softmaxes in the KD term; the term is scaled by `kd_temperature**2`. Not the sampling
            temperature.
        alpha (`float`, *optional*, defaults to `0.9`):
            Weight of the KD term; `1 - alpha` weighs the cross-entropy on the dataset's target tokens.
        kd_top_k (`int`, *optional*):
            Keep the teacher's top-k tokens and fold the rest of the vocabulary into one "other" bucket on both sides.
            `None` uses the full vocabulary.
        loss_reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` over response tokens (of the whole accumulated batch) or `"sum"`.
        kd_chunk_size (`int`, *optional*):
            Positions projected through the `lm_head`s at once. `None`: 256 (fewer for vocabularies above 131k
            tokens, so one float32 block stays near 128 MiB).

    Parameters that control feature (hidden-state) KD, added to the token mode's loss:
        feature_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the feature term: the loss becomes `L + feature_weight * L_feat`. `0` turns feature KD off (the
            teacher's hidden states are then never requested).
        feature_layer_map (`list[list[int]]` or `str`, *optional*):
            `(student layer, teacher layer)` pairs, 0-based decoder-layer indices (negative from the end), e.g.
            `"0:1,1:3"` or `[[0, 1], [1, 3]]`. `None`: `min(L_s, L_t)` evenly spaced pairs ending at both last layers.
        feature_loss (`str`, *optional*, defaults to `"mse"`):
            `"mse"` (squared error averaged over the hidden dimensions) or `"cosine"` (`1 - cos`), per position.
        feature_projection (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: a learned linear map per pair when the widths differ, the identity when they match; `"always"`:
            a learned map for every pair (identity-initialized when the widths match).
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    # Teacher
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher model id or local path, used when the trainer is not given `teacher_model`."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the teacher is given as a string "
            "(e.g. '{\"dtype\": \"bfloat16\", \"revision\": \"main\"}')."
        },
    )

    # What is matched
    distill_mode: str = field(
        default="token",
        metadata={"help": "What is matched. 'token': token-level (logit) KD; needs a shared vocabulary.", "choices": DISTILL_MODES},
    )

    # How the gap is measured
    objective: str = field(
        default="forward_kl",
        metadata={
            "help": "Divergence: 'forward_kl' = KL(teacher||student), 'reverse_kl' = KL(student||teacher), 'jsd' "
            "(beta=0.5), 'generalized_jsd' (uses `beta`).",
            "choices": OBJECTIVES,
        },
    )
    beta: float = field(
        default=0.5,
        metadata={"help": "Generalized-JSD interpolation (TRL's meaning: 0 forward KL, 1 reverse KL). Only read with objective='generalized_jsd'."},
    )
    kd_temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T of the KD term (scaled by T^2). Not the sampling temperature."},
    )
    alpha: float = field(
        default=0.9,
        metadata={"help": "Weight of the KD term; (1 - alpha) weighs the cross-entropy on the target tokens."},
    )
    kd_top_k: int | None = field(
        default=None,
        metadata={"help": "Keep the teacher's top-k tokens plus one 'other' bucket on both sides; None = full vocabulary."},
    )
    loss_reduction: str = field(
        default="mean",
        metadata={"help": "'mean' over response tokens of the whole accumulated batch, or 'sum'.", "choices": REDUCTIONS},
    )
    kd_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Positions projected through the lm_heads at once; None picks one from the vocabulary size."},
    )

    # Feature (hidden-state) KD, issue 5 (see trl_distill/features.py)
    feature_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the hidden-state (feature) KD term added to the token loss; 0 = off."},
    )
    feature_layer_map: list[list[int]] | str | None = field(
        default=None,
        metadata={
            "help": "(student layer, teacher layer) pairs, 0-based, e.g. '0:1,1:3' or [[0, 1], [1, 3]]; default: "
            "evenly spaced pairs ending at the last layers."
        },
    )
    feature_loss: str = field(
        default="mse",
        metadata={"help": "'mse' (mean over hidden dims) or 'cosine' (1 - cos), per position.", "choices": FEATURE_LOSSES},
    )
    feature_projection: str = field(
        default="auto",
        metadata={
            "help": "'auto': learned linear map when widths differ, identity otherwise; 'always': learned map per pair.",
            "choices": FEATURE_PROJECTION_MODES,
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.distill_mode not in DISTILL_MODES:
            raise ValueError(f"`distill_mode` must be one of {DISTILL_MODES}, got {self.distill_mode!r}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}. (Use 'generalized_jsd' with `beta` "
                "for an interpolation between forward and reverse KL.)"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"`beta` must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta}.")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise ValueError(f"`kd_temperature` must be a finite number > 0, got {self.kd_temperature}.")
        if self.kd_temperature < 1.0:
            warnings.warn(
                f"`kd_temperature={self.kd_temperature}` < 1 sharpens both distributions: the student then learns "
                "little about the teacher's non-top tokens (the 'dark knowledge'). Values in [1, 4] are usual; the "
                "default is 2.0.",
                UserWarning,
                stacklevel=3,
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1] (1 = pure KD, 0 = plain SFT), got {self.alpha}.")
        if self.kd_top_k is not None and not _positive_int(self.kd_top_k):
            raise ValueError(f"`kd_top_k` must be None (full vocabulary) or an integer >= 1, got {self.kd_top_k!r}.")
        if self.loss_reduction not in REDUCTIONS:
            raise ValueError(f"`loss_reduction` must be one of {REDUCTIONS}, got {self.loss_reduction!r}.")
        if self.kd_chunk_size is not None and not _positive_int(self.kd_chunk_size):
            raise ValueError(f"`kd_chunk_size` must be None or a positive integer, got {self.kd_chunk_size!r}.")
        if self.loss_type != "nll":
            raise ValueError(
                f"`loss_type={self.loss_type!r}` changes SFT's cross-entropy, which `DistillTrainer` replaces with the "
                "distillation loss; leave `loss_type='nll'`."
            )

        # Feature (hidden-state) KD (issue 5).
        if isinstance(self.feature_weight, bool) or not (
            isinstance(self.feature_weight, (int, float)) and math.isfinite(self.feature_weight) and self.feature_weight >= 0
        ):
            raise ValueError(f"`feature_weight` must be a finite number >= 0 (0 = off), got {self.feature_weight!r}.")
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"`feature_loss` must be one of {FEATURE_LOSSES}, got {self.feature_loss!r}.")
        if self.feature_projection not in FEATURE_PROJECTION_MODES:
            raise ValueError(
                f"`feature_projection` must be one of {FEATURE_PROJECTION_MODES}, got {self.feature_projection!r}."
            )
        self.feature_layer_map = parse_layer_map(self.feature_layer_map)
        if self.feature_weight > 0 and self.distill_mode != "token":
            raise ValueError(
                f"`feature_weight={self.feature_weight}` is supported with `distill_mode='token'` only (it needs the "
                f"teacher run on the same token positions), got `distill_mode={self.distill_mode!r}`. Set "
                "`feature_weight=0` or use the token mode."
            )
        if self.feature_weight == 0 and self.feature_layer_map is not None:
            warnings.warn(
                f"`feature_layer_map={self.feature_layer_map}` is ignored because `feature_weight=0`; set "
                "`feature_weight` > 0 to turn feature KD on.",
                UserWarning,
                stacklevel=3,
            )
