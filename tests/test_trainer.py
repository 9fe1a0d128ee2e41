"""DistillTrainer end to end on tiny local models (CPU, a few steps each)."""

import json
import os

import pytest
import torch
from datasets import Dataset

from trl_distill import DistillConfig, DistillTrainer
from trl_distill.demo.tiny import save_pretrained_pair


def config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
    )
    return DistillConfig(**{**defaults, **kwargs})


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_trained(trainer, student_before, teacher_before):
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param.detach(), student_before[name]), f"trainable parameter {name} did not change"
    for name, param in trainer.teacher_model.named_parameters():
        assert torch.equal(param.detach(), teacher_before[name]), f"teacher parameter {name} changed"
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses


@pytest.mark.parametrize(
    "settings",
    [
        dict(objective="forward_kl"),
        dict(objective="reverse_kl", kd_top_k=8),
        dict(objective="jsd", alpha=1.0),
        dict(objective="generalized_jsd", beta=0.2, kd_temperature=1.0, loss_reduction="sum"),
    ],
    ids=["forward_kl", "reverse_kl-topk", "jsd", "gjsd-sum"],
)
def test_trains_each_objective(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, settings):
    student, teacher = make_student(), make_teacher()
    before_s, before_t = snapshot(student), snapshot(teacher)
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **settings),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert_trained(trainer, before_s, before_t)
    logged = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert logged and all(log["kd_loss"] >= 0 for log in logged)
    if settings.get("alpha", 0.9) == 1.0:
        assert all(log["ce_loss"] == 0 for log in logged)


def test_lora_student(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    from peft import LoraConfig

    student, teacher = make_student(), make_teacher()
    before_t = snapshot(teacher)
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, kd_top_k=16, activation_checkpointing=True),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    before_s = snapshot(trainer.model)
    trainer.train()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert_trained(trainer, before_s, before_t)


def _one_step_params(tmp_path, tokenizer, make_student, make_teacher, dataset, **kwargs):
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return snapshot(trainer.model)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_accumulation_matches_one_big_batch(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, reduction
):
    big = _one_step_params(
        tmp_path / "big",
        tokenizer,
        make_student,
        make_teacher,
        prompt_completion_dataset,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        loss_reduction=reduction,
    )
    accumulated = _one_step_params(
        tmp_path / "acc",
        tokenizer,
        make_student,
        make_teacher,
        prompt_completion_dataset,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        loss_reduction=reduction,
    )
    init = snapshot(make_student())
    for name in big:
        assert not torch.equal(big[name], init[name]) or "embed" in name
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6)


def test_checkpoint_and_resume_give_the_same_losses(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    full = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(tmp_path / "a", **args),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "trainer_state.json").exists()
    assert (tmp_path / "a" / "out" / "README.md").exists()  # model card written with the checkpoint

    resumed = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(tmp_path / "a", **args),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def losses(trainer, steps):
        return [log["loss"] for log in trainer.state.log_history if "loss" in log and log["step"] in steps]

    assert len(losses(resumed, {3, 4})) == 2
    assert losses(resumed, {3, 4}) == pytest.approx(losses(full, {3, 4}), rel=1e-5)


