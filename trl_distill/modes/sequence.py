"""Sequence-level KD (Kim & Rush 2016): train the student with plain cross-entropy on the teacher's own completions.

[Sequence-Level Knowledge Distillation](https://huggingface.co/papers/1606.07947) replaces each training target by
the teacher's (greedy or beam) output for the same prompt. No logits are compared, so teacher and student may use
different tokenizers: the teacher's completions are decoded to text and tokenized again by the student's tokenizer.
"""

from __future__ import annotations

import logging

import torch.nn.functional as F

from ..batch import model_inputs
from ..losses import reduce_loss
from ..teachers.generation import (
    default_generation_cache_dir,
    generate_teacher_completions,
    teacher_generation_settings,
)
from .base import DistillMode, register_mode


logger = logging.getLogger(__name__)


@register_mode("sequence")
class SequenceMode(DistillMode):
    """Cross-entropy on teacher-written completions; the teacher is needed as text only, before training.

    Where the completions come from, checked in this order:

    1. the dataset's `teacher_completion_column` (default `"teacher_completion"`), when it has one: a "black-box"
       teacher, e.g. answers collected from an API, or the output of
       [`~trl_distill.generate_teacher_completions`]. `teacher_model` may then be `None`;
    2. otherwise the teacher generates a completion for every `prompt` (greedy by default; `teacher_do_sample`,
       `teacher_num_beams`, `max_completion_length` and the sampling fields change that), once, cached on disk
       under `teacher_generation_cache_dir` (see [`~trl_distill.generate_teacher_completions`]).

    That column then replaces the dataset's `completion` (the gold completions are not trained on). Only the
    training set is rewritten: `eval_loss` is the cross-entropy on the eval set's own completions.

    Loss: `sum CE(student, teacher token) / N` over the completion tokens (`loss_reduction`, `num_items_in_batch` as
    in token-level KD), in float32, over the student's first `len(tokenizer)` logits (padded vocabulary rows are
    excluded). Gradients flow into the student only.
    """

    requires_teacher = False  # a dataset with teacher completions needs none; `prepare_train_dataset` checks
    requires_shared_vocab = False
    label = "sequence-level knowledge distillation"
    papers = ({"arxiv": "1606.07947", "title": "Sequence-Level Knowledge Distillation"},)

    @classmethod
    def validate_config(cls, args) -> None:
        if args.lmbda > 0 or args.seq_kd:
            raise ValueError(
                f"`distill_mode='sequence'` trains on teacher text with cross-entropy, so `lmbda={args.lmbda}` / "
                f"`seq_kd={args.seq_kd}` have nothing to score student samples with. Use `distill_mode='token'` for "
                "on-policy distillation (`lmbda > 0`) or fresh teacher generations (`seq_kd=True`)."
            )
        super().validate_config(args)

    @classmethod
    def prepare_train_dataset(cls, dataset, *, teacher, teacher_tokenizer, teacher_source, args):
        column = args.teacher_completion_column
        columns = list(getattr(dataset, "column_names", None) or [])
        if column in columns:
            if teacher is not None:
                logger.warning(
                    "The training dataset already has a `%s` column: training on it; the teacher generates nothing.",
                    column,
                )
            return use_teacher_completions(dataset, column)
        if teacher is None:
            raise ValueError(
                f"`distill_mode='sequence'` trains on teacher completions, but there is no teacher and the training "
                f"dataset has no `{column}` column (columns: {columns}). Pass `teacher_model` (or "
                "`teacher_model_name_or_path`) to generate them, or add the teacher's completions to the dataset as "
                f"`{column}` (or point `teacher_completion_column` at the column that holds them)."
            )
        if teacher_tokenizer is None:
            raise ValueError(
                "`distill_mode='sequence'` needs the teacher's tokenizer to generate completions: pass "
                "`teacher_processing_class` (the teacher has no path to load it from)."
            )
        revision = (args.teacher_model_init_kwargs or {}).get("revision") if isinstance(teacher_source, str) else None
        cache_dir = args.teacher_generation_cache_dir or default_generation_cache_dir()
        if not any(p.device.type != "cpu" for p in teacher.parameters()) and not hasattr(teacher, "hf_device_map"):
            teacher.to(args.device)  # the trainer would place it there next anyway; generation should not run on CPU
        # One process generates, the others then read its finished cache.
        with args.main_process_first(desc="teacher completions"):
            dataset = generate_teacher_completions(
                teacher,
                teacher_tokenizer,
                dataset,
                cache_dir=cache_dir,
                **teacher_generation_settings(args),
                seed=args.seed,
                batch_size=args.teacher_generation_batch_size,
                output_column=column,
                teacher_id=f"{teacher_source}@{revision}" if revision else teacher_source,
                show_progress=not args.disable_tqdm and args.distributed_state.is_main_process,
            )
        return use_teacher_completions(dataset, column)

    def compute_loss(self, model, inputs, num_items_in_batch):
        args = self.args
        logits = model(**model_inputs(inputs), use_cache=False).logits
        # Position i predicts token i + 1; only the completion positions are kept (and upcast).
        targets = inputs["labels"][:, 1:].to(logits.device)
        keep = targets != -100
        selected = logits[:, :-1][keep][:, : self.context.vocab_size].float()
        total = F.cross_entropy(selected, targets[keep], reduction="sum")
        count = keep.sum()
        loss = reduce_loss(total, count, reduction=args.loss_reduction, num_items_in_batch=num_items_in_batch)
        metrics = {"ce_loss": total.detach() / count.clamp(min=1), "ce_tokens": count}
        return loss, metrics


def use_teacher_completions(dataset, column: str):
    """`dataset` with `column` as its `completion` (messages when the prompts are messages)."""
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"The dataset has a `{column}` column but no `prompt` column (columns: {dataset.column_names}); "
            "sequence-level KD trains on prompt/completion pairs."
        )
    if "completion" in dataset.column_names:
        dataset = dataset.remove_columns("completion")
    dataset = dataset.rename_column(column, "completion")
    first = dataset[0]
    if not isinstance(first["prompt"], str) and isinstance(first["completion"], str):
        dataset = dataset.map(lambda row: {"completion": [{"role": "assistant", "content": row["completion"]}]})
    return dataset
