"""The mode seam: the registry is the only way a mode is found, a mode reads a `ModeContext`, and a mode written in
user code (here: in this file) validates its settings and trains end to end."""

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests import helpers
from trl_distill import (
    DistillConfig,
    DistillMode,
    DistillTrainer,
    MetricsSink,
    ModeContext,
    available_modes,
    register_mode,
)
from trl_distill.batch import model_inputs
from trl_distill.modes import OfflineTokenMode, SequenceMode, TokenMode, ULDMode, get_mode


def config(tmp_path, **kwargs):
    return helpers.config(tmp_path, **kwargs)


# A mode as a user would write it: cross-entropy toward the teacher's greedy token at every response position.
@register_mode("test_teacher_argmax")
class TeacherArgmaxMode(DistillMode):
    """CE(student, argmax teacher) over the response tokens; `alpha` must be 1 (no gold-token term here)."""

    label = "teacher-argmax distillation"
    papers = ({"arxiv": "1606.07947", "title": "Sequence-Level Knowledge Distillation"},)
    built_with = []  # the contexts this mode was built from (to check what the trainer hands over)

    @classmethod
    def validate_config(cls, args):
        if args.alpha != 1.0:
            raise ValueError(f"`test_teacher_argmax` has no gold-token term: set `alpha=1.0`, got {args.alpha}.")
        super().validate_config(args)

    def __init__(self, context):
        super().__init__(context)
        type(self).built_with.append(context)

    def compute_loss(self, model, inputs, num_items_in_batch):
        batch = model_inputs(inputs)
        logits = model(**batch, use_cache=False).logits[:, :-1, : self.context.vocab_size].float()
        with torch.no_grad():
            teacher = self.context.teacher(**batch, use_cache=False).logits[:, :-1, : self.context.vocab_size]
        keep = inputs["labels"][:, 1:] != -100
        loss = F.cross_entropy(logits[keep], teacher.argmax(-1)[keep])
        if model.training:
            agreement = (logits[keep].argmax(-1) == teacher.argmax(-1)[keep]).float().mean().item()
            self.context.metrics.log({"argmax_agreement": agreement})
        return loss, {"argmax_ce": loss.detach()}


def test_builtin_modes_are_registered_and_describe_themselves():
    assert {"token", "uld", "sequence", "test_teacher_argmax"} <= set(available_modes())
    assert get_mode("token") is TokenMode and TokenMode.for_teacher_cache() is OfflineTokenMode
    assert ULDMode.for_teacher_cache() is None and SequenceMode.for_teacher_cache() is None
    args = DistillConfig(output_dir="unused", use_cpu=True, objective="reverse_kl")
    assert TokenMode.describe(args) == "token-level knowledge distillation (reverse_kl)"
    assert SequenceMode.describe(args) == "sequence-level knowledge distillation"  # no objective: it is plain CE
    assert TeacherArgmaxMode.describe(args) == "teacher-argmax distillation"
    for mode in (TokenMode, SequenceMode, ULDMode):
        assert mode.papers and all(set(p) == {"arxiv", "title"} for p in mode.papers), mode


def test_register_mode_refuses_malformed_names_and_duplicates():
    with pytest.raises(ValueError, match="lowercase identifiers"):
        register_mode("Token-KD")
    with pytest.raises(TypeError, match="DistillMode subclass"):
        register_mode("test_not_a_mode")(object)
    with pytest.raises(ValueError, match="already registered"):
        register_mode("token")(TeacherArgmaxMode)
    assert get_mode("token") is TokenMode


