"""The model card (metadata, model-index, text) and the upload to a local Hub stand-in."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled

from tests.distill_artifacts import tiny_args
from tests.hub_server import LocalHub
from trl_distill import DistillTrainer
from trl_distill.model_card import build_model_card, card_text, write_model_card
from trl_distill.receipt import RECEIPT_NAME, load_receipt


HELDOUT = {
    "kl_teacher_student": 0.25,
    "kl_student_teacher": 0.3,
    "top1_agreement": 0.8,
    "acceptance_rate": 0.7,
    "student_perplexity": 3.0,
    "teacher_perplexity": 2.5,
    "perplexity_gap": 0.5,
    "num_tokens": 100,
}


def receipt_for(student: str, teacher: str, *, local: bool = False) -> dict:
    settings = {"objective": "forward_kl", "kd_temperature": 2.0, "alpha": 0.9, "lmbda": 0.0}
    stage = {
        "name": "distill",
        "method": "token-level knowledge distillation (forward_kl)",
        "models": {
            "teacher": {"name_or_path": teacher, "revision": "main"},
            "student": {"name_or_path": student, "local": local},
        },
        "settings": settings,
        "results": {"heldout": HELDOUT},
        "papers": [{"arxiv": "1503.02531", "title": "Distilling the Knowledge in a Neural Network"}],
        "libraries": {"torch": "2.13.0"},
    }
    return {
        "format": "trl-distill-receipt/1",
        "stages": [stage],
        "card": {"model_name": "tiny", "tags": ["x"]},
        "content_id": "sha256:" + "ab" * 32,
    }


def test_card_metadata_and_text(tmp_path):
    receipt = receipt_for("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B-Instruct")
    write_model_card(tmp_path, receipt)
    text = (tmp_path / "README.md").read_text()
    assert text == card_text(receipt) == card_text(json.loads(json.dumps(receipt)))  # a pure function of the receipt
    assert build_model_card(receipt).data.to_dict()["distillation"]["teacher"] == "Qwen/Qwen2.5-7B-Instruct"
    metadata = yaml.safe_load(text.split("---")[1])  # the YAML header parses
    assert metadata["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert {"distillation", "trl-distill", "x"} <= set(metadata["tags"])
    block = metadata["distillation"]
    assert block["teacher"] == "Qwen/Qwen2.5-7B-Instruct" and block["receipt"] == "sha256:" + "ab" * 32
    assert block["settings"]["kd_temperature"] == 2.0 and block["papers"] == ["arXiv:1503.02531"]
    results = ModelCard.load(tmp_path / "README.md").data.eval_results  # model-index, as the Hub reads it
    metrics = {(r.metric_name, r.metric_value) for r in results}
    assert metrics >= {("KL(teacher‖student)", 0.25), ("student perplexity", 3.0)}
    for phrase in (
        "distilled from **Qwen/Qwen2.5-7B-Instruct**",
        "trl-distill verify .",
        "--replay",
        "https://arxiv.org/abs/1503.02531",
        "sha256:" + "ab" * 32,
        "DistillConfig(",
    ):
        assert phrase in text, phrase
    # A local path is not a Hub id: no `base_model` (the Hub would reject it), and the path is not published.
    for student, local in ((str(tmp_path / "student"), False), ("student_dir", True)):
        local_card = card_text(receipt_for(student, str(tmp_path / "teacher"), local=local))
        assert "base_model" not in yaml.safe_load(local_card.split("---")[1])
        assert str(tmp_path) not in local_card and "local:teacher" in local_card


def test_card_lists_the_settings_that_apply_and_how_to_reproduce(tmp_path):
    from trl_distill import DistillConfig
    from trl_distill.provenance import applicable_settings, distillation_settings

    cases = {
        "token": dict(objective="generalized_jsd", beta=0.3),
        "sequence": dict(distill_mode="sequence", teacher_generation_cache_dir=str(tmp_path / "gen")),
        "uld": dict(distill_mode="uld", uld_top_k=8),
        "feature": dict(feature_weight=0.5),
    }
    shown = {}
    for name, kwargs in cases.items():
        args = DistillConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            teacher_model_name_or_path=str(tmp_path / "teacher"),
            **kwargs,
        )
        shown[name] = applicable_settings(distillation_settings(args))
    total = len(distillation_settings(args))
    assert total > 30 and all(len(s) < total / 2 for s in shown.values()), {k: len(v) for k, v in shown.items()}
    assert shown["token"]["beta"] == 0.3 and "uld_top_k" not in shown["token"]
    assert "feature_weight" not in shown["token"]
    assert "objective" not in shown["sequence"] and "kd_temperature" not in shown["sequence"]
    assert "teacher_num_beams" in shown["sequence"] and "beta" not in shown["uld"] and shown["uld"]["uld_top_k"] == 8
    assert shown["feature"]["feature_weight"] == 0.5 and "feature_layer_map" in shown["feature"]

    receipt = receipt_for("Qwen/Qwen2.5-0.5B", str(tmp_path / "teacher"), local=False)
    stage = receipt["stages"][0]
    stage["settings"] = distillation_settings(args)
    stage["applicable_settings"] = sorted(shown["feature"])
    stage["training"] = {
        "max_length": 512,
        "learning_rate": 2e-5,
        "max_steps": 100,
        "num_train_epochs": 3.0,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "seed": 0,
    }
    text = card_text(receipt)
    settings_rows = [line for line in text.split("## Held-out")[0].splitlines() if line.startswith("| `")]
    assert len(settings_rows) == len(shown["feature"])
    reproduce = text.split("## Reproduce")[1].split("## Papers")[0]
    for phrase in (
        "max_length=512",
        "learning_rate=2e-05",
        "max_steps=100",
        "per_device_train_batch_size=8",
        "gradient_accumulation_steps=2",
        "feature_weight=0.5",
    ):
        assert phrase in reproduce, phrase
    assert "num_train_epochs" not in reproduce  # `max_steps` overrides it
    assert str(tmp_path) not in text


def test_create_model_card_before_any_receipt(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=tiny_args(tmp_path, max_steps=1),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    trainer.create_model_card(model_name="draft")
    text = (tmp_path / "README.md").read_text()
    assert "No receipt yet" in text and "distillation" in text and not (tmp_path / RECEIPT_NAME).exists()


def test_push_to_hub_offline_keeps_the_artifact(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=tiny_args(tmp_path, max_steps=1),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(OfflineModeIsEnabled, match="offline mode is on") as error:
        trainer.push_to_hub()
    assert str(tmp_path) in str(error.value)
    assert (tmp_path / RECEIPT_NAME).exists() and (tmp_path / "model.safetensors").exists()


def test_teacher_generation_cache_is_never_published(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    from trl_distill.teachers.generation import default_generation_cache_dir

    assert not default_generation_cache_dir().startswith(str(tmp_path))
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=tiny_args(tmp_path, max_steps=1),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    cache = tmp_path / "teacher_generations" / "abc"  # where an older default put sequence-KD's completions
    cache.mkdir(parents=True)
    (cache / "shard-00000.arrow").write_bytes(b"training data")
    with pytest.raises(ValueError, match="teacher-generation cache .* would be uploaded"):
        trainer.push_to_hub()
    receipt = load_receipt(tmp_path)  # saved before refusing, without the cache
    assert "model.safetensors" in receipt["artifacts"]
    assert not any("teacher_generations" in name for name in receipt["artifacts"])


PUSH_SCRIPT = """
import sys
import torch
from trl_distill import DistillConfig, DistillTrainer
from trl_distill.demo.task import make_task_dataset, task_corpus
from trl_distill.demo.tiny import build_tiny_model, build_tokenizer

