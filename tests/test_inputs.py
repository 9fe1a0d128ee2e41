"""Inputs that get a named error (field, value, fix) instead of a library traceback, and warnings for ignored settings.

Each case here failed before with an error from deep inside `datasets`, TRL, torch or transformers (named in the
comment), or trained on silently.
"""

import warnings

import pytest
from datasets import Dataset

from tests.helpers import config
from trl_distill import DistillConfig, DistillTrainer
from trl_distill.demo.tiny import build_tiny_model


def _trainer(tmp_path, tokenizer, student, teacher, train_dataset, eval_dataset=None, **kwargs):
    return DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **kwargs),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


# ---------------------------------------------------------------- datasets


@pytest.mark.parametrize(
    "rows,match",
    [
        # was: KeyError: 'text' (TRL's tokenization)
        ({"question": ["a"], "answer": ["b"]}, r"`train_dataset` has none of the columns .* \['question', 'answer'\]"),
        # was: KeyError: 'completion'
        ({"prompt": ["a", "b"]}, r"`train_dataset` has a `prompt` column but no `completion` column"),
        ({"completion": ["a"]}, r"`train_dataset` has a `completion` column but no `prompt` column"),
        # was: AttributeError: 'NoneType' object has no attribute 'endswith' (TRL's add_eos)
        (
            {"prompt": ["a", "b", "c"], "completion": ["x", None, None]},
            r"Row 1 of `train_dataset` has `completion=None` \(2 row",
        ),
        ({"text": ["a", None]}, r"Row 1 of `train_dataset` has `text=None`"),
        # was: StopIteration (TRL reads the first row)
        ({"prompt": [], "completion": []}, r"`train_dataset` is empty \(0 rows\)"),
    ],
    ids=["no-known-column", "no-completion", "no-prompt", "completion-none", "text-none", "empty"],
)
def test_bad_training_rows_get_a_named_error(tmp_path, tokenizer, make_student, make_teacher, rows, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, tokenizer, make_student(), make_teacher(), Dataset.from_dict(rows))


