"""Context distillation (`distill_mode="context"`): the teacher reads a context the student never sees (issue 15)."""

import pytest
import torch
from datasets import Dataset

from tests.helpers import config, count_generate, snapshot
from tests.reference import per_token_loss
from trl_distill import DistillTrainer
from trl_distill.conversation import with_teacher_context
from trl_distill.modes import ContextDistillMode, ModeContext
from trl_distill.sources import completion_batch


CONTEXT = "Question: Zoe thinks of 7. Say it.\nAnswer: 7\n"


def context_config(tmp_path, **kwargs):
    return config(tmp_path, **{"distill_mode": "context", "teacher_context": CONTEXT, "alpha": 1.0, **kwargs})


def messages_rows(dataset):
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]}
        for row in dataset
    ])  # fmt: skip


def record_inputs(module):
    """The `input_ids` of every forward of `module` (a backbone), in call order."""
    seen = []
    module.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    return seen


def contains(row: list[int], part: list[int]) -> bool:
    return any(row[i : i + len(part)] == part for i in range(len(row) - len(part) + 1))


# ---------------------------------------------------------------- the teacher's prompt (conversation.py)


def test_text_context_goes_in_front_of_a_text_prompt():
    assert with_teacher_context("Q: hi\nA:", "Be brief.\n") == "Be brief.\nQ: hi\nA:"


def test_text_context_becomes_or_joins_the_system_message():
    user = [{"role": "user", "content": "hi"}]
    assert with_teacher_context(user, "Be brief.") == [{"role": "system", "content": "Be brief."}, *user]
    system = [{"role": "system", "content": "You are Bob."}, *user]
    merged = with_teacher_context(system, "Be brief.")
    assert merged == [{"role": "system", "content": "Be brief.\n\nYou are Bob."}, *user]
    assert system[0]["content"] == "You are Bob."  # the row is not modified


def test_messages_context_keeps_one_system_message_first():
    shots = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    prompt = [{"role": "system", "content": "P"}, {"role": "user", "content": "3+3?"}]
    assert [m["content"] for m in with_teacher_context(prompt, shots)] == ["S\n\nP", "2+2?", "4", "3+3?"]
    assert [m["content"] for m in with_teacher_context(prompt, shots[1:])] == ["P", "2+2?", "4", "3+3?"]
    with pytest.raises(TypeError, match="plain text"):
        with_teacher_context("3+3?", shots)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "settings, error, match",
    [
        (dict(teacher_context=None), ValueError, "needs `teacher_context`"),
        (dict(teacher_context="  "), ValueError, "`teacher_context` is empty"),
        (dict(teacher_context=[{"role": "robot", "content": "x"}]), ValueError, "`teacher_context`: every message"),
        (dict(teacher_context=42), TypeError, "`teacher_context` must be text"),
        (dict(self_distillation="yes"), TypeError, "`self_distillation`"),
        (dict(self_distillation=True, teacher_update_steps=0), ValueError, "`teacher_update_steps` must be"),
        (dict(teacher_update_steps=2), ValueError, "needs `self_distillation=True`"),
        (dict(self_distillation=True, teacher_model_name_or_path="x"), ValueError, "`teacher_model_name_or_path="),
        (dict(seq_kd=True), ValueError, "`seq_kd=True`"),
        (dict(padding_free=True), ValueError, "`padding_free=True`"),
        (dict(teacher_cache="store", kd_top_k=4), ValueError, "`teacher_cache`"),
        (dict(feature_weight=1.0), ValueError, "`feature_weight=1.0`"),
    ],
)
def test_settings_are_validated(tmp_path, settings, error, match):
    with pytest.raises(error, match=match):
        context_config(tmp_path, **settings)


@pytest.mark.parametrize("field, value", [("teacher_context", "Be brief."), ("self_distillation", True),
                                          ("teacher_update_steps", 3)])  # fmt: skip
def test_context_fields_are_refused_by_other_modes(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"`{field}=.*context distillation only"):
        config(tmp_path, **{field: value})


# ---------------------------------------------------------------- the aligned loss against a float64 reference


