"""The demo's building blocks (tokenizer, models, task, held-out metrics) and a quick end-to-end run."""

import pytest
import torch

from trl_distill.demo.task import is_correct, make_task_dataset, task_corpus
from trl_distill.demo.tiny import build_tiny_model, load_pretrained_pair, save_pretrained_pair
from trl_distill.evaluation import heldout_metrics, tokenize_prompt_completion
from trl_distill.losses import distillation_loss


def test_tokenizer_reaches_the_requested_size_and_offsets(tokenizer):
    assert 800 <= len(tokenizer) <= 1000
    encoded = tokenizer("Ada has 3 apples.", return_offsets_mapping=True)
    assert len(encoded["offset_mapping"]) == len(encoded["input_ids"])
    assert tokenizer.pad_token and tokenizer.eos_token


def test_task_splits_are_deterministic_and_disjoint():
    train = make_task_dataset(200, seed=0, split="train")
    assert train["prompt"] == make_task_dataset(200, seed=0, split="train")["prompt"]
    test = make_task_dataset(100, seed=0, split="test")
    assert not set(train["prompt"]) & set(test["prompt"])
    for prompt, completion in zip(test["prompt"][:20], test["completion"][:20]):
        assert is_correct(prompt, completion)
        assert not is_correct(prompt, completion + " 7 7")
    assert len(task_corpus(seed=0, n=50)) > 50


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_models_round_trip_through_a_directory(tmp_path, tokenizer, arch):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, arch=arch, extra_vocab_rows=7)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer) + 7
    path = save_pretrained_pair(model, tokenizer, tmp_path / arch)
    reloaded, reloaded_tokenizer = load_pretrained_pair(path)
    assert reloaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([tokenizer("Ada has 3 apples.")["input_ids"]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_heldout_kl_matches_the_loss_at_temperature_one(tokenizer, make_student, make_teacher, eval_dataset):
    student, teacher = make_student(), make_teacher()
    metrics = heldout_metrics(student, teacher, tokenizer, eval_dataset, batch_size=3)
    # Same rows, same masking, computed independently through the public loss on full logits.
    kl_sum, count = 0.0, 0
    for row in eval_dataset:
        ids, completion_mask = tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"])
        ids = torch.tensor([ids])
        mask = torch.tensor([completion_mask[1:]], dtype=torch.bool)
        with torch.no_grad():
            zs, zt = student(ids).logits[:, :-1], teacher(ids).logits[:, :-1]
        kl_sum += distillation_loss(zs, zt, mask=mask, reduction="sum").item()
        count += int(mask.sum())
    assert metrics["kl_teacher_student"] == pytest.approx(kl_sum / count, rel=1e-4)
    assert metrics["student_perplexity"] > 1 and 0 <= metrics["top1_agreement"] <= 1
    same = heldout_metrics(teacher, teacher, tokenizer, eval_dataset)
    assert same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0


def test_quick_demo_runs_and_kd_beats_sft(tmp_path):
    from trl_distill.cli import main

    assert main(["demo", "--tiny", "--quick", "--output-dir", str(tmp_path)]) == 0
    import json

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["kd"]["kl_teacher_student"] < results["sft"]["kl_teacher_student"]
    # The KD student is saved through `DistillTrainer.save_model`: a verifiable artifact whose receipt has the figures.
    from trl_distill.receipt import load_receipt
    from trl_distill.verify import verify_artifact

    assert verify_artifact(tmp_path / "kd").ok
    replayed = verify_artifact(tmp_path / "kd", replay=True)  # the freshly trained teacher is found where it was saved
    assert replayed.ok, replayed.report()
    heldout = load_receipt(tmp_path / "kd")["stages"][0]["results"]["heldout"]
    assert heldout["kl_teacher_student"] == pytest.approx(results["kd"]["kl_teacher_student"], rel=1e-6)


def test_real_demo_text_is_split_by_topic_and_deterministic():
    from trl_distill.demo.real import RealDemoBudget, real_text_datasets, reference_paragraphs

    budget = RealDemoBudget(n_train=200, n_test=40)
    train, test = real_text_datasets(budget, seed=0)
    assert len(train) == 200 and len(test) == 40
    assert train["prompt"] == real_text_datasets(budget, seed=0)[0]["prompt"]
    assert train["prompt"] != real_text_datasets(budget, seed=1)[0]["prompt"]
    topic_of = {p: topic for topic, paragraphs in reference_paragraphs().items() for p in paragraphs}
    train_topics = {topic_of[next(p for p in topic_of if p.startswith(r["prompt"] + r["completion"]))] for r in train}
    test_topics = {topic_of[next(p for p in topic_of if p.startswith(r["prompt"] + r["completion"]))] for r in test}
    assert train_topics and test_topics and not train_topics & test_topics
    for row in test:
        assert len(row["prompt"].split()) == budget.prompt_words and 0 < len(row["completion"].split()) <= 36
