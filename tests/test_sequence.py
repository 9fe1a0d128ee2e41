"""Sequence-level KD: teacher completions (generated, cached, resumed, or given as a column) and the CE loss."""

import os

import pytest
import torch
from datasets import Dataset

from tests.test_trainer import config, snapshot
from trl_distill import DistillTrainer, generate_teacher_completions
from trl_distill.demo.tiny import build_tiny_model
from trl_distill.evaluation import generate_completions
from trl_distill.modes.sequence import use_teacher_completions


@pytest.fixture(autouse=True)
def one_thread():
    """Generation runs many tiny matmuls: a second OpenMP thread on a shared 2-core machine made them ~15x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def other_teacher(other_tokenizer):
    """A teacher with a genuinely different vocabulary (400 tokens, other text) from the student's."""
    return build_tiny_model(other_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3)


def count_generate(model, fail_after=None):
    """Wrap `model.generate` to count calls (and raise on call number `fail_after + 1`, an interruption)."""
    original, calls = model.generate, []

    def generate(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("interrupted")
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = generate
    return calls


def test_trains_across_two_tokenizers(
    tmp_path, tokenizer, other_tokenizer, other_teacher, make_student, prompt_completion_dataset
):
    student = make_student()
    before = snapshot(student)
    trainer = DistillTrainer(
        model=student,
        teacher_model=other_teacher,
        args=config(tmp_path, distill_mode="sequence", max_completion_length=6, teacher_generation_batch_size=5),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
        teacher_processing_class=other_tokenizer,
    )
    # The completions are the teacher's greedy text, decoded with the teacher's tokenizer (checked with the
    # evaluation module's own generation path), then tokenized by the student's.
    prompts = prompt_completion_dataset["prompt"]
    expected = generate_completions(other_teacher, other_tokenizer, prompts, max_new_tokens=6)
    assert expected != [c for c in prompt_completion_dataset["completion"]]
    row = trainer.train_dataset[0]
    index = prompts.index(row["prompt"])
    assert row["completion"] == expected[index] + tokenizer.eos_token  # SFTTrainer appended the student's EOS
    assert tokenizer.decode(row["input_ids"]) == row["prompt"] + expected[index] + tokenizer.eos_token
    assert os.listdir(tmp_path / "out" / "teacher_generations")  # cached under output_dir by default

    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param.detach(), before[name]), name
    logged = [log for log in trainer.state.log_history if "ce_loss" in log]
    assert logged and all(torch.isfinite(torch.tensor(log["loss"])) for log in logged)


def test_black_box_column_needs_no_teacher(tmp_path, tokenizer, make_student, prompt_completion_dataset):
    rows = prompt_completion_dataset.select(range(8))
    answers = [f" answer {i}" for i in range(8)]
    dataset = rows.add_column("from_api", answers)
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=None,
        args=config(tmp_path, distill_mode="sequence", teacher_completion_column="from_api", max_steps=1),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.teacher_model is None
    completions = {r["prompt"]: r["completion"] for r in trainer.train_dataset}
    assert completions[rows[3]["prompt"]] == " answer 3" + tokenizer.eos_token  # the column, not the gold answer
    trainer.train()


def test_sequence_without_teacher_or_column_is_refused(tmp_path, tokenizer, make_student, prompt_completion_dataset):
    with pytest.raises(ValueError, match="teacher_completion.*teacher_model|teacher_model.*teacher_completion"):
        DistillTrainer(
            model=make_student(),
            args=config(tmp_path, distill_mode="sequence"),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
        )


def test_conversational_prompts_get_message_completions():
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "hi"}]],
            "completion": [[{"role": "assistant", "content": "gold"}]],
            "teacher_completion": ["from the teacher"],
        }
    )
    converted = use_teacher_completions(dataset, "teacher_completion")
    assert converted[0]["completion"] == [{"role": "assistant", "content": "from the teacher"}]
    assert "teacher_completion" not in converted.column_names


def _generate(teacher, tokenizer, dataset, cache_dir, **kwargs):
    kwargs = {"max_completion_length": 5, "batch_size": 4, "save_every": 8, "show_progress": False, **kwargs}
    return generate_teacher_completions(teacher, tokenizer, dataset, cache_dir=cache_dir, **kwargs)


