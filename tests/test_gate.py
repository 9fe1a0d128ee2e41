"""The release gate (issue 16): thresholds on held-out figures and a check of greedy answers, judged at the end of
training; a student that fails is saved but not pushed; the receipt, the card and `verify` carry the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests import gate_checks
from tests.helpers import saved_teacher, tiny_args
from tests.hub_server import LocalHub
from trl_distill import DistillConfig, DistillTrainer
from trl_distill.gate import (
    ReleaseGateError,
    compare,
    evaluate_gate,
    gate_failures,
    gate_settings,
    load_release_check,
    parse_release_gate,
    record_problems,
)
from trl_distill.model_card import write_model_card
from trl_distill.receipt import RECEIPT_NAME, content_id, load_receipt, write_receipt
from trl_distill.verify import verify_artifact


KL = "heldout_kl_teacher_student"
PASSING = [f"{KL}<=1e9", "heldout_top1_agreement>=0"]
FAILING = [f"{KL}<=0", "heldout_top1_agreement>=0"]  # two different tiny models: KL(teacher||student) > 0


# ---------------------------------------------------------------------------------------------------- pure logic
@pytest.mark.parametrize(
    "value",
    [
        [f"{KL}<=0.5", "heldout_top1_agreement>=0.6"],
        f"{KL}<=0.5, heldout_top1_agreement >= 0.6",
        {KL: "<=0.5", "heldout_top1_agreement": ">= 0.6"},
        json.dumps([f"{KL}<=0.5", "heldout_top1_agreement>=0.6"]),
        json.dumps({KL: "<=0.5", "heldout_top1_agreement": ">=0.6"}),
    ],
)
def test_thresholds_parse_to_one_canonical_form(value):
    assert parse_release_gate(value) == [f"{KL}<=0.5", "heldout_top1_agreement>=0.6"]


@pytest.mark.parametrize(
    "value,error,match",
    [
        (["kl_teacher_student<=0.5"], ValueError, r"not a held-out figure \(did you mean 'heldout_kl_teacher_stu"),
        ([f"{KL}=0.5"], ValueError, r"is not 'name<=value'"),
        ([f"{KL}<=nan"], ValueError, "must be a finite number"),
        ([f"{KL}<=abc"], ValueError, "must be a finite number"),
        ([f"{KL}<=1", f"{KL}<=2"], ValueError, "more than once"),
        ({KL: 0.5}, ValueError, r"must be a string like '<=0.5'"),
        (0.5, TypeError, "must be None, a list"),
        ([0.5], TypeError, "entries must be strings"),
        ("{not json", ValueError, "does not parse"),
    ],
)
def test_bad_thresholds_name_the_field_and_the_fix(value, error, match):
    with pytest.raises(error, match=match) as raised:
        parse_release_gate(value)
    assert "`release_gate" in str(raised.value)


def test_verdicts_follow_the_operators():
    assert compare(0.5, "<=", 0.5) and not compare(0.5, "<", 0.5) and compare(0.6, ">", 0.5)
    assert not compare(float("nan"), "<=", 1.0) and not compare(float("nan"), ">=", 0.0)
    settings = gate_settings([f"{KL}<=0.5", "heldout_top1_agreement>=0.6"], "m:f", 0.75)
    result = evaluate_gate(
        settings, {"kl_teacher_student": 0.4, "top1_agreement": 0.5}, {"pass_fraction": 0.8, "num_answers": 5}
    )
    assert [c["passed"] for c in result["checks"]] == [True, False, True] and not result["passed"]
    assert gate_failures({"result": result}) == ["heldout_top1_agreement = 0.5 (must be >= 0.6)"]
    assert evaluate_gate(
        settings, {"kl_teacher_student": 0.4, "top1_agreement": 0.7}, {"pass_fraction": 0.8, "num_answers": 5}
    )["passed"]
    missing = evaluate_gate(settings, None, None)  # nothing measured: nothing passes
    assert not missing["passed"] and all(c["value"] is None for c in missing["checks"])


def test_check_functions_per_answer_batch_and_fraction():
    assert load_release_check("tests.gate_checks:always_passes")(["p"] * 3, ["a", "b", "c"]) == [1.0] * 3
    assert load_release_check("tests.gate_checks.every_other")(["p"] * 4, ["a"] * 4) == [1.0, 0.0, 1.0, 0.0]
    gate_checks.CALLS.clear()
    load_release_check("tests.gate_checks:recorded")(["p"], ["a"], ["ref"])
    assert gate_checks.CALLS[-1]["references"] == ["ref"]


@pytest.mark.parametrize(
    "path,error,match",
    [
        ("tests.gate_checks:no_such_function", ValueError, "has no attribute 'no_such_function'"),
        ("tests.no_such_module:f", ValueError, "cannot import the module 'tests.no_such_module'"),
        ("tests.gate_checks:NOT_A_FUNCTION", TypeError, "not a function"),
        ("no_separator", ValueError, "must be an import path"),
    ],
)
def test_a_bad_check_path_fails_when_the_config_is_made(tmp_path, path, error, match):
    with pytest.raises(error, match=match) as raised:
        tiny_args(tmp_path, release_gate_check=path)
    assert "`release_gate_check" in str(raised.value)


def test_config_checks_and_parses_from_the_command_line_and_yaml(tmp_path):
    from trl import TrlParser

    with pytest.raises(ValueError, match="`release_gate_min_pass` must be a number in"):
        tiny_args(tmp_path, release_gate_check="tests.gate_checks:always_passes", release_gate_min_pass=1.5)
    with pytest.raises(ValueError, match="`heldout_eval=False`"):
        tiny_args(tmp_path, release_gate=PASSING, heldout_eval=False)
    with pytest.raises(ValueError, match="`release_gate_override` must be a non-empty reason"):
        tiny_args(tmp_path, release_gate_override="  ")
    with pytest.warns(UserWarning, match="bounds the figure on the side where it improves"):
        tiny_args(tmp_path, release_gate=[f"{KL}>=0.5"])

    base = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    (cli,) = TrlParser((DistillConfig,)).parse_args_and_config(
        [
            *base,
            "--release_gate",
            f"{KL}<=0.5,heldout_top1_agreement>=0.6",
            "--release_gate_check",
            "tests.gate_checks:always_passes",
            "--release_gate_min_pass",
            "0.8",
        ]
    )
    assert cli.release_gate == [f"{KL}<=0.5", "heldout_top1_agreement>=0.6"]
    assert (cli.release_gate_check, cli.release_gate_min_pass) == ("tests.gate_checks:always_passes", 0.8)
    for value in ([f"{KL}<=0.5"], {KL: "<=0.5"}):
        path = tmp_path / "gate.yaml"
        path.write_text(
            json.dumps({"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "release_gate": value})
        )
        (from_yaml,) = TrlParser((DistillConfig,)).parse_args_and_config(["--config", str(path)])
        assert from_yaml.release_gate == [f"{KL}<=0.5"], value


# ---------------------------------------------------------------------------------------------------- the trainer
def make_trainer(output_dir, tokenizer, make_student, make_teacher, train, eval_rows, teacher=None, **kwargs):
    return DistillTrainer(
        model=make_student(),
        teacher_model=teacher if teacher is not None else make_teacher(),
        args=tiny_args(output_dir, **kwargs),
        train_dataset=train,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
    )


def test_thresholds_without_held_out_figures_fail_at_init(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    with pytest.raises(ValueError, match=r"`release_gate=\[.*\]` is judged on held-out figures, but none will be"):
        make_trainer(
            tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, None, release_gate=PASSING
        )


def test_a_check_without_held_out_prompts_fails_at_init(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    with pytest.raises(ValueError, match="`release_gate_check='tests.gate_checks:always_passes'` scores greedy"):
        make_trainer(
            tmp_path,
            tokenizer,
            make_student,
            make_teacher,
            prompt_completion_dataset,
            None,
            release_gate_check="tests.gate_checks:always_passes",
        )


@pytest.fixture(scope="module")
def failed(tmp_path_factory, tokenizer, prompt_completion_dataset, eval_dataset):
    """A student trained 2 steps whose gate fails (KL <= 0), with a check that passes half of its answers."""
    from trl_distill.demo.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("failed")
    trainer = DistillTrainer(
        model=build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1),
        teacher_model=build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=2),
        args=tiny_args(
            out,
            release_gate=FAILING,
            release_gate_check="tests.gate_checks:every_other",
            release_gate_min_pass=0.5,
            max_completion_length=6,
        ),
        train_dataset=prompt_completion_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,  # an in-memory teacher of the same tokenizer
    )
    trainer.train()
    with pytest.raises(ReleaseGateError) as refused:  # HF_HUB_OFFLINE=1: the gate refuses before the network is asked
        trainer.push_to_hub()
    return trainer, out, refused.value


def test_a_failing_student_is_saved_not_pushed_and_the_error_names_each_failure(failed):
    _, out, error = failed
    assert (out / "model.safetensors").is_file() and (out / RECEIPT_NAME).is_file()
    message = str(error)
    assert "heldout_kl_teacher_student = " in message and "(must be <= 0)" in message
    assert "heldout_top1_agreement" not in message  # it passed: only failures are named
    assert str(out) in message and 'override_release_gate="<reason>"' in message
    assert error.output_dir == str(out) and [f["name"] for f in error.failures] == [KL]
    assert error.failures[0]["value"] > 0


def test_the_receipt_and_card_record_the_gate(failed):
    _, out, _ = failed
    stage = load_receipt(out)["stages"][0]
    gate = stage["release_gate"]
    assert gate["settings"] == {
        "thresholds": ["heldout_kl_teacher_student<=0.0", "heldout_top1_agreement>=0.0"],
        "check": "tests.gate_checks:every_other",
        "min_pass": 0.5,
        "max_new_tokens": 6,
    }
    result = gate["result"]
    assert (result["evaluated"], result["passed"], result["step"], gate["override"]) == (True, False, 2, None)
    kl, top1, check = result["checks"]
    assert kl["value"] == stage["results"]["heldout"]["kl_teacher_student"] and not kl["passed"]
    assert top1["passed"] and check["passed"] and (check["value"], check["num_answers"]) == (0.5, 8)
    assert "release_gate_override" not in stage["settings"]
    card = (out / "README.md").read_text()
    section = card.split("## Release gate")[1].split("## Receipt")[0]
    assert "**Failed**" in section and "| `heldout_kl_teacher_student` | <= 0 |" in section and "| fail |" in section
    check_row = "`tests.gate_checks:every_other` on 8 greedy held-out answers (pass fraction) | >= 0.5 | 0.5 | pass |"
    assert check_row in section
    assert "release_gate:\n    passed: false\n    evaluated: true\n    override: null" in card
    report = verify_artifact(out, strict=True)
    assert report.ok, report.report()
    assert any("FAILED (heldout_kl_teacher_student" in note for note in report.notes)


def test_an_override_is_recorded_in_the_receipt_and_the_card(failed):
    trainer, out, _ = failed
    from huggingface_hub.errors import OfflineModeIsEnabled

    with pytest.raises(OfflineModeIsEnabled):  # past the gate: the (offline) upload is what fails now
        trainer.push_to_hub(override_release_gate="known regression, tracked in #123")
    gate = load_receipt(out)["stages"][0]["release_gate"]
    assert gate["override"] == {"reason": "known regression, tracked in #123", "source": "push_to_hub"}
    assert not gate["result"]["passed"]  # the verdict stays what it was
    card = (out / "README.md").read_text()
    assert "**Overridden** (via `push_to_hub`): known regression, tracked in #123" in card
    assert verify_artifact(out).ok
    with pytest.raises(ValueError, match="`override_release_gate` must be a non-empty reason"):
        trainer.push_to_hub(override_release_gate="")


def test_the_check_scores_the_students_greedy_answers_to_the_held_out_prompts(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, eval_dataset
):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        make_student,
        make_teacher,
        prompt_completion_dataset,
        eval_dataset,
        release_gate=PASSING,
        release_gate_check="tests.gate_checks:recorded",
        max_completion_length=5,
        per_device_eval_batch_size=3,
    )
    gate_checks.CALLS.clear()
    trainer.train()
    (call,) = gate_checks.CALLS  # once, at the end of training
    assert call["prompts"] == list(eval_dataset["prompt"])
    assert call["references"] == [c + tokenizer.eos_token for c in eval_dataset["completion"]]
    model = trainer.model.eval()
    for prompt, answer in zip(call["prompts"], call["completions"]):  # one by one, unpadded: the same greedy text
        ids = torch.tensor([tokenizer(text=prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=5,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    from huggingface_hub.errors import OfflineModeIsEnabled

    with pytest.raises(OfflineModeIsEnabled):  # a passing gate lets the push through (to the offline Hub)
        trainer.push_to_hub()
    gate = load_receipt(tmp_path)["stages"][0]["release_gate"]
    assert gate["result"]["passed"] and gate["override"] is None


def test_min_pass_decides_the_check(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, eval_dataset
):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        make_student,
        make_teacher,
        prompt_completion_dataset,
        eval_dataset,
        max_steps=1,
        release_gate_check="tests.gate_checks:every_other",
        release_gate_min_pass=0.6,
        max_completion_length=2,
    )
    trainer.train()
    with pytest.raises(
        ReleaseGateError,
        match=r"tests.gate_checks:every_other = 0.5 of 8 greedy answers \(must be "
        r">= 0.6\)",
    ):
        trainer.push_to_hub()


def test_a_student_saved_at_another_step_is_not_evaluated(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, eval_dataset
):
    trainer = make_trainer(
        tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, eval_dataset, release_gate=PASSING
    )
    trainer.save_model()  # before training: the gate is judged at the end of training
    gate = load_receipt(tmp_path)["stages"][0]["release_gate"]
    assert gate["result"] == {"evaluated": False, "passed": False, "step": 0, "checks": []}
    assert "**Not evaluated**" in (tmp_path / "README.md").read_text()
    assert verify_artifact(tmp_path).ok


# ---------------------------------------------------------------------------------------------------- verify
def rewrite(out, edit) -> None:
    """Edit the receipt as a forger would: recompute its content id and regenerate the card, so only the gate's own
    consistency can give the edit away."""
    receipt = load_receipt(out)
    edit(receipt["stages"][0])
    receipt["content_id"] = content_id(receipt)
    write_receipt(out, receipt)
    write_model_card(out, receipt)


def test_verify_detects_an_edited_gate_result(failed, tmp_path):
    import shutil

    _, out, _ = failed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    def flip_verdict(stage):
        gate = stage["release_gate"]["result"]
        gate["passed"] = True
        for check in gate["checks"]:
            check["passed"] = True

    rewrite(copy, flip_verdict)
    report = verify_artifact(copy)
    assert not report.ok
    assert any("heldout_kl_teacher_student is recorded as passed, but" in p for p in report.problems), report.report()

    def forge_value(stage):  # the value lowered to pass: it no longer equals the recorded held-out figure
        stage["release_gate"]["result"]["checks"][0].update(value=0.0, passed=True)
        stage["release_gate"]["result"]["passed"] = True

    shutil.rmtree(copy)
    shutil.copytree(out, copy)
    rewrite(copy, forge_value)
    report = verify_artifact(copy)
    assert any(
        "heldout_kl_teacher_student is recorded as 0.0, the recorded held-out figure is" in p for p in report.problems
    ), report.report()

    def loosen_threshold(stage):  # the threshold moved, the settings not
        stage["release_gate"]["result"]["checks"][0].update(threshold=1.0, passed=True)
        stage["release_gate"]["result"]["passed"] = True

    shutil.rmtree(copy)
    shutil.copytree(out, copy)
    rewrite(copy, loosen_threshold)
    assert any("is recorded against <= 1.0, the settings say <= 0.0" in p for p in verify_artifact(copy).problems)


def test_record_problems_can_pass_and_fail():
    stage = {
        "results": {"heldout": {"kl_teacher_student": 0.3}},
        "release_gate": {
            "settings": gate_settings([f"{KL}<=0.5"], None, 1.0),
            "result": evaluate_gate(gate_settings([f"{KL}<=0.5"], None, 1.0), {"kl_teacher_student": 0.3}),
        },
    }
    assert record_problems(stage) == []
    assert record_problems(stage, heldout={"kl_teacher_student": 0.7}) == [
        (
            "release gate: heldout_kl_teacher_student is recorded as passed, but 0.7 <= 0.5 on the recomputed figures "
            "is False"
        ),
        "release gate: recorded as passed, but its checks do not all pass",
    ]
    stage["release_gate"]["override"] = {"reason": ""}
    assert record_problems(stage) == ["release gate: the override has no reason ({'reason': ''})"]


def test_replay_judges_the_gate_again_on_recomputed_figures(
    tmp_path, tokenizer, make_student, prompt_completion_dataset, eval_dataset
):
    teacher = saved_teacher(tokenizer, tmp_path / "teacher")
    out = tmp_path / "out"
    trainer = make_trainer(
        out,
        tokenizer,
        make_student,
        None,
        prompt_completion_dataset,
        eval_dataset,
        teacher=teacher,
        teacher_model_init_kwargs={"dtype": "float32"},
        release_gate=[f"{KL}<=1e9"],
        release_gate_check="tests.gate_checks:every_other",
        release_gate_min_pass=0.5,
        max_completion_length=3,
    )
    trainer.train()
    trainer.save_model()
    report = verify_artifact(out, replay=True)
    assert report.ok, report.report()
    assert "replay: the release gate gives the recorded verdict on the recomputed figures" in report.passed

    def forge(stage):  # figures and gate edited together, consistently: only a replay can tell
        stage["results"]["heldout"]["kl_teacher_student"] = 1e10
        stage["release_gate"]["settings"]["thresholds"] = [f"{KL}>=1e10"]
        stage["release_gate"]["result"]["checks"][0].update(op=">=", threshold=1e10, value=1e10, passed=True)

    rewrite(out, forge)
    assert verify_artifact(out).ok  # consistent on its face
    problems = verify_artifact(out, replay=True).problems
    assert any(p.startswith("replay: held-out kl_teacher_student is") for p in problems), problems
    assert any("replay: release gate: heldout_kl_teacher_student is recorded as passed, but" in p for p in problems)


# ---------------------------------------------------------------------------------------------------- the Hub
PUSH_SCRIPT = """
import sys
import torch
from trl_distill import DistillConfig, DistillTrainer
from trl_distill.demo.task import make_task_dataset, task_corpus
from trl_distill.demo.tiny import build_tiny_model, build_tokenizer
from trl_distill.gate import ReleaseGateError

