"""The distillation receipt: canonical form, verification (and each kind of tampering), replay, signing, stages."""

import json
import shutil
from dataclasses import dataclass

import pytest

from tests.distill_artifacts import saved_teacher, tiny_args, train_and_save
from trl_distill.artifact import append_stage
from trl_distill.cli import main
from trl_distill.provenance import distillation_settings, method_papers
from trl_distill.receipt import (
    RECEIPT_NAME,
    SIGNATURE_NAME,
    canonical_bytes,
    content_id,
    generate_signing_key,
    load_receipt,
    sign_receipt,
    write_receipt,
)
from trl_distill.verify import verify_artifact


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    generate_signing_key(root / "owner.pem", root / "owner.pub")
    generate_signing_key(root / "other.pem", root / "other.pub")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer, prompt_completion_dataset, eval_dataset, keys):
    """One trained, saved and signed artifact (with checkpoints beside it); tests work on copies."""
    root = tmp_path_factory.mktemp("artifact")
    teacher = saved_teacher(tokenizer, root / "teacher")
    train_and_save(
        tokenizer,
        root / "out",
        teacher,
        prompt_completion_dataset,
        eval_dataset,
        save_strategy="steps",
        save_steps=1,
        receipt_signing_key=str(keys / "owner.pem"),
    )
    return root


@pytest.fixture
def artifact(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built / "out", out)
    return out


def forge(path, edit):
    """Edit the receipt as a forger would: change a field and recompute the content id, canonically."""
    receipt = load_receipt(path)
    edit(receipt)
    receipt["content_id"] = content_id(receipt)
    (path / RECEIPT_NAME).write_bytes(canonical_bytes(receipt))


def test_canonical_form():
    receipt = {"b": [1, 2.0, (0.1 + 0.2)], "a": {"z": float("nan"), "y": float("-inf"), "x": None}, "c": True}
    data = canonical_bytes(receipt)
    assert data == canonical_bytes(dict(reversed(list(receipt.items()))))  # key order does not matter
    assert data == canonical_bytes(json.loads(data))  # parse + write again: the same bytes
    parsed = json.loads(data)
    assert parsed["b"] == [1, 2.0, 0.3] and parsed["a"] == {"x": None, "y": "-inf", "z": "nan"}
    assert content_id({**receipt, "content_id": "anything"}) == content_id(receipt)
    assert content_id({**receipt, "c": False}) != content_id(receipt)
    with pytest.raises(TypeError, match=r"receipt\.a\.w"):
        canonical_bytes({"a": {"w": object()}})
    with pytest.raises(TypeError, match="non-string key"):
        canonical_bytes({1: 2})


def test_receipt_bytes_are_stable_across_runs_with_the_same_seed(
    tmp_path, tokenizer, prompt_completion_dataset, eval_dataset
):
    teacher = saved_teacher(tokenizer, tmp_path / "teacher")
    out = tmp_path / "out"
    receipts = []
    for seed in (0, 0, 1):
        shutil.rmtree(out, ignore_errors=True)
        train_and_save(tokenizer, out, teacher, prompt_completion_dataset, eval_dataset, seed=seed, max_steps=1)
        receipts.append((out / RECEIPT_NAME).read_bytes())
    assert receipts[0] == receipts[1]
    assert load_receipt(out)["content_id"] != json.loads(receipts[0])["content_id"]  # another data order: new weights


def test_fresh_artifact_verifies(artifact, built, keys, capsys):
    receipt = load_receipt(artifact)
    card = (artifact / "README.md").read_text(encoding="utf-8")
    assert str(built) not in card and "local:teacher" in card  # the teacher's local path is not published
    (stage,) = receipt["stages"]
    assert stage["models"]["teacher"]["weights_sha256"] and stage["results"]["heldout"]["kl_teacher_student"] > 0
    assert stage["settings"]["kd_temperature"] == 2.0 and "receipt_signing_key" not in stage["settings"]
    expected = {"model.safetensors", "config.json", "tokenizer.json", "distill_heldout_rows.jsonl"}
    assert expected <= set(receipt["artifacts"])
    assert not any(name.startswith("checkpoint-") for name in receipt["artifacts"])
    assert not list(artifact.glob(f"checkpoint-*/{RECEIPT_NAME}"))  # checkpoints are resume state, not artifacts
    result = verify_artifact(artifact, public_key=keys / "owner.pub")
    assert result.ok, result.report()
    assert main(["verify", str(artifact), "--public-key", str(keys / "owner.pub")]) == 0
    assert "verified" in capsys.readouterr().out