def _mode(args, student, teacher, tokenizer):
    context = ModeContext(args=args, student=student, teacher=teacher, tokenizer=tokenizer, teacher_tokenizer=tokenizer,
                          vocab_size=len(tokenizer))  # fmt: skip
    return ContextDistillMode(context)


def _text_batch(tokenizer, dataset, n=3):
    prompts = [tokenizer(text=row["prompt"])["input_ids"] for row in dataset.select(range(n))]
    completions = [
        tokenizer(text=row["completion"])["input_ids"] + [tokenizer.eos_token_id] for row in dataset.select(range(n))
    ]
    return prompts, completions, completion_batch(prompts, completions, pad_token_id=tokenizer.pad_token_id)


def _reference(student, teacher, tokenizer, prompts, completions, context_ids, **spec):
    """Per row, from full logits: teacher on `context + prompt + completion`, student on `prompt + completion`; the
    logits predicting each completion token (teacher at offset `len(context)`), loss in float64, mean over tokens."""
    losses = []
    for prompt, completion in zip(prompts, completions):
        s_logits = student(input_ids=torch.tensor([prompt + completion])).logits[0].double()
        with torch.no_grad():
            t_logits = teacher(input_ids=torch.tensor([context_ids + prompt + completion])).logits[0].double()
        s_at = s_logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]
        t_at = t_logits[len(context_ids) + len(prompt) - 1 : len(context_ids) + len(prompt) + len(completion) - 1]
        losses.append(per_token_loss(s_at, t_at, torch.tensor(completion), **spec))
    return torch.cat(losses).mean()


@pytest.mark.parametrize(
    "spec",
    [
        dict(objective="forward_kl", beta=0.5, temperature=2.0, top_k=None, alpha=0.7),
        dict(objective="reverse_kl", beta=0.5, temperature=1.0, top_k=5, alpha=1.0),
        dict(objective="generalized_jsd", beta=0.3, temperature=1.5, top_k=None, alpha=0.9),
    ],
    ids=["forward_kl-ce", "reverse_kl-topk", "gjsd"],
)
def test_aligned_loss_matches_float64_reference(tmp_path, tokenizer, make_student, make_teacher,
                                               prompt_completion_dataset, spec):  # fmt: skip
    args = context_config(tmp_path, objective=spec["objective"], beta=spec["beta"], kd_temperature=spec["temperature"],
                          kd_top_k=spec["top_k"], alpha=spec["alpha"])  # fmt: skip
    student, teacher = make_student(), make_teacher()
    with torch.no_grad():  # a sharper random teacher, so that what it reads shows clearly in its distributions
        for param in teacher.parameters():
            param.mul_(4.0)
    mode = _mode(args, student, teacher, tokenizer)
    prompts, completions, batch = _text_batch(tokenizer, prompt_completion_dataset)
    context_ids = tokenizer(text=CONTEXT, add_special_tokens=False)["input_ids"]

    loss, metrics = mode.compute_loss(student, batch, None)
    loss.backward()
    got = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    expected = _reference(student, teacher, tokenizer, prompts, completions, context_ids, **spec)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for name, param in student.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert int(metrics["kd_tokens"]) == sum(len(c) for c in completions)
    assert float(metrics["context_tokens"]) == len(context_ids)

    # Negative control: a teacher without the context (same tokens as the student) gives another loss.
    student.zero_grad()
    blind = _reference(student, teacher, tokenizer, prompts, completions, [], **spec)
    with pytest.raises(AssertionError):  # at the tolerance the match above used (here ~100x beyond it)
        torch.testing.assert_close(loss.double(), blind, rtol=1e-5, atol=1e-6)


