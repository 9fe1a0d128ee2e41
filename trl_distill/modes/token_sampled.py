"""Token-level KD from a *sampled* teacher store (`teacher_cache_kind="sampled"`, issue 16): no teacher in memory.

The store holds, for every response position, `K` tokens drawn from the teacher at `kd_temperature` (distinct ids
and counts) and the teacher's entropy (Sparse Logit Sampling, Anshumann et al., ACL 2025,
https://arxiv.org/abs/2503.16870). The loss is the forward KL against the draws' empirical distribution
([`~trl_distill.losses.linear_sampled_distillation_loss`]): over the draws, its expectation is the full-vocabulary
forward-KL loss of the online token mode (`kd_top_k=None`) and so is its expected gradient, where a top-k store gives
the top-k loss (a biased target for the full one).
"""

from __future__ import annotations

from ..losses import linear_sampled_distillation_loss
from ..teachers.store import TeacherStore
from .token_offline import OfflineTokenMode


class SampledOfflineTokenMode(OfflineTokenMode):
    """`alpha * T^2 * KL_hat(teacher_T, student_T) + (1 - alpha) * CE` with the teacher given by stored draws.

    `TokenMode.for_sampled_teacher_cache()` returns this class; the trainer builds it in place of [`TokenMode`] when
    `teacher_cache` is set with `teacher_cache_kind="sampled"` (not registered under a name of its own). At start it
    verifies the store like [`OfflineTokenMode`] (shard hashes, tokenizer, vocabulary, `kd_temperature`, tokenization,
    every row present) and that it is a sampled store. Only `objective="forward_kl"` is accepted (the config refuses
    the others: they have no unbiased estimate from samples).
    """

    label = "token-level knowledge distillation from teacher samples"
    papers = (
        {"arxiv": "1503.02531", "title": "Distilling the Knowledge in a Neural Network"},
        {"arxiv": "2503.16870", "title": "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs"},
    )

    def open_teacher_targets(self, context):
        """The sampled store at `teacher_cache`, verified against this run; its `sampled_targets(inputs)` gives the
        batch's [`~trl_distill.losses.SampledTargets`]."""
        args = context.args
        store = TeacherStore(args.teacher_cache, progress=not args.disable_tqdm)
        store.check_run(
            tokenizer=context.tokenizer,
            vocab_size=context.vocab_size,
            top_k=None,
            temperature=args.kd_temperature,
            tokenization=dict(context.tokenization),
            kind="sampled",
        )
        self.check_datasets(store, context)
        return store

    def stored_loss(self, student_head, inputs, num_items_in_batch):
        teacher = self.store.sampled_targets(inputs)

        def loss_of(hidden):
            return linear_sampled_distillation_loss(
                hidden,
                student_head.weight,
                teacher.ids,
                teacher.weights,
                teacher.entropy,
                student_bias=getattr(student_head, "bias", None),
                labels=inputs["labels"][:, 1:],
                **self.kd_loss_settings(num_items_in_batch, without=("top_k", "beta")),
            )

        return loss_of