def test_changed_weight_file_fails(artifact):
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    result = verify_artifact(artifact)
    assert not result.ok and any(p.startswith("model.safetensors: changed") for p in result.problems), result.report()
    assert main(["verify", str(artifact)]) == 1


def test_missing_and_added_files(artifact):
    (artifact / "tokenizer.json").unlink()
    (artifact / "notes.txt").write_text("added later")
    result = verify_artifact(artifact)
    assert any(p.startswith("tokenizer.json: missing") for p in result.problems)
    assert any(n.startswith("notes.txt: not covered") for n in result.notes)
    assert any(p.startswith("notes.txt: not covered") for p in verify_artifact(artifact, strict=True).problems)


def test_edited_receipt_fails_and_names_the_field(artifact, keys):
    receipt = load_receipt(artifact)
    receipt["stages"][0]["settings"]["kd_temperature"] = 4.0  # edited, content id left alone
    write_receipt(artifact, receipt)
    problems = verify_artifact(artifact).problems
    assert any("not to its recorded content id" in p for p in problems)
    assert any(
        p.startswith("README.md line ") and "| `kd_temperature` | `2.0` |" in p and "| `kd_temperature` | `4.0` |" in p
        for p in problems
    ), problems


def test_forged_receipt_is_caught_by_card_and_signature(artifact, keys):
    sign_before = (artifact / SIGNATURE_NAME).read_bytes()
    forge(artifact, lambda r: r["stages"][0]["results"]["heldout"].update(kl_teacher_student=0.001))
    (artifact / SIGNATURE_NAME).write_bytes(sign_before)  # the forger keeps the old signature
    problems = verify_artifact(artifact, public_key=keys / "owner.pub").problems
    assert any(p.startswith("README.md line ") and "kl_teacher_student" not in p and "0.001" in p for p in problems)
    assert any("the receipt changed after signing" in p for p in problems)


def test_signature_round_trip_and_wrong_key(artifact, keys):
    assert verify_artifact(artifact, public_key=keys / "owner.pub").ok
    problems = verify_artifact(artifact, public_key=keys / "other.pub").problems
    assert len(problems) == 1 and "wrong key" in problems[0]
    sign_receipt(artifact, keys / "other.pem")  # re-signed by the other key
    assert verify_artifact(artifact, public_key=keys / "other.pub").ok
    notes = verify_artifact(artifact).notes
    assert any(n.startswith(f"{SIGNATURE_NAME}: signed by ed25519:") for n in notes)
    # a private key where a public one is expected: a FAIL line, not a traceback
    problems = verify_artifact(artifact, public_key=keys / "owner.pem").problems
    assert len(problems) == 1 and "`public_key`" in problems[0] and "not a PEM public key" in problems[0]


def test_replay_passes_and_catches_a_different_teacher(artifact, tmp_path, tokenizer):
    assert verify_artifact(artifact, replay=True).ok
    other = saved_teacher(tokenizer, tmp_path / "other_teacher", seed=7)
    problems = verify_artifact(artifact, replay=True, teacher=other).problems
    assert any("not the teacher this student was distilled from" in p for p in problems)
    assert any(p.startswith("replay: held-out kl_teacher_student is") for p in problems)
    forge(artifact, lambda r: r["stages"][0]["results"]["heldout"].update(student_perplexity=1.5))
    problems = verify_artifact(artifact, replay=True).problems
    assert any(p.startswith("replay: held-out student_perplexity is") for p in problems)


def test_append_stage(artifact, tmp_path):
    first = load_receipt(artifact)
    stage_dir = tmp_path / "recovery"
    shutil.copytree(artifact, stage_dir, ignore=shutil.ignore_patterns(RECEIPT_NAME, SIGNATURE_NAME, "README.md"))
    (stage_dir / "extra.bin").write_bytes(b"\x00" * 8)
    stage = {"name": "recovery", "method": "sft", "results": {"loss": 0.5}}
    receipt = append_stage(stage_dir, stage, previous=artifact)
    assert [s["name"] for s in receipt["stages"]] == ["distill", "recovery"]
    assert receipt["stages"][0] == first["stages"][0] and receipt["stages"][1]["libraries"]["torch"]
    assert "extra.bin" in receipt["artifacts"] and receipt == load_receipt(stage_dir)
    assert verify_artifact(stage_dir).ok  # the card was rewritten from the new receipt
    again = append_stage(stage_dir, {"name": "dpo", "method": "dpo"}, previous=artifact)  # not carried twice
    assert [s["name"] for s in again["stages"]] == ["distill", "recovery", "dpo"]
    assert (artifact / SIGNATURE_NAME).exists()
    append_stage(artifact, {"name": "note", "method": "none"})
    assert not (artifact / SIGNATURE_NAME).exists()  # it signed the previous receipt
    with pytest.raises(ValueError, match=r"stage\['method'\]"):
        append_stage(artifact, {"name": "x"})
    with pytest.raises(TypeError, match=r"stage\.results\.bad"):
        append_stage(artifact, {"name": "x", "method": "y", "results": {"bad": object()}})