torch.set_num_threads(1)
tokenizer = build_tokenizer(task_corpus(seed=0, n=300), vocab_size=400)
trainer = DistillTrainer(
    model=build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=1),
    teacher_model=build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2),
    args=DistillConfig(output_dir=sys.argv[1], use_cpu=True, bf16=False, activation_checkpointing=False, max_steps=2,
                       per_device_train_batch_size=4, report_to="none", disable_tqdm=True, hub_model_id="user/gated",
                       push_to_hub=True, hub_strategy="checkpoint", save_strategy="steps", save_steps=1,
                       release_gate=["heldout_kl_teacher_student<=0"]),
    train_dataset=make_task_dataset(8, seed=0, split="train"),
    eval_dataset=make_task_dataset(4, seed=0, split="test"),
    processing_class=tokenizer,
    teacher_processing_class=tokenizer,
)
trainer.train()  # checkpoints at steps 1 and 2: `hub_strategy` would push them, the gate holds them back
print("TRAINED")
try:
    trainer.save_model()  # with `push_to_hub=True`, Trainer pushes on a user's save_model: refused too
except ReleaseGateError as error:
    print("REFUSED:", error)
trainer.push_to_hub(override_release_gate="pushed by the test")
print("PUSHED")
"""


def test_the_hub_gets_nothing_until_an_override(tmp_path):
    script = tmp_path / "push.py"
    script.write_text(textwrap.dedent(PUSH_SCRIPT))
    out = tmp_path / "out"
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with LocalHub() as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_TOKEN": "hf_local_test",
            "HF_HOME": str(tmp_path / "hf_home"),
            "PYTHONPATH": repo_root,
        }
        process = subprocess.run(
            [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        commits = [path for method, path in hub.requests if method == "POST" and "/commit/" in path]
        files = hub.repos.get("user/gated", {})
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    assert "Checkpoint pushes" in process.stderr and "are held back" in process.stderr
    refusal = process.stdout.split("REFUSED:")[1].split("PUSHED")[0]
    assert "heldout_kl_teacher_student = " in refusal and "(must be <= 0)" in refusal and str(out) in refusal
    assert len(commits) == 1  # only the overridden push: no checkpoint, no refused save
    gate = json.loads(files[RECEIPT_NAME])["stages"][0]["release_gate"]
    assert gate["override"] == {"reason": "pushed by the test", "source": "push_to_hub"}
    assert not gate["result"]["passed"]
    assert "**Overridden** (via `push_to_hub`): pushed by the test" in files["README.md"].decode()
    assert not any(name.startswith(("checkpoint-", "last-checkpoint")) for name in files)
    assert verify_artifact(out).ok


def test_figures_measured_outside_the_trainer_judge_the_recorded_gate(failed, tmp_path):
    """`save_artifact(..., heldout=figures)` (the `trl-distill train` recipe) records those figures: the gate's values
    and verdict follow them, so `verify` finds the two consistent."""
    from trl_distill.artifact import save_artifact

    trainer, _, _ = failed
    out = tmp_path / "outside"
    trainer.save_model(str(out))
    figures = {**load_receipt(out)["stages"][0]["results"]["heldout"], "kl_teacher_student": 0.0}
    save_artifact(trainer, out, heldout=figures, heldout_rows=[{"prompt": "Q", "completion": " A"}])
    gate = load_receipt(out)["stages"][0]["release_gate"]
    assert gate["result"]["checks"][0]["value"] == 0.0 and gate["result"]["passed"]
    assert gate["result"]["checks"][2]["value"] == 0.5  # the check's own result is kept
    assert verify_artifact(out).ok