def test_cache_is_reused_and_invalidated(tmp_path, tokenizer, make_teacher, prompt_completion_dataset):
    teacher = make_teacher()
    calls = count_generate(teacher)
    first = _generate(teacher, tokenizer, prompt_completion_dataset, tmp_path)
    assert sum(calls) == len(prompt_completion_dataset)
    assert first["teacher_completion"] == generate_completions(teacher, tokenizer, first["prompt"], max_new_tokens=5)

    calls.clear()
    again = _generate(teacher, tokenizer, prompt_completion_dataset, tmp_path)
    assert calls == [] and again["teacher_completion"] == first["teacher_completion"]

    # Each part of the key regenerates: generation settings, prompts, teacher weights.
    _generate(teacher, tokenizer, prompt_completion_dataset, tmp_path, max_completion_length=3)
    assert sum(calls) == len(prompt_completion_dataset)
    calls.clear()
    edited = prompt_completion_dataset.map(
        lambda r, i: {"prompt": r["prompt"] + (" " if i == 0 else "")}, with_indices=True
    )
    _generate(teacher, tokenizer, edited, tmp_path)
    assert sum(calls) == len(prompt_completion_dataset)
    calls.clear()
    with torch.no_grad():
        teacher.get_output_embeddings().weight[0, 0] += 1.0
    _generate(teacher, tokenizer, prompt_completion_dataset, tmp_path)
    assert sum(calls) == len(prompt_completion_dataset)
    assert len(os.listdir(tmp_path)) == 4  # one directory per distinct key


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_interrupted_generation_resumes(tmp_path, tokenizer, make_teacher, prompt_completion_dataset, do_sample):
    teacher = make_teacher()
    reference = _generate(teacher, tokenizer, prompt_completion_dataset, tmp_path / "whole", do_sample=do_sample)

    calls = count_generate(teacher, fail_after=3)  # dies in the second shard (8 prompts = 2 batches per shard)
    with pytest.raises(KeyboardInterrupt):
        _generate(teacher, tokenizer, prompt_completion_dataset, tmp_path / "cut", do_sample=do_sample)
    assert calls == [4, 4, 4]
    teacher.generate = type(teacher).generate.__get__(teacher)
    calls = count_generate(teacher)
    resumed = _generate(teacher, tokenizer, prompt_completion_dataset, tmp_path / "cut", do_sample=do_sample)
    assert sum(calls) == len(prompt_completion_dataset) - 8  # the first shard was kept, the half shard redone
    assert resumed["teacher_completion"] == reference["teacher_completion"]


def test_generation_input_errors(tokenizer, make_teacher, prompt_completion_dataset):
    teacher = make_teacher()
    with pytest.raises(ValueError, match="`prompt` column"):
        _generate(teacher, tokenizer, prompt_completion_dataset.rename_column("prompt", "question"), None)
    with pytest.raises(ValueError, match="max_completion_length"):
        _generate(teacher, tokenizer, prompt_completion_dataset, None, max_completion_length=0)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        _generate(teacher, tokenizer, prompt_completion_dataset.to_iterable_dataset(), None)


def reference_ce(logits, labels, vocab_size):
    """Float64 mean over completion positions of -log softmax(logits_t)[label_{t+1}], written from the formula."""
    logits = logits[:, :-1, :vocab_size].double()
    targets = labels[:, 1:]
    keep = targets != -100
    log_probs = logits - torch.log(torch.exp(logits).sum(-1, keepdim=True))
    picked = log_probs[keep].gather(-1, targets[keep][:, None]).squeeze(-1)
    return -picked.sum() / keep.sum()


def test_cross_entropy_matches_float64_reference(tmp_path, tokenizer, make_student, prompt_completion_dataset):
    dataset = prompt_completion_dataset.add_column("teacher_completion", prompt_completion_dataset["completion"])
    student = make_student(extra_vocab_rows=7)
    trainer = DistillTrainer(
        model=student,
        args=config(tmp_path, distill_mode="sequence"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss, metrics = trainer.distill_mode.compute_loss(student, batch, None)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = reference_ce(logits, batch["labels"], len(tokenizer))
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    assert metrics["ce_tokens"] == (batch["labels"][:, 1:] != -100).sum()
    for name, param in student.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)

    # Negative controls: labels left unshifted, or the padded vocabulary rows in the softmax, must not match.
    with torch.no_grad():
        keep = batch["labels"] != -100
        unshifted = torch.nn.functional.cross_entropy(
            logits[..., : len(tokenizer)][keep].double(), batch["labels"][keep]
        )
        assert abs(unshifted.item() - loss.item()) > 1e-3
        student.get_output_embeddings().weight[len(tokenizer) :] = 5.0
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kept = trainer.distill_mode.compute_loss(student, batch, None)[0]
        assert kept.item() == pytest.approx(reference_ce(logits, batch["labels"], len(tokenizer)).item(), rel=1e-5)
        assert abs(reference_ce(logits, batch["labels"], None).item() - kept.item()) > 1e-3
