"""Cross-tokenizer distillation (ULD): the teacher reads the same text with its own tokenizer.

Boizard et al. 2024, https://arxiv.org/abs/2402.12030. Per batch: the student's rows are decoded back to text with
character offsets, the teacher's tokenizer encodes that text, each student response token is paired with a teacher
token by character offsets ([`trl_distill.alignment.align_batch`]), and the two next-token distributions at the paired
positions are compared by sorted top-k matching ([`trl_distill.losses.linear_uld_loss`]).
"""

from __future__ import annotations

import warnings

import torch

from ..alignment import align_batch, shared_token_pairs
from ..batch import model_inputs
from ..losses import linear_uld_loss
from ..teachers.live import call_with_lm_heads, check_plain_lm_head, lm_head_and_backbone
from .base import DistillMode, register_mode


@register_mode("uld")
class ULDMode(DistillMode):
    """`alpha * T^2 * D_sorted(teacher_T, student_T) + (1 - alpha) * CE` over the dataset's response tokens.

    Works whatever the two tokenizers (different vocabularies, sizes, segmentations, special tokens). The student runs
    on the batch as collated; the teacher on the same text re-tokenized by its own tokenizer, truncated to its
    `max_position_embeddings`. A student response token without a teacher partner (a special token the teacher has
    no counterpart for, or one past the teacher's truncation) gets the CE term only; the trainer logs how many as
    `uld_unpaired`. `num_items_in_batch` counts the student's response tokens, as for token-level KD, so gradient
    accumulation gives the gradient of one big batch. Gradients flow into the student (through LoRA adapters too);
    the teacher runs under `torch.no_grad`.

    Raises:
        ValueError: with `padding_free=True` or `packing=True` (a row then holds several documents that the teacher
            would read as one text).
    """

    requires_shared_vocab = False
    label = "universal logit distillation (cross-tokenizer)"
    papers = (
        {
            "arxiv": "2402.12030",
            "title": "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
        },
    )

    @classmethod
    def describe(cls, args) -> str:
        measure = f"{args.uld_distance}" + (f", exact matches: {args.objective}" if args.uld_exact_match else "")
        return f"{cls.label} ({measure})"

    @classmethod
    def validate_config(cls, args) -> None:
        if args.kd_top_k is not None:
            warnings.warn(
                f"`kd_top_k={args.kd_top_k}` is ignored with `distill_mode='uld'`, whose sorted matching keeps "
                f"`uld_top_k={args.uld_top_k}` entries per side.",
                UserWarning,
                stacklevel=4,
            )
        if not args.uld_exact_match and args.objective != "forward_kl":
            warnings.warn(
                f"`objective={args.objective!r}` is ignored with `distill_mode='uld'` unless `uld_exact_match=True` "
                "(it then measures the identity-matched tokens); the sorted matching uses `uld_distance`.",
                UserWarning,
                stacklevel=4,
            )
        if args.lmbda > 0 or args.seq_kd:
            raise ValueError(
                f"`distill_mode='uld'` with `lmbda={args.lmbda}` / `seq_kd={args.seq_kd}` is not supported: generated "
                "batches carry the student's token ids only, while ULD re-reads each row's text with the teacher's "
                "tokenizer. Use `distill_mode='token'` (shared vocabulary) for on-policy distillation, or "
                "`distill_mode='sequence'` across tokenizers."
            )
        super().validate_config(args)

    def __init__(self, context):
        super().__init__(context)
        args = context.args
        for name in ("padding_free", "packing"):
            if getattr(args, name, False):
                raise ValueError(
                    f"`{name}=True` is not supported with `distill_mode='uld'`: the teacher re-tokenizes each row's "
                    f"text, and a packed row joins several documents. Set `{name}=False`."
                )
        check_plain_lm_head(context.student, "student")
        check_plain_lm_head(context.teacher, "teacher")
        self.student_tokenizer = context.tokenizer
        self.teacher_tokenizer = context.teacher_tokenizer
        for role, tokenizer in (("student", self.student_tokenizer), ("teacher", self.teacher_tokenizer)):
            if not getattr(tokenizer, "is_fast", False):
                raise ValueError(
                    f"`distill_mode='uld'` aligns tokens by character offsets, which needs a fast tokenizer; the "
                    f"{role}'s is a {type(tokenizer).__name__}. Load it with `use_fast=True`."
                )
        self.teacher_max_length = getattr(context.teacher.config, "max_position_embeddings", None)
        self.teacher_vocab_size = len(self.teacher_tokenizer)
        self.exact_match_ids = (
            shared_token_pairs(self.student_tokenizer, self.teacher_tokenizer) if args.uld_exact_match else None
        )

    def compute_loss(self, model, inputs, num_items_in_batch):
        context, args = self.context, self.args
        labels = inputs["labels"]
        aligned = align_batch(
            self.student_tokenizer,
            self.teacher_tokenizer,
            inputs["input_ids"].cpu(),
            None if "attention_mask" not in inputs else inputs["attention_mask"].cpu(),
            labels.cpu(),
            teacher_max_length=self.teacher_max_length,
        )
        outputs = model(**model_inputs(inputs), use_cache=False, output_hidden_states=True, logits_to_keep=1)
        student_hidden = outputs.hidden_states[-1]
        device = student_hidden.device
        student_head, _ = lm_head_and_backbone(model)

        teacher_head, teacher_backbone = lm_head_and_backbone(context.teacher)
        teacher_device = teacher_head.weight.device
        with torch.no_grad():
            teacher_hidden = teacher_backbone(
                input_ids=aligned.teacher_input_ids.to(teacher_device),
                attention_mask=aligned.teacher_attention_mask.to(teacher_device),
                use_cache=False,
            ).last_hidden_state

        rows = aligned.rows.to(device)
        # Position j - 1 predicts student token j; position i - 1 predicts its teacher partner i.
        student_positions = aligned.student_positions.to(device)
        teacher_paired = teacher_hidden[aligned.rows.to(teacher_device), aligned.teacher_positions.to(teacher_device)]

        def loss_of(hidden):  # reads the heads' weights when called: whole under ZeRO-3 (`call_with_lm_heads`)
            return linear_uld_loss(
                hidden,
                student_head.weight,
                teacher_paired.to(device),
                teacher_head.weight.to(device),
                student_bias=getattr(student_head, "bias", None),
                teacher_bias=getattr(teacher_head, "bias", None),
                labels=labels[rows, student_positions + 1],
                paired=aligned.aligned.to(device),
                distance=args.uld_distance,
                top_k=args.uld_top_k,
                temperature=args.kd_temperature,
                alpha=args.alpha,
                exact_match_ids=self.exact_match_ids,
                objective=args.objective,
                beta=args.beta,
                student_vocab_size=context.vocab_size,
                teacher_vocab_size=self.teacher_vocab_size,
                reduction=args.loss_reduction,
                num_items_in_batch=num_items_in_batch,
                chunk_size=args.kd_chunk_size,
                return_components=True,
            )

        result = call_with_lm_heads(loss_of, student_hidden[rows, student_positions], student_head, teacher_head)
        unpaired = torch.as_tensor(aligned.rows.numel(), device=device) - result.num_tokens
        metrics = {
            "kd_loss": result.kd_loss,
            "ce_loss": result.ce_loss,
            "kd_tokens": result.num_tokens,
            "uld_unpaired": unpaired,
        }
        return result.loss, metrics
