"""Held-out KL / perplexity measurement during training, with a warning when the student stops closing the gap.

[`HeldOutKLCallback`] runs the student and the teacher on a fixed held-out set with teacher forcing at every
evaluation and at the end of training, and logs through the Trainer (`report_to`, the progress bar,
`trainer.state.log_history`):

| key | meaning |
|---|---|
| `heldout_kl_teacher_student` | KL(teacher‖student), the forward KL token-level KD minimizes |
| `heldout_kl_student_teacher` | KL(student‖teacher) |
| `heldout_top1_agreement` | fraction of positions where both argmaxes agree |
| `heldout_acceptance_rate` | 1 − TV(teacher, student): expected speculative-decoding acceptance of student drafts |
| `heldout_student_perplexity`, `heldout_teacher_perplexity`, `heldout_perplexity_gap` | gold-token perplexities |
| `heldout_num_tokens` | positions measured |

`DistillTrainer` adds one by itself when it has a teacher and an eval set (`DistillConfig.heldout_eval`). With a plain
`SFTTrainer`, give it a teacher, as TRL's own callbacks take their trainer:

```python
trainer = SFTTrainer(model=student, args=args, train_dataset=train, eval_dataset=test)
trainer.add_callback(HeldOutKLCallback(trainer, teacher_model=teacher))
```
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import ProgressCallback, TrainerCallback

from .evaluation import heldout_metrics


__all__ = ["HeldOutKLCallback", "add_heldout_callback", "find_heldout_callback", "heldout_results", "is_plateau"]

logger = logging.getLogger(__name__)

PREFIX = "heldout_"
_ROW_COLUMNS = ("input_ids", "labels", "completion_mask", "assistant_masks", "prompt", "completion", "messages")


def is_plateau(
    kl_history: Sequence[float], loss_history: Sequence[float | None], patience: int, min_delta: float = 1e-3
) -> bool:
    """
    Whether held-out KL stopped improving while the training loss still falls.

    True when none of the last `patience` KL values beats the best KL before them by more than `min_delta`
    (relative), while the training loss at the last evaluation is lower, by more than `min_delta` (relative), than at
    the evaluation where that best KL was reached.

    Args:
        kl_history (`Sequence[float]`): Held-out KL at each evaluation, oldest first.
        loss_history (`Sequence[float | None]`): Training loss at the same evaluations (`None` when none was logged).
        patience (`int`): Evaluations without improvement; `0` disables the check.
        min_delta (`float`): Relative change below which a value counts as unchanged.
    """
    if patience < 1 or len(kl_history) <= patience or len(loss_history) != len(kl_history):
        return False
    earlier = kl_history[:-patience]
    best_index = min(range(len(earlier)), key=earlier.__getitem__)
    best = earlier[best_index]
    stalled = all(kl > best * (1 - min_delta) for kl in kl_history[-patience:])
    loss_then, loss_now = loss_history[best_index], loss_history[-1]
    return stalled and loss_then is not None and loss_now is not None and loss_now < loss_then * (1 - min_delta)


class HeldOutKLCallback(TrainerCallback):
    """
    Log teacher-forced held-out metrics of the student against a teacher at every evaluation and at the end.

    The figures come from [`trl_distill.evaluation.heldout_metrics`] (temperature 1, completion tokens only, pooled
    over the set); they are logged with the `heldout_` prefix through `trainer.log` (so `report_to`, the printed logs
    and `trainer.state.log_history` get them), shown in the progress bar's postfix, and added to the metrics that
    `trainer.evaluate()` returns as `eval_heldout_*` (so `metric_for_best_model="heldout_kl_teacher_student"` works).

    A plateau warning is issued once when held-out KL has not improved for `plateau_patience` evaluations while the
    training loss still falls: the student has likely hit its capacity gap with this teacher.

    Args:
        trainer (`transformers.Trainer`): The trainer whose model is measured and that logs the figures.
        teacher_model (`PreTrainedModel`, *optional*): The teacher; defaults to `trainer.teacher_model`.
        eval_dataset (`datasets.Dataset` or iterable of mappings, *optional*): Raw prompt/completion or `messages`
            rows (measured on the final assistant turn, as `DistillTrainer` trains them) or rows tokenized by
            `SFTTrainer`; defaults to `trainer.eval_dataset`. The same rows are used every time.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Defaults to the trainer's `processing_class`.
        max_rows (`int`, *optional*): Measure only the first `max_rows` rows (all by default).
        batch_size (`int`, *optional*): Rows per forward pass; defaults to `per_device_eval_batch_size`.
        vocab_size (`int`, *optional*): Leading logits compared; defaults to `trainer.vocab_size` when it has one,
            else `len(tokenizer)`.
        plateau_patience (`int`, *optional*, defaults to `3`): Evaluations without improvement before the warning;
            `0` disables it.
        plateau_min_delta (`float`, *optional*, defaults to `1e-3`): Relative change counted as no change.
    """

    def __init__(
        self,
        trainer,
        teacher_model=None,
        eval_dataset=None,
        *,
        tokenizer=None,
        max_rows: int | None = None,
        batch_size: int | None = None,
        vocab_size: int | None = None,
        plateau_patience: int = 3,
        plateau_min_delta: float = 1e-3,
    ):
        self.trainer = trainer
        self.teacher = teacher_model if teacher_model is not None else getattr(trainer, "teacher_model", None)
        if self.teacher is None:
            raise ValueError("`HeldOutKLCallback` needs a teacher: pass `teacher_model` (the trainer has none).")
        eval_dataset = eval_dataset if eval_dataset is not None else trainer.eval_dataset
        if eval_dataset is None:
            raise ValueError("`HeldOutKLCallback` needs held-out rows: pass `eval_dataset` (the trainer has none).")
        if isinstance(eval_dataset, Mapping):
            raise TypeError("`eval_dataset` is a dict of datasets: pass the one `HeldOutKLCallback` should measure.")
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"`max_rows` must be None (all rows) or a positive int, got {max_rows!r}.")
        if not isinstance(plateau_patience, int) or plateau_patience < 0:
            raise ValueError(
                f"`plateau_patience` must be an int >= 0 (0 disables the warning), got {plateau_patience!r}."
            )
        self.eval_dataset = eval_dataset
        self.max_rows = max_rows
        processing_class = tokenizer if tokenizer is not None else trainer.processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.batch_size = batch_size or trainer.args.per_device_eval_batch_size
        self.vocab_size = vocab_size if vocab_size is not None else getattr(trainer, "vocab_size", None)
        self.plateau_patience = plateau_patience
        self.plateau_min_delta = plateau_min_delta
        self._rows: list[dict] | None = None
        self.last_metrics: dict[str, float] | None = None
        self.last_step: int | None = None
        self.kl_history: list[float] = []
        self.loss_history: list[float | None] = []
        self.plateau_warned = False
        self.seconds = 0.0  # time spent measuring, so callers can tell training time from evaluation time

    @property
    def rows(self) -> list[dict]:
        """The held-out rows measured every time (materialized once, only the columns the measurement reads)."""
        if self._rows is None:
            rows = list(itertools.islice(iter(self.eval_dataset), self.max_rows))
            if rows and "seq_lengths" in rows[0]:
                raise ValueError(
                    "The held-out rows are packed (several sequences per row would attend to each other): set "
                    "`eval_packing=False` or pass unpacked `eval_dataset` rows to `HeldOutKLCallback`."
                )
            self._rows = [{k: row[k] for k in _ROW_COLUMNS if k in row} for row in rows]
        return self._rows

    def measure(self, model) -> dict[str, float]:
        """Compute the held-out figures of `model` against the teacher now (without logging them)."""
        return heldout_metrics(
            model, self.teacher, self.tokenizer, self.rows, batch_size=self.batch_size, vocab_size=self.vocab_size
        )

    def _measure_and_log(self, state, model) -> dict[str, float]:
        if self.last_step == state.global_step and self.last_metrics is not None:
            return self.last_metrics  # already measured at this step (several eval sets, or eval at the last step)
        start = time.perf_counter()
        self.last_metrics = self.measure(model if model is not None else self.trainer.model)
        self.seconds += time.perf_counter() - start
        self.last_step = state.global_step
        logs = {PREFIX + name: value for name, value in self.last_metrics.items()}
        self.trainer.log(dict(logs))
        self._show_in_progress_bar()
        self._check_plateau(state)
        return self.last_metrics

    def _show_in_progress_bar(self) -> None:
        for callback in self.trainer.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
            if bar is not None:
                metrics = self.last_metrics
                bar.set_postfix(
                    heldout_kl=f"{metrics['kl_teacher_student']:.4g}",
                    heldout_ppl=f"{metrics['student_perplexity']:.4g}",
                    refresh=False,
                )

    def _check_plateau(self, state) -> None:
        losses = [log["loss"] for log in state.log_history if "loss" in log]
        self.kl_history.append(self.last_metrics["kl_teacher_student"])
        self.loss_history.append(losses[-1] if losses else None)
        if self.plateau_warned or not is_plateau(
            self.kl_history, self.loss_history, self.plateau_patience, self.plateau_min_delta
        ):
            return
        self.plateau_warned = True
        best = min(self.kl_history[: -self.plateau_patience])
        first_loss = self.loss_history[self.kl_history.index(best)]
        warnings.warn(
            f"Held-out KL(teacher||student) has not improved for {self.plateau_patience} evaluations (best "
            f"{best:.4g}, now {self.kl_history[-1]:.4g}) while the training loss kept falling ({first_loss:.4g} -> "
            f"{self.loss_history[-1]:.4g}): the student is fitting the training set, not the teacher, which points "
            "to a capacity gap. Consider a bigger student, narrower training data, or on-policy distillation "
            "(students learn from their own samples). Set `plateau_patience=0` (`heldout_plateau_patience` in "
            "DistillConfig) to silence this.",
            UserWarning,
            stacklevel=2,
        )

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        figures = self._measure_and_log(state, model)
        if metrics is not None:
            metrics.update({f"eval_{PREFIX}{name}": value for name, value in figures.items()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._measure_and_log(state, model)


def add_heldout_callback(trainer) -> HeldOutKLCallback | None:
    """Attach a [`HeldOutKLCallback`] to a `DistillTrainer` per its config; return it, or None when not applicable."""
    args = trainer.args
    if not getattr(args, "heldout_eval", True) or trainer.teacher_model is None or trainer.eval_dataset is None:
        return None
    if not _tokenizers_share_vocabulary(trainer):
        # Teacher-forced KL compares the two next-token distributions id by id: meaningless across tokenizers.
        logger.warning(
            "Held-out KL is not measured: the teacher's tokenizer differs from the student's (distill_mode=%r). "
            "Compare students on task metrics or perplexity instead.",
            args.distill_mode,
        )
        return None
    eval_dataset = trainer.eval_dataset
    if isinstance(eval_dataset, Mapping):
        name = next(iter(eval_dataset))
        logger.warning("`eval_dataset` is a dict: held-out KL is measured on %r only.", name)
        eval_dataset = eval_dataset[name]
    if "seq_lengths" in (getattr(eval_dataset, "column_names", None) or []):
        warnings.warn(
            "The eval set is packed, so held-out KL is not measured (sequences of a packed row attend to each other). "
            "Set `eval_packing=False` to measure it.",
            UserWarning,
            stacklevel=3,
        )
        return None
    callback = HeldOutKLCallback(
        trainer,
        eval_dataset=eval_dataset,
        max_rows=args.heldout_max_rows,
        plateau_patience=args.heldout_plateau_patience,
    )
    trainer.add_callback(callback)
    return callback


def _tokenizers_share_vocabulary(trainer) -> bool:
    from .alignment import shared_vocab_size

    student = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    teacher = getattr(trainer, "teacher_processing_class", None) or student
    teacher = getattr(teacher, "tokenizer", teacher)
    try:
        shared_vocab_size(student, teacher)
    except ValueError:
        return False
    return True


def find_heldout_callback(trainer) -> HeldOutKLCallback | None:
    """The trainer's [`HeldOutKLCallback`], if it has one."""
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, HeldOutKLCallback)), None)


def heldout_results(trainer) -> tuple[dict[str, Any] | None, list[dict] | None]:
    """The last held-out figures and their rows, when they were measured at the trainer's current step."""
    callback = find_heldout_callback(trainer)
    if callback is None or callback.last_metrics is None or callback.last_step != trainer.state.global_step:
        return None, None
    return dict(callback.last_metrics), callback.rows