def test_config_finds_modes_through_the_registry_only(tmp_path):
    with pytest.raises(ValueError, match=r"registered modes \(.*'token'.*\), got 'unknown'"):
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, distill_mode="unknown")
    # The user's mode is accepted, and its own check runs.
    assert DistillConfig(output_dir=str(tmp_path), use_cpu=True, distill_mode="test_teacher_argmax", alpha=1.0)
    with pytest.raises(ValueError, match="set `alpha=1.0`, got 0.9"):
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, distill_mode="test_teacher_argmax")
    # The shared knobs are checked against the class attributes, for every mode.
    for kwargs, match in [
        (dict(feature_weight=1.0), "`feature_weight=1.0` is supported with `distill_mode='token'` only"),
        (dict(lmbda=0.5), "cannot score completions generated during training"),
        (dict(teacher_cache=str(tmp_path), kd_top_k=4), r"cannot train from `teacher_cache`; offline stores serve"),
    ]:
        with pytest.raises(ValueError, match=match):
            DistillConfig(
                output_dir=str(tmp_path), use_cpu=True, distill_mode="test_teacher_argmax", alpha=1.0, **kwargs
            )


def test_mode_specific_checks_live_on_the_mode(tmp_path):
    with pytest.raises(ValueError, match="`distill_mode='uld'` with `lmbda=0.5`"):
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, distill_mode="uld", lmbda=0.5, alpha=1.0)
    with pytest.raises(ValueError, match="`distill_mode='sequence'` trains on teacher text"):
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, distill_mode="sequence", seq_kd=True)
    with pytest.warns(UserWarning, match="`kd_top_k=8` is ignored with `distill_mode='uld'`") as caught:
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, distill_mode="uld", kd_top_k=8)
    assert any(w.filename == __file__ for w in caught), "the warning should point at the user's line"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the token mode has no such warnings
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, distill_mode="token", kd_top_k=8)


def test_a_mode_from_user_code_trains_end_to_end(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    student, teacher = make_student(), make_teacher()
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    teacher_before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    TeacherArgmaxMode.built_with.clear()
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, distill_mode="test_teacher_argmax", alpha=1.0),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    assert isinstance(trainer.distill_mode, TeacherArgmaxMode)
    (context,) = TeacherArgmaxMode.built_with
    assert context.student is trainer.model and context.teacher is trainer.teacher_model
    assert context.vocab_size == len(tokenizer) and context.tokenizer is tokenizer
    assert context.train_dataset is trainer.train_dataset and "input_ids" in context.train_dataset.column_names
    assert context.feature_term is None and context.tokenization["max_length"] == trainer.args.max_length
    trainer.train()

    for name, p in trainer.model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"student parameter {name} did not change"
    for name, p in teacher.named_parameters():
        assert torch.equal(p.detach(), teacher_before[name]), f"teacher parameter {name} changed"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and all("argmax_ce" in log and "argmax_agreement" in log for log in logs), logs
    assert all(0.0 <= log["argmax_agreement"] <= 1.0 for log in logs)
    assert logs[-1]["argmax_ce"] < logs[0]["argmax_ce"]  # it learns what it is asked to


def test_a_mode_is_built_from_a_context_without_a_trainer(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    """The trainer's token mode and one built by hand from the same context give the same loss on a batch."""
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(tmp_path),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    sink = MetricsSink()
    context = ModeContext(
        args=trainer.args,
        student=trainer.model,
        teacher=trainer.teacher_model,
        tokenizer=tokenizer,
        teacher_tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        metrics=sink,
    )
    by_hand = TokenMode(context)
    expected, _ = trainer.distill_mode.compute_loss(trainer.model, batch, None)
    loss, metrics = by_hand.compute_loss(trainer.model, batch, None)
    torch.testing.assert_close(loss, expected)
    assert set(metrics) == {"kd_loss", "ce_loss", "kd_tokens"}
    # A narrower vocabulary is honoured: the context, not the trainer, is what the mode reads.
    narrow_mode = TokenMode(dataclasses.replace(context, vocab_size=len(tokenizer) - 10))
    narrow, _ = narrow_mode.compute_loss(trainer.model, batch, None)
    assert not torch.allclose(narrow, expected)
    sink.log({"x": 1.0})
    assert sink.values() == {"x": [1.0]}
    with pytest.raises(ValueError, match="`split` must be 'train' or 'eval'"):
        sink.log({"x": 1.0}, split="test")