def test_teacher_and_student_from_local_directories(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    # The real loading code (`from_pretrained` on an id) exercised on local directories; the teacher's tokenizer is
    # loaded from its directory and checked against the student's.
    student_dir = save_pretrained_pair(make_student(), tokenizer, tmp_path / "student")
    teacher_dir = save_pretrained_pair(make_teacher(), tokenizer, tmp_path / "teacher")
    trainer = DistillTrainer(
        model=student_dir,
        args=config(
            tmp_path,
            max_steps=1,
            teacher_model_name_or_path=teacher_dir,
            teacher_model_init_kwargs={"dtype": "float32"},
            model_init_kwargs={"dtype": "float32"},
        ),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    assert trainer.teacher_processing_class is not tokenizer
    assert trainer.vocab_size == len(tokenizer)
    trainer.train()
    trainer.save_model()
    saved = os.listdir(tmp_path / "out")
    assert "model.safetensors" in saved
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in trainer.model.parameters())


def test_tokenizer_mismatch_is_refused(tmp_path, tokenizer, other_tokenizer, make_student, prompt_completion_dataset):
    from trl_distill.demo.tiny import build_tiny_model

    teacher = build_tiny_model(other_tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError) as error:
        DistillTrainer(
            model=make_student(),
            teacher_model=teacher,
            args=config(tmp_path),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
            teacher_processing_class=other_tokenizer,
        )
    message = str(error.value)
    assert message.startswith("teacher and student tokenizers must share a vocabulary for token-level KD")
    assert 'distill_mode="uld"' in message and "sequence-level" in message


def test_padded_vocabulary_rows_train(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    # Same tokenizer, different numbers of embedding rows (as Qwen2.5-0.5B's 151936 vs 7B's 152064).
    student = make_student(arch="qwen2", extra_vocab_rows=5)
    teacher = make_teacher(arch="qwen2", extra_vocab_rows=13)
    with torch.no_grad():  # make the padding rows loud: if they leaked into a softmax the loss would change a lot
        teacher.get_output_embeddings().weight[len(tokenizer) :] = 3.0
    before_s, before_t = snapshot(student), snapshot(teacher)
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, optim="sgd", learning_rate=0.5),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    assert trainer.vocab_size == len(tokenizer)
    trainer.train()
    assert_trained(trainer, before_s, before_t)
    head = trainer.model.get_output_embeddings().weight
    torch.testing.assert_close(head[len(tokenizer) :], before_s["lm_head.weight"][len(tokenizer) :])


def test_text_dataset_and_conversational_assistant_only(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    rows = prompt_completion_dataset.select(range(8))
    text = Dataset.from_dict({"text": [p + c for p, c in zip(rows["prompt"], rows["completion"])]})
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(tmp_path / "t", max_steps=1),
        train_dataset=text,
        processing_class=tokenizer,
    )
    trainer.train()

    messages = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
        for p, c in zip(rows["prompt"], rows["completion"])
    ]
    chat = Dataset.from_dict({"messages": messages})
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(tmp_path / "c", max_steps=1, assistant_only_loss=True),
        train_dataset=chat,
        processing_class=tokenizer,
    )
    sample = trainer.train_dataset[0]
    assert -100 in sample["labels"] and any(label != -100 for label in sample["labels"])
    trainer.train()


def test_all_masked_batch_gives_zero_loss(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(tmp_path),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch["labels"][:] = -100
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None)


def test_eval_loss_and_metrics_are_logged(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset, eval_dataset
):
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=2),
        train_dataset=prompt_completion_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert evals and "eval_kd_loss" in evals[-1] and evals[-1]["eval_loss"] > 0


def test_requires_a_teacher(tmp_path, make_student, tokenizer, prompt_completion_dataset):
    with pytest.raises(ValueError, match="teacher_model"):
        DistillTrainer(
            model=make_student(),
            args=config(tmp_path),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(objective="kl"), "objective"),
        (dict(beta=1.5), "beta"),
        (dict(kd_temperature=0.0), "kd_temperature"),
        (dict(alpha=-0.1), "alpha"),
        (dict(kd_top_k=0), "kd_top_k"),
        (dict(kd_top_k=3.5), "kd_top_k"),
        (dict(kd_chunk_size=0), "kd_chunk_size"),
        (dict(kd_chunk_size=64.0), "kd_chunk_size"),
        (dict(loss_reduction="batchmean"), "loss_reduction"),
        (dict(distill_mode="feature"), "distill_mode"),
    ],
)
def test_config_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


def test_low_temperature_warns(tmp_path):
    with pytest.warns(UserWarning, match="kd_temperature"):
        config(tmp_path, kd_temperature=0.5)


def test_config_parses_from_command_line_and_yaml(tmp_path):
    from trl import TrlParser

    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(json.dumps({"output_dir": str(tmp_path), "objective": "reverse_kl", "kd_top_k": 64}))
    (args,) = TrlParser((DistillConfig,)).parse_args_and_config(
        ["--config", str(yaml_path), "--kd_temperature", "4.0", "--use_cpu", "true"]
    )
    assert (args.objective, args.kd_top_k, args.kd_temperature) == ("reverse_kl", 64, 4.0)


def test_packing(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    # Packed (padding-free) batches: both models get the same position ids, so sequences do not attend across rows.
    student, teacher = make_student(), make_teacher()
    before_s, before_t = snapshot(student), snapshot(teacher)
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, packing=True, max_length=64, per_device_train_batch_size=2, max_steps=2),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert "position_ids" in batch and batch["input_ids"].shape[0] == 1
    trainer.train()
    assert_trained(trainer, before_s, before_t)


def test_sft_config_is_converted(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    from trl import SFTConfig

    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=1,
        report_to="none",
        per_device_train_batch_size=2,
    )
    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=args,
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    assert isinstance(trainer.args, DistillConfig) and trainer.args.max_steps == 1
    assert (trainer.args.objective, trainer.args.kd_temperature, trainer.args.alpha) == ("forward_kl", 2.0, 0.9)
