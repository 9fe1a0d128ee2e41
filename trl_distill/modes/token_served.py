"""Token-level KD with the teacher's top-k scored live by a served teacher (`DistillConfig.teacher_url`, issue 16).

A teacher too big to load beside the student runs behind vLLM's OpenAI-compatible server; every training batch is
sent to it (`prompt_logprobs: kd_top_k`, see [`~trl_distill.teachers.served.ServedTeacher`]) and the loss is the
offline store's ([`~trl_distill.modes.token_offline.OfflineTokenMode`]): the same kernel on the same top-k targets,
only their source differs. Because the targets are computed for whatever batch comes, on-policy samples (`lmbda > 0`)
are scored too.
"""

from __future__ import annotations

from ..losses import TopKTargets
from ..teachers.served import ServedTeacher
from .token_offline import OfflineTokenMode


class _CheckedTargets:
    """The served teacher, refusing token ids outside the student's vocabulary (a teacher with another tokenizer)."""

    def __init__(self, teacher: ServedTeacher, vocab_size: int):
        self.teacher, self.vocab_size = teacher, vocab_size

    def targets(self, inputs, top_k: int | None = None) -> TopKTargets:
        targets = self.teacher.targets(inputs, top_k)
        largest = int(targets.ids.max()) if targets.ids.numel() else -1
        if largest >= self.vocab_size:
            raise ValueError(
                f"The teacher served at `teacher_url={self.teacher.base_url!r}` ({self.teacher.model!r}) returned "
                f"token id {largest}, outside the student's vocabulary of {self.vocab_size}: it does not share the "
                "student's tokenizer. Serve a teacher with the student's vocabulary (token mode compares ids)."
            )
        return targets


class ServedTokenMode(OfflineTokenMode):
    """`alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE` with the teacher's top-k scored live over HTTP.

    `TokenMode.for_served_teacher()` returns this class and the trainer builds it when `teacher_url` is set without
    `teacher_cache` (it is not registered under a name of its own). No teacher is loaded here; held-out KL, which
    needs the teacher's full distribution, is not measured.
    """

    supports_generated_completions = True  # any batch is scored, the student's own samples too

    def open_teacher_targets(self, context):
        """A [`~trl_distill.teachers.served.ServedTeacher`] for `teacher_url` (it checks the server and the model
        now, before training)."""
        args = context.args
        teacher = ServedTeacher(
            args.teacher_url,
            top_k=args.kd_top_k,
            temperature=args.kd_temperature,
            model=args.teacher_served_model,
            prompts_per_request=args.teacher_prompts_per_request,
            max_concurrency=args.teacher_max_concurrency,
            timeout=args.teacher_request_timeout,
            max_retries=args.teacher_max_retries,
        )
        return _CheckedTargets(teacher, context.vocab_size)

    @classmethod
    def describe(cls, args) -> str:
        return f"{cls.label} ({args.objective}), scored live by a served teacher"