def test_bad_eval_rows_name_the_eval_set(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(ValueError, match=r"`eval_dataset\['held'\]` is empty"):
        _trainer(tmp_path, tokenizer, make_student(), make_teacher(), prompt_completion_dataset, {"held": empty})


def test_none_after_a_selection_is_found_in_the_selected_rows(tmp_path, tokenizer, make_student, make_teacher):
    # `select` keeps an indices mapping over the full table: the null in row 0 of the table is not selected.
    full = Dataset.from_dict({"prompt": ["p"] * 4, "completion": [None, "a", "b", "c"]})
    trainer = _trainer(tmp_path, tokenizer, make_student(), make_teacher(), full.select([1, 2, 3]), max_steps=1)
    assert len(trainer.train_dataset) == 3
    with pytest.raises(ValueError, match="Row 1 of"):
        _trainer(tmp_path, tokenizer, make_student(), make_teacher(), full.select([1, 0]))


def test_every_row_beyond_max_length_is_an_error(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    # was: "num_samples should be a positive integer value, but got num_samples=0" (torch's sampler, at `train()`)
    with pytest.raises(ValueError, match=r"No row of `train_dataset` is left: all 24 rows .* `max_length=4`"):
        _trainer(tmp_path, tokenizer, make_student(), make_teacher(), prompt_completion_dataset, max_length=4)


def test_rows_dropped_by_truncation_warn(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    lengths = sorted(len(tokenizer(p)["input_ids"]) for p in prompt_completion_dataset["prompt"])
    cut = lengths[len(lengths) // 2] + 1  # about half of the prompts fill `max_length` alone
    with pytest.warns(UserWarning, match=r"\d+ of 24 rows of `train_dataset` were dropped .* `max_length="):
        trainer = _trainer(
            tmp_path, tokenizer, make_student(), make_teacher(), prompt_completion_dataset, max_length=cut
        )
    assert 0 < len(trainer.train_dataset) < 24
    with warnings.catch_warnings():  # control: a length that fits every row drops nothing, says nothing
        warnings.filterwarnings("error", message=".*were dropped.*")
        _trainer(tmp_path, tokenizer, make_student(), make_teacher(), prompt_completion_dataset, max_length=1024)


# ---------------------------------------------------------------- models and paths


@pytest.mark.parametrize("where", ["argument", "config"])
def test_missing_teacher_path_is_named(tmp_path, tokenizer, make_student, prompt_completion_dataset, where):
    # was: HFValidationError "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" (transformers)
    missing = str(tmp_path / "no" / "teacher")
    field = "teacher_model" if where == "argument" else "teacher_model_name_or_path"
    with pytest.raises(ValueError, match=rf"`{field}='{missing}'` does not exist"):
        DistillTrainer(
            model=make_student(),
            teacher_model=missing if where == "argument" else None,
            args=config(tmp_path, **({"teacher_model_name_or_path": missing} if where == "config" else {})),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
        )


def test_missing_student_path_is_named(tmp_path, tokenizer, make_teacher, prompt_completion_dataset):
    with pytest.raises(ValueError, match=r"`model='\./nowhere/student'` does not exist"):
        DistillTrainer(
            model="./nowhere/student",
            teacher_model=make_teacher(),
            args=config(tmp_path),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
        )


def test_teacher_without_a_tokenizer_is_refused_in_token_mode(
    tmp_path, tokenizer, make_student, prompt_completion_dataset
):
    # was: a log warning ("assuming it shares the student's vocabulary"), then training on possibly wrong targets
    def in_memory():
        return build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=2)  # no path, no tokenizer

    with pytest.raises(ValueError, match=r"no path to load one from\. Pass `teacher_processing_class="):
        _trainer(tmp_path, tokenizer, make_student(), in_memory(), prompt_completion_dataset)
    bare = tmp_path / "weights-only"
    in_memory().save_pretrained(bare)  # a directory with the model but no tokenizer files
    with pytest.raises(ValueError, match=r"has no tokenizer files\. Pass `teacher_processing_class="):
        _trainer(tmp_path, tokenizer, make_student(), str(bare), prompt_completion_dataset)
    # Saying which tokenizer the teacher uses is enough (and it is checked against the student's).
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=in_memory(),
        args=config(tmp_path),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,
    )
    assert trainer.vocab_size == len(tokenizer)


# ---------------------------------------------------------------- config fields


@pytest.mark.parametrize(
    "field,value",
    [
        ("kd_temperature", "2"),
        ("alpha", "0.5"),
        ("beta", "0.3"),
        ("lmbda", "1"),
        ("feature_weight", "1"),
        ("temperature", "0.7"),
        ("top_p", "0.9"),
        ("kd_top_k", "8"),
        ("max_completion_length", "64"),
        ("alpha", None),
        ("seq_kd", "yes"),
        ("heldout_eval", 1),
    ],
)
def test_config_values_of_the_wrong_type_name_the_field(tmp_path, field, value):
    # was: TypeError: '<=' not supported between instances of 'float' and 'str' (no field named); `seq_kd="yes"`
    # counted as True
    with pytest.raises(TypeError, match=rf"^`{field}` must be .*got {value!r}"):
        DistillConfig(output_dir=str(tmp_path), **{field: value})


def test_strings_from_the_command_line_and_yaml_still_parse(tmp_path):
    from trl import TrlParser

    parser = TrlParser((DistillConfig,))
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--kd_temperature", "2", "--kd_top_k", "8", "--seq_kd", "true", "--alpha", "1"]
    )
    assert (args.kd_temperature, args.kd_top_k, args.seq_kd, args.alpha) == (2.0, 8, True, 1.0)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"output_dir: {tmp_path}\nkd_temperature: 3\nbeta: '0.25'\nobjective: generalized_jsd\nlmbda: 1\n")
    (args,) = parser.parse_args_and_config(["--config", str(yaml)])
    assert (args.kd_temperature, args.beta, args.lmbda) == (3, 0.25, 1)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
def test_beta_with_an_objective_that_ignores_it_warns(tmp_path, objective):
    with pytest.warns(UserWarning, match=rf"`beta=0.2` is ignored with `objective='{objective}'`"):
        DistillConfig(output_dir=str(tmp_path), objective=objective, beta=0.2)


def test_beta_is_not_warned_about_when_it_is_read_or_left_alone(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*`beta=.*")
        DistillConfig(output_dir=str(tmp_path), objective="generalized_jsd", beta=0.2)
        DistillConfig(output_dir=str(tmp_path), objective="forward_kl")


def test_bf16_default_follows_the_hardware(tmp_path):
    # was: ValueError "Your setup doesn't support bf16/gpu" from `DistillConfig(output_dir=...)` on a CPU machine
    import torch
    from transformers.utils import is_torch_bf16_gpu_available

    args = DistillConfig(output_dir=str(tmp_path))
    assert args.bf16 is bool(is_torch_bf16_gpu_available())
    assert DistillConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is False
    assert DistillConfig(output_dir=str(tmp_path), bf16=False).bf16 is False  # explicit values are kept
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16"):  # control: asking for bf16 on a CPU machine is still refused
            DistillConfig(output_dir=str(tmp_path), bf16=True)


def test_field_types_are_checked_after_a_parser_resolved_the_annotations(tmp_path):
    from trl import TrlParser

    TrlParser((DistillConfig,))  # `HfArgumentParser` replaces each dataclass field's `type` with the resolved type
    with pytest.raises(TypeError, match=r"^`kd_temperature` must be a number, got '2'"):
        DistillConfig(output_dir=str(tmp_path), kd_temperature="2")
