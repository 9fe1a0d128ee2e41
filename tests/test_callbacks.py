"""Held-out KL / perplexity: the figures against a float64 reference, the callback's logging, the plateau warning."""

import math
import types
import warnings

import evaluate
import numpy as np
import pytest
import torch
from transformers import ProgressCallback

from tests.distill_artifacts import tiny_args
from trl_distill import DistillTrainer
from trl_distill.callbacks import HeldOutKLCallback, find_heldout_callback, is_plateau
from trl_distill.evaluation import heldout_metrics, tokenize_prompt_completion
from trl_distill.metrics import TeacherStudentGap, TokenPerplexity


def reference_heldout(student, teacher, tokenizer, rows, vocab_size):
    """Written from the definitions, in float64, one row at a time on full logits, pooled over tokens."""
    kl_ts, kl_st, agree, tv, nll_s, nll_t = [], [], [], [], [], []
    for row in rows:
        ids, mask = tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"])
        x = torch.tensor([ids])
        keep = torch.tensor(mask[1:], dtype=torch.bool)  # logits at t predict token t + 1
        with torch.no_grad():
            q = torch.softmax(student(x).logits[0, :-1, :vocab_size].double(), -1)[keep]  # student
            p = torch.softmax(teacher(x).logits[0, :-1, :vocab_size].double(), -1)[keep]  # teacher
        gold = torch.tensor(ids[1:])[keep]
        kl_ts += (p * (p / q).log()).sum(-1).tolist()
        kl_st += (q * (q / p).log()).sum(-1).tolist()
        agree += (p.argmax(-1) == q.argmax(-1)).double().tolist()
        tv += (0.5 * (p - q).abs().sum(-1)).tolist()  # total variation distance
        nll_s += (-q[torch.arange(len(gold)), gold].log()).tolist()
        nll_t += (-p[torch.arange(len(gold)), gold].log()).tolist()
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "kl_teacher_student": mean(kl_ts),
        "kl_student_teacher": mean(kl_st),
        "top1_agreement": mean(agree),
        "acceptance_rate": 1 - mean(tv),
        "student_perplexity": math.exp(mean(nll_s)),
        "teacher_perplexity": math.exp(mean(nll_t)),
        "num_tokens": len(kl_ts),
    }


def test_heldout_figures_match_the_float64_reference(tokenizer, make_student, make_teacher, eval_dataset):
    student, teacher = make_student(), make_teacher()
    with torch.no_grad():  # a peaked teacher, so that the two KL directions differ clearly
        teacher.get_output_embeddings().weight.mul_(40.0)
    got = heldout_metrics(student, teacher, tokenizer, eval_dataset, batch_size=3)
    want = reference_heldout(student, teacher, tokenizer, eval_dataset, len(tokenizer))
    for key in (
        "kl_teacher_student",
        "kl_student_teacher",
        "top1_agreement",
        "acceptance_rate",
        "student_perplexity",
        "teacher_perplexity",
    ):
        assert got[key] == pytest.approx(want[key], rel=2e-5, abs=1e-7), key
    assert got["num_tokens"] == want["num_tokens"]
    assert got["perplexity_gap"] == pytest.approx(want["student_perplexity"] - want["teacher_perplexity"], rel=1e-5)
    # Negative controls: the other KL direction, and 1 - L1 distance (TV without its 1/2), must not match.
    assert got["kl_teacher_student"] != pytest.approx(want["kl_student_teacher"], rel=1e-3)
    assert got["acceptance_rate"] != pytest.approx(2 * want["acceptance_rate"] - 1, rel=1e-3)
    # A model against itself: no gap, every draft accepted.
    same = heldout_metrics(teacher, teacher, tokenizer, eval_dataset)
    assert same["acceptance_rate"] == pytest.approx(1.0, abs=1e-6) and same["perplexity_gap"] == 0.0


def test_metrics_are_offline_evaluate_modules():
    metric = TokenPerplexity()
    assert isinstance(metric, evaluate.Metric)
    metric.add_batch(nll=[1.0, 2.0])
    metric.add_batch(nll=[3.0])
    result = metric.compute()
    assert result["perplexity"] == pytest.approx(math.exp(2.0)) and result["num_tokens"] == 3
    gap = TeacherStudentGap()
    columns = {name: np.array([0.0, 1.0, 0.5]) for name in TeacherStudentGap._COLUMNS}
    gap.add_batch(**columns)
    assert gap.compute() == pytest.approx({**{name: 0.5 for name in columns}, "num_tokens": 3})


