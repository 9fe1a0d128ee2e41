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

from . import gate
from .evaluation import greedy_answers, heldout_metrics


__all__ = [
    "HeldOutKLCallback",
    "ReleaseGateCallback",
    "add_heldout_callback",
    "add_release_gate_callback",
    "find_heldout_callback",
    "heldout_results",
    "is_plateau",
    "release_gate_record",
]

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
    if getattr(args, "teacher_context", None) is not None:
        # Context distillation (issue 15): the callback feeds both models the same tokens, but the gap being closed is
        # the teacher *with* the context vs the student without; `eval_kd_loss` measures that one.
        logger.warning(
            "Held-out KL is not measured with `teacher_context` (distill_mode='context'): see eval_kd_loss."
        )
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


# ---- the release gate (issue 16): judged at the end of training, after the held-out measurement --------------------


class ReleaseGateCallback(TrainerCallback):
    """
    Evaluate the release gate (`trl_distill.gate`) at the end of training, after [`HeldOutKLCallback`] has measured.

    The thresholds are judged on the held-out callback's figures of the same step; the check
    (`release_gate_check`) scores the student's greedy answers to the held-out prompts. The result is logged
    (`release_gate_passed`, and `release_gate_check_pass_fraction` with a check) and kept for the save
    ([`release_gate_record`]): a student saved at another step records the gate as not evaluated, and never passes.

    Args:
        trainer (`DistillTrainer`): Its `args` hold the gate's settings.
        heldout (`HeldOutKLCallback`, *optional*): Where the figures (and, with a check, the prompts) come from;
            required with thresholds.
        rows (`list[dict]`, *optional*): Prompts for the check when there is no held-out callback.
    """

    def __init__(self, trainer, heldout: HeldOutKLCallback | None = None, rows: list[dict] | None = None):
        args = trainer.args
        self.trainer, self.heldout, self._rows = trainer, heldout, rows
        self.settings = gate.gate_settings(
            args.release_gate, args.release_gate_check, args.release_gate_min_pass, args.max_completion_length
        )
        self.check = gate.load_release_check(args.release_gate_check) if args.release_gate_check else None
        self.result: dict | None = None
        self.override: dict | None = None

    @property
    def rows(self) -> list[dict]:
        return self.heldout.rows if self.heldout is not None else self._rows

    def evaluate(self, state, model=None) -> dict:
        """Judge the gate on the weights of `state.global_step` (measuring the held-out figures when not yet done)."""
        step = state.global_step
        if self.result is not None and self.result.get("step") == step:
            return self.result
        model = model if model is not None else self.trainer.model
        figures = self.heldout._measure_and_log(state, model) if self.heldout is not None else None
        check = None
        if self.check is not None:
            args = self.trainer.args
            tokenizer = getattr(self.trainer.processing_class, "tokenizer", self.trainer.processing_class)
            prompts, answers, references = greedy_answers(
                model,
                tokenizer,
                self.rows,
                max_new_tokens=args.max_completion_length,
                batch_size=args.per_device_eval_batch_size,
            )
            check = gate.score_answers(self.check, self.settings["check"], prompts, answers, references)
            if check["failed"]:
                shown = "; ".join(f"{prompts[i]!r} -> {answers[i]!r}" for i in check["failed"][:3])
                logger.info(
                    "Release-gate check %s: %d of %d answers fail, e.g. %s",
                    self.settings["check"],
                    len(check["failed"]),
                    check["num_answers"],
                    shown,
                )
        self.result, self.override = gate.evaluate_gate(self.settings, figures, check, step=step), None
        logs = {"release_gate_passed": float(self.result["passed"])}
        if check is not None:
            logs["release_gate_check_pass_fraction"] = check["pass_fraction"]
        self.trainer.log(logs)
        if not self.result["passed"]:
            logger.warning(
                "The student fails its release gate: %s. `push_to_hub` will refuse it.",
                "; ".join(gate.gate_failures({"result": self.result})),
            )
        return self.result

    def record(self, step: int) -> dict:
        """The gate record the receipt holds for weights at `step` (not evaluated when judged at another step)."""
        result = self.result if self.result is not None and self.result.get("step") == step else None
        override = self.override if result is not None else None
        return {
            "settings": dict(self.settings),
            "result": dict(result) if result else gate.not_evaluated(step),
            "override": dict(override) if override else None,
        }

    def allow(self, reason: str, source: str) -> None:
        """Record an override of the failed gate of the current weights: `reason`, and where it came from."""
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(
                f"`override_release_gate` must be a non-empty reason (it is recorded in the receipt), got {reason!r}."
            )
        self.override = {"reason": reason.strip(), "source": source}

    def refuse(self, state, override: str | None, output_dir) -> gate.ReleaseGateError | None:
        """What `push_to_hub` raises (after saving) for the current weights: `None` when the gate passes or is
        overridden (by `override`, else `args.release_gate_override`; the override is then recorded)."""
        result = self.evaluate(state)
        if result["passed"]:
            return None
        failures = gate.gate_failures({"result": result})
        reason = override if override is not None else self.trainer.args.release_gate_override
        if reason is not None:
            self.allow(reason, "push_to_hub" if override is not None else "release_gate_override")
            logger.warning(
                "Pushing a student that fails its release gate (%s), overridden: %s",
                "; ".join(failures),
                self.override["reason"],
            )
            return None
        message = (
            f"`push_to_hub` refused: the student fails its release gate: {'; '.join(failures)}. It is saved, not "
            f"uploaded, in {str(output_dir)!r} (its README.md and distill_receipt.json record the gate's result). "
            "Train further or relax `release_gate`; or push anyway with `trainer.push_to_hub(override_release_gate="
            '"<reason>")` (or `release_gate_override` in the config): the reason is recorded in the receipt and '
            "the card."
        )
        return gate.ReleaseGateError(message, str(output_dir), [c for c in result["checks"] if not c["passed"]])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.evaluate(state, model)


