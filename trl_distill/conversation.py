"""Conversational (`messages`) rows: one rule for every distillation mode (issue 12).

**The rule.** A `messages` row is trained and measured as the prompt/completion row
`{"prompt": messages[:-1], "completion": [messages[-1]]}`: the distillation loss (and the cross-entropy, the held-out
KL and perplexity) covers the *final* assistant turn, its end-of-turn token included; everything before it (system
prompt, user turns, earlier assistant turns) is the prompt, seen as context only. The last message must come from the
assistant. `DistillTrainer` (training and eval sets, unless a `formatting_func` is given) and `cache_teacher` split
rows this way before TRL's `SFTTrainer` tokenizes them, and `heldout_metrics` splits raw rows the same way. TRL then
renders each side with its own tokenizer's chat template (the prompt with the generation prompt appended, the
completion as the rest of the full rendering), so no `{% generation %}` markers are needed, and a template that adds a
default system prompt (SmolLM2) adds it to the prompt, outside the loss.

**Why the final turn only.** It is the one rule every mode can follow: on-policy steps (`lmbda > 0`), `seq_kd=True`
and `distill_mode="sequence"` generate *one* completion per row, after the prompt, so a row can only have one turn in
the loss; token, ULD, feature and offline-store training then see the same tokens as those modes and as the held-out
measurement (which compares runs of different modes on the same rows). It is also what TRL's `GKDTrainer` trains
on (its collator masks all but the last message), so the two measure the same tokens. To distill every assistant
turn, give each its own row: [`expand_assistant_turns`] turns a conversation with n assistant turns into n rows under
the same rule (the prompt of a later turn includes the earlier ones as the dataset wrote them).

**The teacher's side.** Token-level, offline-store and feature KD share the student's tokenizer, so the teacher reads
the student's rendering. Sequence-level KD and `seq_kd` render the prompt with the *teacher's* chat template
([`prompt_token_ids`]); a teacher tokenizer without one (a base model such as Gemma-3-270m) is refused with an error
that says how to give it one. ULD's teacher reads the student's rendered text, re-tokenized by its own tokenizer:
the character-offset alignment pairs tokens of the same text, so the teacher's own template (other scaffolding
characters) cannot be used there; a base teacher therefore works in ULD as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


__all__ = [
    "as_prompt_completion",
    "expand_assistant_turns",
    "is_messages_row",
    "prompt_token_ids",
    "split_conversation",
]

MESSAGES = "messages"


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(
            f"{where}: `messages` must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}."
        )
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"{where}: every message needs a `role` (and `content`), got {message!r}.")


def split_conversation(messages: Sequence[Mapping], *, index: int | None = None) -> dict[str, list]:
    """
    Split one conversation at its last message: `{"prompt": messages[:-1], "completion": [messages[-1]]}`.

    Args:
        messages (`list[dict]`): The conversation, `{"role": ..., "content": ...}` dicts in order; the last one must
            have `role="assistant"`.
        index (`int`, *optional*): The row's index, named in errors.

    Returns:
        `dict` with `prompt` (the messages before the last, possibly empty) and `completion` (a one-message list).

    Raises:
        ValueError: when the last message is not the assistant's (`conversation does not end with an assistant
            turn`), or `messages` is not a list of role dicts.
    """
    where = "A `messages` row" if index is None else f"Row {index} of the `messages` dataset"
    _check_messages(messages, where)
    last = messages[-1]
    if last["role"] != "assistant":
        raise ValueError(
            f"{where}: conversation does not end with an assistant turn (its last message has role "
            f"{last['role']!r}). The distillation loss covers the final assistant message, so every row must end with "
            "one: drop the trailing messages, or for prompts without answers (on-policy / sequence-level KD), give "
            "`prompt` rows with a placeholder `completion`."
        )
    return {"prompt": [dict(m) for m in messages[:-1]], "completion": [dict(last)]}


def is_messages_row(row: Mapping) -> bool:
    """Whether `row` is an untokenized conversational row that [`as_prompt_completion`] would split."""
    return MESSAGES in row and "prompt" not in row and "input_ids" not in row


def _columns(dataset) -> list[str]:
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an IterableDataset of unknown features: look at its first row
        first = next(iter(dataset), None)
        columns = list(first) if isinstance(first, Mapping) else []
    return list(columns)


def as_prompt_completion(dataset):
    """
    `dataset` with its `messages` column replaced by `prompt` / `completion` (see the module docstring for the rule).

    Datasets without a `messages` column, with a `prompt` column already, or already tokenized (`input_ids`) are
    returned unchanged, as is `None`. Other columns (`tools`, `chat_template_kwargs`, ids...) are kept. Accepts a
    `datasets.Dataset`, an `IterableDataset` (split lazily), a `dict` of them (each converted), or a list of row
    dicts.

    Raises:
        ValueError: naming the row, when a conversation does not end with an assistant turn (for an
            `IterableDataset`, when that row is read).
    """
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {name: as_prompt_completion(split) for name, split in dataset.items()}
    if isinstance(dataset, list):
        return [
            {**{k: v for k, v in row.items() if k != MESSAGES}, **split_conversation(row[MESSAGES], index=i)}
            if is_messages_row(row)
            else row
            for i, row in enumerate(dataset)
        ]
    columns = _columns(dataset)
    if MESSAGES not in columns or "prompt" in columns or "input_ids" in columns:
        return dataset

    def split(row, index):
        return split_conversation(row[MESSAGES], index=index)

    kwargs = {"desc": "Splitting conversations at the last assistant turn"} if hasattr(dataset, "__len__") else {}
    return dataset.map(split, with_indices=True, remove_columns=[MESSAGES], **kwargs)


def expand_assistant_turns(dataset):
    """
    One prompt/completion row per assistant turn: the way to distill *every* assistant turn of a conversation.

    A conversation with assistant turns at positions `i1 < i2 < ...` becomes the rows
    `{"prompt": messages[:i], "completion": [messages[i]]}` for each of them (messages after the last assistant
    turn are dropped); other columns are copied to each row. Each row then follows the one rule of
    [`as_prompt_completion`], in every mode (a prompt is rendered once per row, so the compute grows with the number
    of turns).

    Args:
        dataset (`datasets.Dataset` or `list[dict]`): Rows with a `messages` column.

    Returns:
        The same type, with `prompt` and `completion` instead of `messages`.

    Raises:
        ValueError: naming the row, when a conversation has no assistant turn.
    """

    def expand(row: Mapping, index: int) -> list[dict]:
        messages = row[MESSAGES]
        where = f"Row {index} of the `messages` dataset"
        _check_messages(messages, where)
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if not turns:
            raise ValueError(f"{where} has no assistant turn: there is nothing to distill. Drop it from the dataset.")
        rest = {k: v for k, v in row.items() if k != MESSAGES}
        return [{**rest, **split_conversation(messages[: i + 1], index=index)} for i in turns]

    if isinstance(dataset, list):
        return [out for i, row in enumerate(dataset) for out in expand(row, i)]
    if MESSAGES not in _columns(dataset):
        raise ValueError(f"`expand_assistant_turns` needs a `messages` column (columns: {_columns(dataset)}).")

    def expand_batch(batch: dict, indices: list[int]) -> dict:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        out = [new for row, index in zip(rows, indices, strict=True) for new in expand(row, index)]
        return {key: [row[key] for row in out] for key in (out[0] if out else {})}

    return dataset.map(expand_batch, batched=True, with_indices=True, remove_columns=_columns(dataset))


def prompt_token_ids(tokenizer, prompt: str | list[dict], *, role: str = "teacher") -> list[int]:
    """
    Token ids of a prompt as `SFTTrainer` renders it: plain text as is, messages through `tokenizer`'s own chat
    template with the generation prompt appended (so generation continues with the assistant's answer).

    Raises:
        ValueError: for messages when `tokenizer` has no chat template (a base model), naming the fix: give it one
            (e.g. the student's) and pass that tokenizer, or use plain-text prompts.
    """
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The {role}'s tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has no "
            "chat template, so conversational prompts cannot be rendered for it (a base model). Give it one, e.g. the "
            "student's: `teacher_tokenizer.chat_template = student_tokenizer.chat_template`, and pass it as "
            "`teacher_processing_class`; or use plain-text `prompt`/`completion` rows."
        )
    encoded = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])
