"""Token-level (response) KD: match the teacher's next-token distribution at every response position."""

from __future__ import annotations

import torch

from ..batch import model_inputs
from ..losses import linear_distillation_loss
from ..teachers.live import call_with_lm_heads, check_plain_lm_head, lm_head_and_backbone
from .base import DistillMode, register_mode
from .token_offline import OfflineTokenMode
from .token_sampled import SampledOfflineTokenMode
from .token_served import ServedTokenMode


@register_mode("token")
class TokenMode(DistillMode):
    """`alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE` over the response tokens of the dataset.

    Both models run on the same token ids. The loss is computed from the two final hidden states and `lm_head` weights
    by [`~trl_distill.losses.linear_distillation_loss`], on the positions whose (shifted) label is not -100 only: no
    `(B, T, V)` logits are built for either model. Gradients flow into the student (its `lm_head` too, unless frozen,
    e.g. under LoRA); the teacher runs under `torch.no_grad`. With `feature_weight > 0` the feature term
    (`context.feature_term`) is added on the same positions. With `teacher_cache` the trainer builds
    [`~trl_distill.modes.token_offline.OfflineTokenMode`] instead (the same loss from the store's top-k).
    """

    supports_feature_term = True
    supports_generated_completions = True
    label = "token-level knowledge distillation"
    papers = ({"arxiv": "1503.02531", "title": "Distilling the Knowledge in a Neural Network"},)

    def __init__(self, context):
        super().__init__(context)
        check_plain_lm_head(context.student, "student")
        check_plain_lm_head(context.teacher, "teacher")

    @classmethod
    def describe(cls, args) -> str:
        return f"{cls.label} ({args.objective})"

    @classmethod
    def for_teacher_cache(cls):
        return OfflineTokenMode

    @classmethod
    def for_served_teacher(cls):
        return ServedTokenMode

    @classmethod
    def for_sampled_teacher_cache(cls):
        return SampledOfflineTokenMode

    def compute_loss(self, model, inputs, num_items_in_batch):
        context = self.context
        labels = inputs["labels"]
        batch = model_inputs(inputs)
        batch["use_cache"] = False
        feature_term = context.feature_term

        # The student runs through its (possibly DDP-wrapped) forward so that gradient synchronisation hooks fire;
        # `logits_to_keep=1` makes its own lm_head project a single position, the chunked loss does the rest.
        outputs = model(**batch, output_hidden_states=True, logits_to_keep=1)
        student_hidden = outputs.hidden_states[-1]
        student_head, _ = lm_head_and_backbone(model)

        teacher_head, teacher_backbone = lm_head_and_backbone(context.teacher)
        teacher_kwargs = feature_term.teacher_forward_kwargs() if feature_term is not None else {}
        with torch.no_grad():
            teacher_outputs = teacher_backbone(**batch, **teacher_kwargs)
        teacher_hidden = teacher_outputs.last_hidden_state

        # Position i predicts token i + 1.
        shift_labels = labels[:, 1:].to(student_hidden.device)
        teacher_shifted = teacher_hidden[:, :-1].to(student_hidden.device)

        def loss_of(hidden):  # reads the heads' weights when called: whole under ZeRO-3 (`call_with_lm_heads`)
            return linear_distillation_loss(
                hidden,
                student_head.weight,
                teacher_shifted,
                teacher_head.weight.to(hidden.device),
                student_bias=getattr(student_head, "bias", None),
                teacher_bias=getattr(teacher_head, "bias", None),
                labels=shift_labels,
                **self.kd_loss_settings(num_items_in_batch),
            )

        result = call_with_lm_heads(loss_of, student_hidden[:, :-1], student_head, teacher_head)
        metrics = {"kd_loss": result.kd_loss, "ce_loss": result.ce_loss, "kd_tokens": result.num_tokens}
        if feature_term is None:
            return result.loss, metrics
        # Feature KD (`feature_weight > 0`): `+ feature_weight * L_feat` on the same positions.
        return feature_term.add(
            result.loss,
            metrics,
            outputs.hidden_states,
            teacher_outputs.hidden_states,
            shift_labels,
            num_items_in_batch,
        )
