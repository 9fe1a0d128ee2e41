"""The model card (metadata, model-index, text) and the upload to a local Hub stand-in."""

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
from trl_distill.model_card import build_model_card
from trl_distill.receipt import RECEIPT_NAME, load_receipt


HELDOUT = {"kl_teacher_student": 0.25, "kl_student_teacher": 0.3, "top1_agreement": 0.8, "acceptance_rate": 0.7,
           "student_perplexity": 3.0, "teacher_perplexity": 2.5, "perplexity_gap": 0.5, "num_tokens": 100}  # fmt: skip


def receipt_for(student: str, teacher: str) -> dict:
    stage = {
        "name": "distill",
        "method": "token-level knowledge distillation (forward_kl)",
        "models": {"teacher": {"name_or_path": teacher, "revision": "main"}, "student": {"name_or_path": student}},
        "settings": {"objective": "forward_kl", "kd_temperature": 2.0, "alpha": 0.9, "lmbda": 0.0},
        "results": {"heldout": HELDOUT},
        "papers": [{"arxiv": "1503.02531", "title": "Distilling the Knowledge in a Neural Network"}],
        "libraries": {"torch": "2.13.0"},
    }
    return {"format": "trl-distill-receipt/1", "stages": [stage], "content_id": "sha256:" + "ab" * 32}


def test_card_metadata_and_text(tmp_path):
    receipt = receipt_for("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B-Instruct")
    card = build_model_card(receipt, model_name="tiny", tags=["x"])
    card.save(tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])  # the YAML header parses
    assert metadata["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert {"distillation", "trl-distill", "x"} <= set(metadata["tags"])
    block = metadata["distillation"]
    assert block["teacher"] == "Qwen/Qwen2.5-7B-Instruct" and block["receipt"] == "sha256:" + "ab" * 32
    assert block["settings"]["kd_temperature"] == 2.0 and block["papers"] == ["arXiv:1503.02531"]
    results = ModelCard.load(tmp_path / "README.md").data.eval_results  # model-index, as the Hub reads it
    metrics = {(r.metric_name, r.metric_value) for r in results}
    assert metrics >= {("KL(teacher‖student)", 0.25), ("student perplexity", 3.0)}
    for phrase in ("distilled from **Qwen/Qwen2.5-7B-Instruct**", "trl-distill verify .", "--replay",
                   "https://arxiv.org/abs/1503.02531", "sha256:" + "ab" * 32, "DistillConfig("):  # fmt: skip
        assert phrase in text, phrase
    # A local path is not a Hub id: no `base_model` (the Hub would reject it).
    local = build_model_card(receipt_for(str(tmp_path), "Qwen/Qwen2.5-7B-Instruct"), model_name="tiny")
    assert "base_model" not in yaml.safe_load(str(local).split("---")[1])


def test_create_model_card_before_any_receipt(tmp_path, tokenizer, make_student, make_teacher,
                                              prompt_completion_dataset):  # fmt: skip
    trainer = DistillTrainer(model=make_student(), teacher_model=make_teacher(), args=tiny_args(tmp_path, max_steps=1),
                             train_dataset=prompt_completion_dataset, processing_class=tokenizer)  # fmt: skip
    trainer.create_model_card(model_name="draft")
    text = (tmp_path / "README.md").read_text()
    assert "No receipt yet" in text and "distillation" in text and not (tmp_path / RECEIPT_NAME).exists()


def test_push_to_hub_offline_keeps_the_artifact(tmp_path, tokenizer, make_student, make_teacher,
                                                prompt_completion_dataset):  # fmt: skip
    trainer = DistillTrainer(model=make_student(), teacher_model=make_teacher(), args=tiny_args(tmp_path, max_steps=1),
                             train_dataset=prompt_completion_dataset, processing_class=tokenizer)  # fmt: skip
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(OfflineModeIsEnabled, match="offline mode is on") as error:
        trainer.push_to_hub()
    assert str(tmp_path) in str(error.value)
    assert (tmp_path / RECEIPT_NAME).exists() and (tmp_path / "model.safetensors").exists()


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
trainer.push_to_hub()
"""


def test_push_to_hub_uploads_weights_card_and_receipt(tmp_path):
    from trl_distill.verify import verify_artifact

    script = tmp_path / "push.py"
    script.write_text(textwrap.dedent(PUSH_SCRIPT))
    out = tmp_path / "out"
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with LocalHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_local_test",
               "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": repo_root}  # fmt: skip
        process = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
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