def test_settings_are_recorded_generically(tmp_path):
    from trl_distill import DistillConfig

    @dataclass
    class OnPolicyConfig(DistillConfig):  # what another mode adds to DistillConfig
        lmbda: float = 0.5
        uld_crossentropy_weight: float = 0.0

    args = OnPolicyConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False)
    settings = distillation_settings(args)
    assert settings["lmbda"] == 0.5 and "uld_crossentropy_weight" in settings and "learning_rate" not in settings
    assert [p["arxiv"] for p in method_papers(settings)] == ["1503.02531", "2306.13649"]


def test_lora_student_and_no_teacher(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    from peft import LoraConfig

    from trl_distill import DistillTrainer

    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=tiny_args(tmp_path, max_steps=1),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    trainer.teacher_model = None  # as with an offline teacher cache, or sequence-level KD from teacher text
    trainer.save_model()
    receipt = load_receipt(tmp_path)
    (stage,) = receipt["stages"]
    assert stage["models"]["teacher"] is None and stage["results"]["heldout"] is None
    adapter = stage["models"]["student"]["adapters"]["default"]
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    assert "adapter_model.safetensors" in receipt["artifacts"]
    assert verify_artifact(tmp_path).ok
    assert "library_name: peft" in (tmp_path / "README.md").read_text()
    assert any("no held-out figures" in p for p in verify_artifact(tmp_path, replay=True).problems)


@pytest.mark.parametrize("bad", ["missing.pem", "not_a_key.pem"])
def test_bad_signing_key_fails_before_training(tmp_path, tokenizer, make_student, prompt_completion_dataset, bad):
    from trl_distill import DistillTrainer

    (tmp_path / "not_a_key.pem").write_text("hello")
    with pytest.raises(ValueError, match=r"`receipt_signing_key` .*(not a file|not a PEM private key)"):
        DistillTrainer(
            model=make_student(),
            teacher_model=make_student(),
            processing_class=tokenizer,
            args=tiny_args(tmp_path / "out", receipt_signing_key=str(tmp_path / bad)),
            train_dataset=prompt_completion_dataset,
        )


@pytest.mark.parametrize(
    "old,new",
    [
        ("      value: ", "      value: 0.0001  #"),  # a `model-index` figure, what the Hub displays
        ("A student distilled from **local:teacher", "A student distilled from **meta-llama/Llama-3.1-405B"),
        ("| KL(teacher‖student) | ", "| KL(teacher‖student) | 0.0001 |  "),  # the held-out table
        ("library_name: transformers\n", "library_name: transformers\nbase_model: Qwen/Qwen2.5-0.5B\n"),
        ("distill_mode: token", "distill_mode: uld"),  # the `distillation` metadata block
    ],
)
def test_every_claim_of_the_card_is_verified(artifact, old, new):
    card = artifact / "README.md"
    text = card.read_text(encoding="utf-8")
    assert old in text
    card.write_text(text.replace(old, new, 1), encoding="utf-8")
    problems = verify_artifact(artifact).problems
    assert problems and all(p.startswith("README.md") for p in problems), problems
    assert any(new.split("\n")[-2 if new.endswith("\n") else 0][:20] in p for p in problems), problems


def test_damaged_card_signature_and_keys_are_fail_lines(artifact, keys, tmp_path, capsys):
    card = artifact / "README.md"
    card.write_text("---\ntags: [unclosed\n  - : :\n---\n# hi\n", encoding="utf-8")  # malformed YAML
    assert any(p.startswith("README.md line 2:") for p in verify_artifact(artifact).problems)
    card.unlink()
    assert any(p.startswith("README.md: missing") for p in verify_artifact(artifact).problems)
    (artifact / SIGNATURE_NAME).write_bytes(b"\x00garbage{")
    for public_key in (None, keys / "owner.pub"):
        problems = verify_artifact(artifact, public_key=public_key).problems
        assert any(p.startswith(f"{SIGNATURE_NAME}: not a trl_distill signature") for p in problems), problems
    (artifact / SIGNATURE_NAME).write_text(json.dumps({"key_id": "x", "signature": "!!!"}))
    problems = verify_artifact(artifact, public_key=keys / "owner.pub").problems
    assert any("not a trl_distill signature" in p for p in problems)
    (tmp_path / "garbage.pub").write_bytes(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    for bad in (tmp_path / "garbage.pub", tmp_path / "absent.pub", keys / "owner.pem"):
        problems = verify_artifact(artifact, public_key=bad).problems
        assert any(p.startswith("public key: `public_key`") for p in problems), problems
        assert main(["verify", str(artifact), "--public-key", str(bad)]) == 1
    assert "FAIL  public key" in capsys.readouterr().out


def test_replay_reports_a_teacher_of_another_vocabulary_or_a_missing_path(artifact, tmp_path, other_tokenizer):
    other_vocab = saved_teacher(other_tokenizer, tmp_path / "small_vocab_teacher")
    problems = verify_artifact(artifact, replay=True, teacher=other_vocab).problems
    assert any("has a vocabulary of" in p and "another tokenizer's model" in p for p in problems), problems
    assert any("not the teacher this student was distilled from" in p for p in problems)
    problems = verify_artifact(artifact, replay=True, teacher=str(tmp_path / "no_such_teacher")).problems
    assert any(p.startswith("replay: cannot load the teacher from") for p in problems), problems


@pytest.mark.parametrize(
    "settings,method,papers",
    [
        (
            dict(distill_mode="token", objective="reverse_kl"),
            "token-level knowledge distillation (reverse_kl)",
            ["1503.02531", "2306.08543"],
        ),
        (
            dict(distill_mode="sequence", objective="forward_kl"),
            "sequence-level knowledge distillation",
            ["1606.07947"],
        ),
        (
            dict(distill_mode="uld", objective="forward_kl", uld_distance="l1"),
            "universal logit distillation",
            ["1503.02531", "2402.12030"],
        ),
        (
            dict(distill_mode="token", objective="forward_kl", feature_weight=0.5, feature_loss="mse"),
            "+ feature (hidden-state) distillation",
            ["1503.02531", "1412.6550"],
        ),
        (dict(distill_mode="token", objective="jsd", lmbda=0.5), "on-policy", ["1503.02531", "2306.13649"]),
    ],
)
def test_receipts_describe_each_mode(settings, method, papers):
    from trl_distill.provenance import describe_method

    label, found = describe_method(settings)
    assert method in label and [p["arxiv"] for p in found] == papers, (label, found)
    if settings["distill_mode"] != "token":
        assert "(forward_kl)" not in label


def test_heldout_figures_measured_outside_the_trainer(tmp_path, tokenizer, prompt_completion_dataset, eval_dataset):
    """What `recipes/distill.py` does: measure after training, then record the figures in the receipt and card."""
    from trl_distill import heldout_metrics, save_artifact

    teacher = saved_teacher(tokenizer, tmp_path / "teacher")
    trainer = train_and_save(tokenizer, tmp_path / "out", teacher, prompt_completion_dataset, None, max_steps=1)
    assert load_receipt(tmp_path / "out")["stages"][0]["results"]["heldout"] is None
    rows = [dict(row) for row in eval_dataset.select(range(4))]
    figures = heldout_metrics(trainer.model, trainer.teacher_model, tokenizer, rows, vocab_size=trainer.vocab_size)
    (tmp_path / "out" / "stage.json").write_text("{}")  # a file the recipe writes beside the model, before this
    receipt = save_artifact(trainer, tmp_path / "out", heldout=figures, heldout_rows=rows)
    recorded = receipt["stages"][0]["results"]["heldout"]
    assert recorded["kl_teacher_student"] == pytest.approx(figures["kl_teacher_student"])
    assert "Not measured" not in (tmp_path / "out" / "README.md").read_text()
    result = verify_artifact(tmp_path / "out", strict=True, replay=True)
    assert result.ok, result.report()
    with pytest.raises(ValueError, match="`heldout_rows`"):
        save_artifact(trainer, tmp_path / "out", heldout=figures)


def test_receipt_card_and_provenance_are_leaves():
    """`artifact` owns saving; `receipt`, `model_card` and `provenance` import none of each other (issue 14)."""
    import ast
    import pathlib

    package = pathlib.Path(__file__).resolve().parents[1] / "trl_distill"
    leaves = {"receipt", "model_card", "provenance", "digests"}

    def imported(module):
        tree = ast.parse((package / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 1:  # `from . import a, b`
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trl_distill."):
                names.add(node.module.split(".")[1])
        return names

    assert imported("model_card") == set() and imported("digests") == set()
    assert imported("receipt") == {"digests"}
    assert imported("provenance") & leaves == {"digests"} and not imported("provenance") & {"artifact", "trainer"}
    assert {"receipt", "model_card", "provenance"} <= imported("artifact")
    for module in ("artifact", "provenance", "model_card"):
        assert "_written_receipts" not in (package / f"{module}.py").read_text()  # no private state on the trainer
