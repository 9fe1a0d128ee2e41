"""Token-level KD from an offline teacher store (`DistillConfig.teacher_cache`, issue 6): no teacher in memory.

The store holds, for every response position of the dataset, the teacher's top-k ids and log-probabilities at
`kd_temperature` plus the "other" bucket ([`~trl_distill.cache_teacher`] writes it). The loss is the online token
mode's with `kd_top_k=k`, computed by the same kernel from those targets
([`~trl_distill.losses.linear_top_k_distillation_loss`]).
"""

from __future__ import annotations

import logging

from ..losses import linear_top_k_distillation_loss
from ..teachers.live import call_with_lm_heads, check_plain_lm_head, lm_head_and_backbone
from ..teachers.store import TeacherStore, tokenization_settings
from .base import DistillMode
from .token import _NON_MODEL_KEYS


logger = logging.getLogger(__name__)


class OfflineTokenMode(DistillMode):
    """`alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE` with the teacher's top-k read from a store.

    Built by the trainer in place of [`TokenMode`] when `teacher_cache` is set. At start it verifies the store: every
    shard's sha256, then the student's tokenizer, vocabulary, `kd_top_k` (at most the store's k; a smaller k is
    folded exactly), `kd_temperature` (must equal the store's) and tokenization settings against the manifest, and
    that every training and evaluation row is in the store. Each error names the shard or field and the fix.
    """

    name = "token"
    requires_teacher = False

    def __init__(self, trainer):
        super().__init__(trainer)
        args = trainer.args
        check_plain_lm_head(trainer.model, "student")
        self.store = TeacherStore(args.teacher_cache, progress=not args.disable_tqdm)
        self.store.check_run(
            tokenizer=trainer.processing_class,
            vocab_size=trainer.vocab_size,
            top_k=args.kd_top_k,
            temperature=args.kd_temperature,
            tokenization=tokenization_settings(trainer),
        )
        for name, dataset in _prepared_datasets(trainer):
            if hasattr(dataset, "select_columns") and hasattr(dataset, "__len__"):
                self.store.check_dataset(dataset, name)
            else:
                logger.warning("The %s dataset is iterable: its rows are looked up in the teacher store batch by batch.", name)

    def compute_loss(self, model, inputs, num_items_in_batch):
        args = self.trainer.args
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        outputs = model(**model_inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        student_hidden = outputs.hidden_states[-1]
        student_head, _ = lm_head_and_backbone(model)
        teacher = self.store.targets(inputs, args.kd_top_k)

        def loss_of(hidden):  # reads the head's weight when called: whole under ZeRO-3 (`call_with_lm_heads`)
            return linear_top_k_distillation_loss(
                hidden,
                student_head.weight,
                teacher.ids,
                teacher.log_probs,
                student_bias=getattr(student_head, "bias", None),
                labels=inputs["labels"][:, 1:],
                objective=args.objective,
                beta=args.beta,
                temperature=args.kd_temperature,
                alpha=args.alpha,
                vocab_size=self.trainer.vocab_size,
                reduction=args.loss_reduction,
                num_items_in_batch=num_items_in_batch,
                chunk_size=args.kd_chunk_size,
                return_components=True,
            )

        result = call_with_lm_heads(loss_of, student_hidden[:, :-1], student_head)
        metrics = {"kd_loss": result.kd_loss, "ce_loss": result.ce_loss, "kd_tokens": result.num_tokens}
        return result.loss, metrics


def _prepared_datasets(trainer):
    yield "training", trainer.train_dataset
    evals = trainer.eval_dataset
    if isinstance(evals, dict):
        yield from ((f"evaluation ({name})", dataset) for name, dataset in evals.items())
    elif evals is not None:
        yield "evaluation", evals


# Online mode name -> its offline counterpart. A mode that needs the teacher's activations (feature KD) or new
# samples scored by it (on-policy) has none.
OFFLINE_MODES = {"token": OfflineTokenMode}


def offline_mode(mode_cls: type[DistillMode], teacher_model) -> type[DistillMode]:
    """The mode that trains `mode_cls`'s objective from `teacher_cache`; refuse what a store cannot give."""
    if teacher_model is not None:
        raise ValueError(
            "`teacher_cache` replaces the teacher: its targets are read from the store, so `teacher_model` must not be "
            "given (got one). Pass `teacher_model=None`, or unset `teacher_cache` to distill from the live teacher."
        )
    if mode_cls.name not in OFFLINE_MODES:
        raise ValueError(
            f"`distill_mode={mode_cls.name!r}` needs a live teacher and cannot train from `teacher_cache`; offline "
            f"stores serve {sorted(OFFLINE_MODES)}."
        )
    return OFFLINE_MODES[mode_cls.name]