def add_release_gate_callback(trainer, heldout: HeldOutKLCallback | None) -> ReleaseGateCallback | None:
    """Attach a [`ReleaseGateCallback`] when `args` configure a gate (after the held-out callback: it judges its
    figures). Raises at trainer init, not after training, when the gate cannot be judged."""
    args = trainer.args
    if not (getattr(args, "release_gate", None) or getattr(args, "release_gate_check", None)):
        return None
    if args.release_gate and heldout is None:
        raise ValueError(
            f"`release_gate={args.release_gate}` is judged on held-out figures, but none will be measured: they need "
            "a live teacher sharing the student's vocabulary (not `teacher_cache`), an `eval_dataset` (unpacked) and "
            "`heldout_eval=True`. Provide them, or keep only `release_gate_check`."
        )
    rows = None
    if heldout is None:  # a check alone: its prompts come from the eval set
        eval_dataset = trainer.eval_dataset
        if isinstance(eval_dataset, Mapping):
            eval_dataset = next(iter(eval_dataset.values()), None)
        if eval_dataset is None:
            raise ValueError(
                f"`release_gate_check={args.release_gate_check!r}` scores greedy answers to the held-out prompts: "
                "pass an `eval_dataset`."
            )
        rows = list(itertools.islice(iter(eval_dataset), args.heldout_max_rows))
    callback = ReleaseGateCallback(trainer, heldout=heldout, rows=rows)
    trainer.add_callback(callback)
    return callback


def find_release_gate_callback(trainer) -> ReleaseGateCallback | None:
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, ReleaseGateCallback)), None)


def release_gate_record(trainer, *, evaluate: bool = False) -> dict | None:
    """The trainer's gate record for its current weights (`None` without a gate); `evaluate=True` judges it now when
    it was not judged at this step (what `push_to_hub` does)."""
    callback = find_release_gate_callback(trainer)
    if callback is None:
        return None
    if evaluate:
        callback.evaluate(trainer.state)
    return callback.record(trainer.state.global_step)