torch.set_num_threads(1)
tokenizer = build_tokenizer(task_corpus(seed=0, n=300), vocab_size=400)
trainer = DistillTrainer(
    model=build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=1),
    teacher_model=build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2),
    args=DistillConfig(output_dir=sys.argv[1], use_cpu=True, bf16=False, activation_checkpointing=False, max_steps=1,
                       per_device_train_batch_size=4, report_to="none", save_strategy="no", disable_tqdm=True,
                       hub_model_id="user/tiny-distilled"),
    train_dataset=make_task_dataset(8, seed=0, split="train"),
    eval_dataset=make_task_dataset(4, seed=0, split="test"),
    processing_class=tokenizer,
)
trainer.train()
if sys.argv[2:] == ["expect-failure"]:  # the model was never saved before this call: push_to_hub must save it first
    from trl_distill.artifact import HubUploadError

    try:
        trainer.push_to_hub()
    except HubUploadError as error:
        print("UPLOAD-ERROR:", error)
        sys.exit(3)
    sys.exit(0)
trainer.push_to_hub()
"""


def run_push(tmp_path, endpoint, *extra):
    script = tmp_path / "push.py"
    script.write_text(textwrap.dedent(PUSH_SCRIPT))
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "hf_local_test",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONPATH": repo_root,
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("hub", ["unreachable", "failing upload"])
def test_failed_upload_keeps_the_artifact_and_says_where(tmp_path, hub):
    """Offline mode NOT set, the Hub down (nothing listens) or refusing the commit: the model is saved, verified."""
    from trl_distill.verify import verify_artifact

    if hub == "unreachable":
        import socket

        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
        process = run_push(tmp_path, endpoint, "expect-failure")
    else:
        with LocalHub(failing_commits=True) as server:
            process = run_push(tmp_path, server.endpoint, "expect-failure")
            assert ("POST", "/api/repos/create") in server.requests and not server.repos["user/tiny-distilled"]
    assert process.returncode == 3, process.stdout[-2000:] + process.stderr[-4000:]
    message = process.stdout.split("UPLOAD-ERROR:")[1]
    out = tmp_path / "out"
    assert str(out) in message and "Nothing is lost" in message and "model.safetensors" in message
    assert {"model.safetensors", "README.md", RECEIPT_NAME} <= {p.name for p in out.iterdir()}
    assert verify_artifact(out, strict=True).ok


def test_push_to_hub_uploads_weights_card_and_receipt(tmp_path):
    from trl_distill.verify import verify_artifact

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
            [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300
        )
        assert process.returncode == 0, process.stderr[-4000:]
        files = hub.repos["user/tiny-distilled"]
        assert ("POST", "/api/models/user/tiny-distilled/commit/main") in hub.requests
    assert {"README.md", RECEIPT_NAME, "model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    receipt = load_receipt(out)
    assert files[RECEIPT_NAME] == (out / RECEIPT_NAME).read_bytes()
    assert receipt["content_id"] in files["README.md"].decode()
    downloaded = tmp_path / "downloaded"  # what a user would get from the Hub verifies against its receipt
    downloaded.mkdir()
    for name, data in files.items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(data)
    assert verify_artifact(downloaded).ok