def test_distill_trainer_logs_heldout_figures(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, eval_dataset
):
    teacher = make_teacher()
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=teacher,
        args=tiny_args(
            tmp_path,
            max_steps=4,
            eval_strategy="steps",
            eval_steps=2,
            metric_for_best_model="heldout_kl_teacher_student",
        ),
        train_dataset=prompt_completion_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    callback = find_heldout_callback(trainer)
    assert callback is not None
    trainer.train()
    logged = [log for log in trainer.state.log_history if "heldout_kl_teacher_student" in log]
    assert [log["step"] for log in logged] == [2, 4]  # each evaluation; the end (step 4) is not measured twice
    for key in (
        "kl_student_teacher",
        "top1_agreement",
        "acceptance_rate",
        "student_perplexity",
        "teacher_perplexity",
        "perplexity_gap",
        "num_tokens",
    ):
        assert "heldout_" + key in logged[-1]
    # The trainer's tokenized eval rows give the figures of the raw prompt/completion rows.
    direct = heldout_metrics(trainer.model, teacher, tokenizer, eval_dataset)
    assert logged[-1]["heldout_kl_teacher_student"] == pytest.approx(direct["kl_teacher_student"], rel=1e-6)
    assert logged[-1]["heldout_num_tokens"] == direct["num_tokens"]
    assert logged[0]["heldout_kl_teacher_student"] != pytest.approx(direct["kl_teacher_student"], rel=1e-6)
    assert "eval_heldout_kl_teacher_student" in trainer.evaluate()


def test_plain_sft_trainer_measures_at_the_end(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, eval_dataset
):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=make_student(),
        args=args,
        train_dataset=prompt_completion_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    trainer.add_callback(HeldOutKLCallback(trainer, teacher_model=make_teacher(), max_rows=4))
    trainer.train()
    last = trainer.state.log_history[-1]
    assert last["step"] == 1 and last["heldout_kl_teacher_student"] > 0 and "heldout_acceptance_rate" in last
    with pytest.raises(ValueError, match="teacher_model"):
        HeldOutKLCallback(trainer)


def test_progress_bar_postfix():
    bar = types.SimpleNamespace(postfix=None, set_postfix=lambda refresh=False, **kw: setattr(bar, "postfix", kw))
    progress = ProgressCallback()
    progress.training_bar = bar
    callback = HeldOutKLCallback.__new__(HeldOutKLCallback)
    callback.trainer = types.SimpleNamespace(callback_handler=types.SimpleNamespace(callbacks=[progress]))
    callback.last_metrics = {"kl_teacher_student": 0.125, "student_perplexity": 3.5}
    callback._show_in_progress_bar()
    assert bar.postfix == {"heldout_kl": "0.125", "heldout_ppl": "3.5"}


@pytest.mark.parametrize(
    "kl,loss,patience,expected",
    [
        ([1.0, 0.5, 0.51, 0.52], [3.0, 2.0, 1.5, 1.0], 2, True),  # KL stuck for 2 evals, loss still falling
        ([1.0, 0.5, 0.51, 0.52], [3.0, 2.0, 2.0, 2.0], 2, False),  # loss flat too: converged, not a capacity gap
        ([1.0, 0.5, 0.45, 0.40], [3.0, 2.0, 1.5, 1.0], 2, False),  # KL still improving
        ([1.0, 0.5, 0.51], [3.0, 2.0, 1.5], 3, False),  # not enough evaluations yet
        ([1.0, 0.5, 0.51, 0.52], [3.0, 2.0, 1.5, 1.0], 0, False),  # disabled
    ],
)
def test_plateau_detection(kl, loss, patience, expected):
    assert is_plateau(kl, loss, patience) is expected


def test_plateau_warns_once():
    callback = HeldOutKLCallback.__new__(HeldOutKLCallback)
    callback.__dict__.update(
        kl_history=[], loss_history=[], plateau_patience=2, plateau_min_delta=1e-3, plateau_warned=False
    )
    state = types.SimpleNamespace(global_step=0, log_history=[])
    with pytest.warns(UserWarning, match="capacity gap") as record:
        for step, (kl, loss) in enumerate(zip([1.0, 0.5, 0.51, 0.52, 0.53], [3.0, 2.0, 1.5, 1.0, 0.8]), start=1):
            state.global_step = step
            state.log_history.append({"loss": loss, "step": step})
            callback.last_metrics = {"kl_teacher_student": kl}
            callback._check_plateau(state)
    assert len([w for w in record if "capacity gap" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback._check_plateau(state)  # already warned: silent


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(heldout_max_rows=0), "heldout_max_rows"), (dict(heldout_plateau_patience=-1), "heldout_plateau_patience")],
)
def test_config_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(tmp_path, **kwargs)