def test_teacher_rows_hold_the_context_then_the_same_tokens(tmp_path, tokenizer, make_student, make_teacher,
                                                           prompt_completion_dataset):  # fmt: skip
    mode = _mode(context_config(tmp_path), make_student(), make_teacher(), tokenizer)
    prompts, completions, batch = _text_batch(tokenizer, prompt_completion_dataset)
    aligned = mode.teacher_batch(batch["input_ids"], batch["attention_mask"], batch["labels"])
    context_ids = tokenizer(text=CONTEXT, add_special_tokens=False)["input_ids"]
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        length = int(aligned.attention_mask[row].sum())
        assert aligned.input_ids[row, :length].tolist() == context_ids + prompt + completion
        assert not contains(batch["input_ids"][row].tolist(), context_ids)  # the student never has it
    # every compared pair predicts the same token on both sides
    s_next = batch["input_ids"][aligned.rows, aligned.student_positions + 1]
    t_next = aligned.input_ids[aligned.rows, aligned.teacher_positions + 1]
    assert torch.equal(s_next, t_next) and s_next.numel() == sum(len(c) for c in completions)


def test_the_context_is_what_the_self_teacher_adds(tmp_path, tokenizer, make_student, prompt_completion_dataset):
    """A self-teacher is the student: without the context its KD loss would be exactly 0; with it, it is not."""
    student = make_student()
    _, _, batch = _text_batch(tokenizer, prompt_completion_dataset)
    with torch.no_grad():
        for param in student.parameters():  # sharper, so that what it reads shows clearly in its distributions
            param.mul_(4.0)
        loss, _ = _mode(context_config(tmp_path, self_distillation=True), student, None, tokenizer).compute_loss(
            student, batch, None
        )
        other, _ = _mode(context_config(tmp_path, self_distillation=True, teacher_context="Answer: 3\n"), student,
                         None, tokenizer).compute_loss(student, batch, None)  # fmt: skip
    assert loss.item() > 1e-3 and other.item() > 1e-3 and abs(loss.item() - other.item()) > 1e-4, (loss, other)
    blind = _mode(context_config(tmp_path, self_distillation=True), student, None, tokenizer)
    blind.text_context_ids = []  # control: the same mode with an empty context
    with torch.no_grad():
        assert blind.compute_loss(student, batch, None)[0].item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- the trainer


def _train(tmp_path, tokenizer, student, dataset, teacher=None, **kwargs):
    return DistillTrainer(model=student, teacher_model=teacher, args=context_config(tmp_path, **kwargs),
                          train_dataset=dataset, processing_class=tokenizer)  # fmt: skip


def test_trains_on_text_rows_with_a_separate_teacher(tmp_path, tokenizer, make_student, make_teacher,
                                                     prompt_completion_dataset):  # fmt: skip
    student, teacher = make_student(), make_teacher()
    before_s, before_t = snapshot(student), snapshot(teacher)
    teacher_seen, student_seen = record_inputs(teacher.model), record_inputs(student.model)
    trainer = _train(tmp_path, tokenizer, student, prompt_completion_dataset, teacher)
    trainer.train()
    context_ids = tokenizer(text=CONTEXT, add_special_tokens=False)["input_ids"]
    assert teacher_seen and all(row.tolist()[: len(context_ids)] == context_ids for ids in teacher_seen for row in ids)
    assert student_seen and not any(contains(row.tolist(), context_ids) for ids in student_seen for row in ids)
    assert any(not torch.equal(p, before_s[n]) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(p, before_t[n]) for n, p in teacher.named_parameters())
    logged = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert logged and all(log["kd_loss"] > 0 and log["ce_loss"] == 0 for log in logged)


def test_trains_on_messages_rows(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    student, teacher = make_student(), make_teacher()
    rows = messages_rows(prompt_completion_dataset)
    system = {"role": "system", "content": "Always answer 7."}
    teacher_seen, student_seen = record_inputs(teacher.model), record_inputs(student.model)
    trainer = _train(tmp_path, tokenizer, student, rows, teacher, teacher_context=system["content"])
    mode = trainer.distill_mode
    assert len(mode.conversational) == len(rows)
    for row in rows.select(range(3)):
        prompt = row["messages"][:-1]
        student_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]  # fmt: skip
        teacher_ids = tokenizer.apply_chat_template([system, *prompt], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]  # fmt: skip
        assert mode.teacher_prompt_ids(student_ids) == teacher_ids
    trainer.train()
    marker = tokenizer(text="system\nAlways answer 7.", add_special_tokens=False)["input_ids"]
    assert teacher_seen and all(contains(row.tolist(), marker) for ids in teacher_seen for row in ids)
    assert student_seen and not any(contains(row.tolist(), marker) for ids in student_seen for row in ids)
    assert all(log["kd_loss"] > 0 for log in trainer.state.log_history if "kd_loss" in log)


