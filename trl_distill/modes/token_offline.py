"""Token-level KD from an offline teacher store (`DistillConfig.teacher_cache`, issue 6): no teacher in memory.

The store holds, for every response position of the dataset, the teacher's top-k ids and log-probabilities at
`kd_temperature` plus the "other" bucket ([`~trl_distill.cache_teacher`] writes it). The loss is the online token
mode's with `kd_top_k=k`, computed by the same kernel from those targets
([`~trl_distill.losses.linear_top_k_distillation_loss`]).
"""

from __future__ import annotations

import logging

from ..batch import model_inputs
from ..losses import linear_top_k_distillation_loss
from ..teachers.live import call_with_lm_heads, check_plain_lm_head, lm_head_and_backbone
from ..teachers.store import TeacherStore
from .base import DistillMode


logger = logging.getLogger(__name__)


class OfflineTokenMode(DistillMode):
    """`alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE` with the teacher's top-k read from a store.

    The token mode's teacher *source* swapped for an offline store: `TokenMode.for_teacher_cache()` returns this class
    and the trainer builds it in place of [`TokenMode`] when `teacher_cache` is set (it is not registered under a name
    of its own). At start it verifies the store: every shard's sha256, then the student's tokenizer, vocabulary,
    `kd_top_k` (at most the store's k; a smaller k is folded exactly), `kd_temperature` (must equal the store's) and
    tokenization settings against the manifest, and that every training and evaluation row is in the store. Each
    error names the shard or field and the fix.
    """

    name = "token"
    requires_teacher = False
    label = "token-level knowledge distillation"
    papers = ({"arxiv": "1503.02531", "title": "Distilling the Knowledge in a Neural Network"},)

    def __init__(self, context):
        super().__init__(context)
        check_plain_lm_head(context.student, "student")
        self.store = self.open_teacher_targets(context)

    def open_teacher_targets(self, context):
        """The teacher *source*: an object whose `targets(inputs, top_k)` gives the batch's
        [`~trl_distill.losses.TopKTargets`] (`ids`, `log_probs`: one row per response position, in order).

        This is the hook a new top-k teacher source overrides in a subclass (e.g. a served teacher queried over HTTP,
        or a store of sampled positions); the loss below is unchanged. The default opens `teacher_cache` as a
        [`~trl_distill.teachers.store.TeacherStore`] and verifies it against this run (see the class docstring).
        """
        args = context.args
        store = TeacherStore(args.teacher_cache, progress=not args.disable_tqdm)
        store.check_run(
            tokenizer=context.tokenizer,
            vocab_size=context.vocab_size,
            top_k=args.kd_top_k,
            temperature=args.kd_temperature,
            tokenization=dict(context.tokenization),
        )
        self.check_datasets(store, context)
        return store

    @staticmethod
    def check_datasets(store, context) -> None:
        """Every training and evaluation row must be in the store (iterable datasets are checked batch by batch)."""
        for name, dataset in context.prepared_datasets():
            if hasattr(dataset, "select_columns") and hasattr(dataset, "__len__"):
                store.check_dataset(dataset, name)
            else:
                logger.warning(
                    "The %s dataset is iterable: its rows are looked up in the teacher store batch by batch.", name
                )

    @classmethod
    def describe(cls, args) -> str:
        return f"{cls.label} ({args.objective})"

    def compute_loss(self, model, inputs, num_items_in_batch):
        outputs = model(**model_inputs(inputs), use_cache=False, output_hidden_states=True, logits_to_keep=1)
        student_hidden = outputs.hidden_states[-1]
        student_head, _ = lm_head_and_backbone(model)
        loss_of = self.stored_loss(student_head, inputs, num_items_in_batch)
        result = call_with_lm_heads(loss_of, student_hidden[:, :-1], student_head)
        metrics = {"kd_loss": result.kd_loss, "ce_loss": result.ce_loss, "kd_tokens": result.num_tokens}
        return result.loss, metrics

    def stored_loss(self, student_head, inputs, num_items_in_batch):
        """`hidden -> DistillationLossOutput` against this batch's stored targets (top-k here; the sampled store's
        mode overrides it). It reads the head's weight when called: whole under ZeRO-3 (`call_with_lm_heads`)."""
        args = self.args
        teacher = self.store.targets(inputs, args.kd_top_k)

        def loss_of(hidden):
            return linear_top_k_distillation_loss(
                hidden,
                student_head.weight,
                teacher.ids,
                teacher.log_probs,
                student_bias=getattr(student_head, "bias", None),
                labels=inputs["labels"][:, 1:],
                **self.kd_loss_settings(num_items_in_batch, without=("top_k",)),
            )

        return loss_of