def test_messages_context_is_refused_for_text_rows(tmp_path, tokenizer, make_student, make_teacher,
                                                   prompt_completion_dataset):  # fmt: skip
    shots = [{"role": "user", "content": "Say 7."}, {"role": "assistant", "content": "7"}]
    with pytest.raises(TypeError, match="list of messages but the rows' prompts are plain text"):
        _train(tmp_path, tokenizer, make_student(), prompt_completion_dataset, make_teacher(), teacher_context=shots)


def test_self_teacher_is_a_frozen_copy_of_the_initial_student(tmp_path, tokenizer, make_student,
                                                              prompt_completion_dataset):  # fmt: skip
    student = make_student()
    initial = snapshot(student)
    trainer = _train(tmp_path, tokenizer, student, prompt_completion_dataset, self_distillation=True)
    assert trainer.teacher_model is None and trainer.distill_mode.teacher is not student
    trainer.train()
    teacher = trainer.distill_mode.teacher
    assert all(torch.equal(p, initial[n]) and not p.requires_grad for n, p in teacher.named_parameters())
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())
    trainer.save_model()  # the artifact (receipt, card) is written without a separate teacher
    assert (tmp_path / "out" / "distill_receipt.json").exists()


def test_teacher_update_steps_copies_the_student(tmp_path, tokenizer, make_student, prompt_completion_dataset):
    from transformers import TrainerCallback

    student = make_student()
    initial = snapshot(student)
    trainer = _train(tmp_path, tokenizer, student, prompt_completion_dataset, self_distillation=True,
                     teacher_update_steps=2, max_steps=3)  # fmt: skip
    at_step = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            at_step[state.global_step] = snapshot(trainer.model)

    trainer.add_callback(Snapshot())
    trainer.train()
    teacher = dict(trainer.distill_mode.teacher.named_parameters())
    assert all(torch.equal(teacher[n], at_step[2][n]) for n in teacher)
    assert any(not torch.equal(teacher[n], initial[n]) for n in teacher)  # refreshed, not the initial student
    assert any(not torch.equal(teacher[n], at_step[3][n]) for n in teacher)  # and not refreshed at step 3


def test_resume_with_teacher_update_steps_gives_the_same_losses(tmp_path, tokenizer, make_student,
                                                               prompt_completion_dataset):  # fmt: skip
    """The refreshed teacher is not in the checkpoint: a resumed run rebuilds it from the checkpoint's student."""
    settings = dict(self_distillation=True, teacher_update_steps=2, max_steps=4, save_strategy="steps", save_steps=2,
                    per_device_train_batch_size=2)  # fmt: skip
    full = _train(tmp_path / "a", tokenizer, make_student(), prompt_completion_dataset, **settings)
    full.train()
    resumed = _train(tmp_path / "a", tokenizer, make_student(), prompt_completion_dataset, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))

    def losses(trainer):
        return [log["loss"] for log in trainer.state.log_history if "loss" in log and log["step"] in (3, 4)]

    assert len(losses(resumed)) == 2 and losses(resumed) == pytest.approx(losses(full), rel=1e-5)
    fresh = _train(
        tmp_path / "b", tokenizer, make_student(), prompt_completion_dataset, **{**settings, "max_steps": 2}
    )
    fresh.distill_mode.callbacks = lambda: []  # control: no refresh on resume -> the initial student teaches
    fresh.callback_handler.callbacks = [c for c in fresh.callback_handler.callbacks
                                        if type(c).__name__ != "TeacherRefresh"]  # fmt: skip
    fresh.args.max_steps = 4
    fresh.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert losses(fresh) != pytest.approx(losses(full), rel=1e-5)


def test_lora_student_teaches_itself_with_adapters_disabled(tmp_path, tokenizer, make_student,
                                                            prompt_completion_dataset):  # fmt: skip
    import copy

    from peft import LoraConfig

    student = make_student()
    pristine = copy.deepcopy(student)
    trainer = DistillTrainer(
        model=student, args=context_config(tmp_path, self_distillation=True), train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )  # fmt: skip
    mode = trainer.distill_mode
    assert mode.adapters_off and mode.teacher is trainer.model  # no second copy of the weights
    before = snapshot(trainer.model)
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora" in n for n in changed)

    _, _, batch = _text_batch(tokenizer, prompt_completion_dataset)
    aligned = mode.teacher_batch(batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        got = mode.teacher_hidden_states(aligned.input_ids, aligned.attention_mask)
        expected = pristine.model(input_ids=aligned.input_ids, attention_mask=aligned.attention_mask).last_hidden_state
        with_adapters = trainer.model.base_model.model.model(
            input_ids=aligned.input_ids, attention_mask=aligned.attention_mask
        ).last_hidden_state
    mask = aligned.attention_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask])
    assert not torch.allclose(with_adapters[mask], expected[mask])  # control: the trained adapters do change it
    assert trainer.model.training  # the teacher pass left the student's train flag as it was


def test_lora_teacher_cannot_be_refreshed(tmp_path, tokenizer, make_student, prompt_completion_dataset):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="`teacher_update_steps=2` with a PEFT student"):
        DistillTrainer(
            model=make_student(), args=context_config(tmp_path, self_distillation=True, teacher_update_steps=2),
            train_dataset=prompt_completion_dataset, processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        )  # fmt: skip


def test_a_teacher_is_required_unless_self_distillation(tmp_path, tokenizer, make_student, make_teacher,
                                                        prompt_completion_dataset):  # fmt: skip
    with pytest.raises(ValueError, match="needs a teacher: pass `teacher_model`.*self_distillation=True"):
        _train(tmp_path, tokenizer, make_student(), prompt_completion_dataset)
    with pytest.raises(ValueError, match="but a `teacher_model` was given"):
        _train(tmp_path, tokenizer, make_student(), prompt_completion_dataset, make_teacher(), self_distillation=True)


def test_other_tokenizers_are_refused(tmp_path, tokenizer, other_tokenizer, make_student, prompt_completion_dataset):
    from trl_distill.demo.tiny import build_tiny_model

    teacher = build_tiny_model(other_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    with pytest.raises(ValueError, match="share a vocabulary"):
        DistillTrainer(model=make_student(), teacher_model=teacher, args=context_config(tmp_path),
                       train_dataset=prompt_completion_dataset, processing_class=tokenizer,
                       teacher_processing_class=other_tokenizer)  # fmt: skip


def test_on_policy_reverse_kl_scores_student_samples_with_the_context(
    tmp_path, tokenizer, make_student, prompt_completion_dataset, one_thread
):
    """The seed's loop: the student samples without the context, its frozen copy scores the samples with it."""
    student = make_student()
    trainer = _train(tmp_path, tokenizer, student, prompt_completion_dataset, self_distillation=True, lmbda=1.0,
                     objective="reverse_kl", max_completion_length=4, max_steps=2)  # fmt: skip
    generations = count_generate(trainer.model)
    teacher_seen = record_inputs(trainer.distill_mode.teacher.model)
    trainer.train()
    assert len(generations) == 2
    context_ids = tokenizer(text=CONTEXT, add_special_tokens=False)["input_ids"]
    assert len(teacher_seen) == 2 and all(row.tolist()[: len(context_ids)] == context_ids
                                          for ids in teacher_seen for row in ids)  # fmt: skip
    logged = [log for log in trainer.state.log_history if "on_policy" in log]
    assert logged and all(log["on_policy"] == 1 for log in logged)
    assert all(log["kd_loss"] >= 0 for log in trainer.state.log_history if "kd_loss" in log)


def test_receipt_names_the_method(tmp_path):
    args = context_config(tmp_path, self_distillation=True)
    from trl_distill.provenance import describe_method, distillation_settings

    label, papers = describe_method(distillation_settings(args), args)
    assert label.startswith("context distillation (forward_kl; teacher: the student itself")
    assert {p["arxiv"] for p in papers} >= {"2209.15189", "2112.00861"}
