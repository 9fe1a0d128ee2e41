"""Context distillation: bake a context (instructions, a persona, few-shot examples) into the weights.

Snell et al. 2022, [Learning by Distilling Context](https://arxiv.org/abs/2209.15189); Askell et al. 2021 (a long
"HHH" prompt distilled into the model, [arXiv:2112.00861](https://arxiv.org/abs/2112.00861)). The teacher reads each
prompt with `teacher_context` in front of it, the student reads the prompt alone, and token-level KD matches the
teacher's next-token distributions on the response tokens, which both sides share (same ids, different offsets).
After training, the student answers without the context the way the teacher answers with it.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from ..batch import model_inputs
from ..conversation import check_teacher_context, with_teacher_context
from ..inference import eval_mode
from ..losses import linear_distillation_loss
from ..teachers.live import call_with_lm_heads, check_plain_lm_head, lm_head_and_backbone
from .base import DistillMode, register_mode


__all__ = ["ContextDistillMode", "TeacherBatch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherBatch:
    """The teacher's side of a batch and how its positions line up with the student's.

    Attributes:
        input_ids, attention_mask (`torch.Tensor` of shape `(B, T_teacher)`): Per row, the teacher's prompt (context +
            prompt) followed by the row's tokens after its prompt, exactly as the student has them; right-padded.
        rows (`torch.Tensor` of shape `(N,)`): Batch row of each position in the loss.
        student_positions (`torch.Tensor` of shape `(N,)`): Student position `p` whose next token `p + 1` is in the
            loss (`labels[row, p + 1] != -100`), in row order then position order.
        teacher_positions (`torch.Tensor` of shape `(N,)`): The same prediction in the teacher's row: `p + offset`,
            `offset` = teacher prompt length - student prompt length.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    student_positions: torch.Tensor
    teacher_positions: torch.Tensor


@register_mode("context")
class ContextDistillMode(DistillMode):
    r"""`alpha * T^2 * D(teacher(context + prompt), student(prompt)) + (1 - alpha) * CE` on the response tokens.

    What each side reads, per row (the row's prompt is every token before its first loss token):

    - student: the batch as collated (the prompt without the context); it also samples the on-policy completions
      (`lmbda > 0`) from that prompt, which the teacher then scores with the context: the loop of Snell et al. with
      `objective="reverse_kl"`, `lmbda=1`;
    - teacher: `teacher prompt + the row's tokens after its prompt`, where the teacher prompt is, for plain-text rows,
      the ids of `teacher_context` (tokenized alone, without special tokens, after the tokenizer's own leading
      special tokens such as BOS) followed by the prompt's ids; for conversational rows, the rendering by the chat
      template of [`~trl_distill.conversation.with_teacher_context`]`(prompt, teacher_context)` (the context as, or
      merged into, the system message, or prepended turns), precomputed from the datasets' raw `prompt` column.

    Student position `p` (predicting token `p + 1`) is compared with teacher position `p + offset`; only those
    positions' final hidden states are gathered and passed to
    [`~trl_distill.losses.linear_distillation_loss`] (`objective`, `kd_temperature`, `kd_top_k`, `alpha`,
    `loss_reduction`, `num_items_in_batch` as in token-level KD; no `(B, T, V)` logits). Gradients flow into the
    student only; the teacher runs under `torch.no_grad` in eval mode.

    The teacher (`DistillConfig.self_distillation`):

    - `False`: a separate `teacher_model` sharing the student's tokenizer (it reads the student's rendering);
    - `True`: the student itself, as it was when training started, costing no load: for a PEFT (LoRA) student, the
      same model with its adapters disabled (`PeftModel.disable_adapter()`: the base weights, no second copy); for a
      full-weight student, a frozen copy made when the mode is built. `teacher_update_steps=N` copies the student's
      weights into that copy every N optimizer steps (and once when a run resumes past step 0: exact when checkpoints
      fall on multiples of N). For a PEFT student there is no refresh: its teacher *is* the base model, and merging the
      adapters into it would move the student too (it would then count its adapters twice); refused.

    Refused: `teacher_cache` (the store holds targets without the context), `seq_kd` (the teacher's generations would
    not see it), feature KD, packed / padding-free batches (rows must be delimited to put a context in front of
    them), different tokenizers (`requires_shared_vocab`), and self-distillation under DeepSpeed / FSDP.
    """

    requires_teacher = False  # `self_distillation=True` needs none; `__init__` asks for one otherwise
    supports_generated_completions = True
    label = "context distillation"
    papers = (
        {"arxiv": "2209.15189", "title": "Learning by Distilling Context"},
        {"arxiv": "2112.00861", "title": "A General Language Assistant as a Laboratory for Alignment"},
    )
    settings = ("teacher_context", "self_distillation", "teacher_update_steps", "objective", "kd_temperature", "alpha",
                "loss_reduction", "kd_top_k")  # fmt: skip

    @classmethod
    def describe(cls, args) -> str:
        teacher = "the student itself" if args.self_distillation else "a separate teacher"
        return f"{cls.label} ({args.objective}; teacher: {teacher} with the context)"

    @classmethod
    def validate_config(cls, args) -> None:
        if args.teacher_context is None:
            raise ValueError(
                "`distill_mode='context'` needs `teacher_context`: the text (or list of messages) the teacher sees "
                "in front of each prompt and the student does not."
            )
        check_teacher_context(args.teacher_context)
        if not isinstance(args.self_distillation, bool):
            raise TypeError(f"`self_distillation` must be True or False, got {args.self_distillation!r}.")
        steps = args.teacher_update_steps
        if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ValueError(f"`teacher_update_steps` must be None or an integer >= 1, got {steps!r}.")
        if steps is not None and not args.self_distillation:
            raise ValueError(
                f"`teacher_update_steps={steps}` refreshes a teacher that is a copy of the student, so it needs "
                "`self_distillation=True`; a separate teacher is never overwritten. Unset `teacher_update_steps`."
            )
        if args.self_distillation and args.teacher_model_name_or_path is not None:
            raise ValueError(
                f"`self_distillation=True` makes the student its own teacher, but `teacher_model_name_or_path="
                f"{args.teacher_model_name_or_path!r}` names another. Unset one of them."
            )
        if args.self_distillation and (args.deepspeed or args.fsdp):
            raise ValueError(
                "`self_distillation=True` is not supported under DeepSpeed / FSDP (a copy or an adapter switch of a "
                "sharded student); pass the teacher as a separate `teacher_model` instead."
            )
        if args.seq_kd:
            raise ValueError(
                "`seq_kd=True` with `distill_mode='context'`: the teacher's generations are made from the student's "
                "prompt, without `teacher_context`. Use on-policy samples (`lmbda > 0`) or the dataset's completions."
            )
        for name in ("packing", "padding_free"):
            if getattr(args, name, False):
                raise ValueError(
                    f"`{name}=True` is not supported with `distill_mode='context'`: the context goes in front of each "
                    f"row's prompt, which packed rows no longer delimit. Set `{name}=False`."
                )
        super().validate_config(args)

    def __init__(self, context):
        super().__init__(context)
        args, student = self.args, context.student
        self.adapters_off = False  # the teacher is `student` with its PEFT adapters disabled
        if args.self_distillation:
            if context.teacher is not None:
                raise ValueError(
                    "`self_distillation=True` makes the student its own teacher, but a `teacher_model` was given. "
                    "Pass `teacher_model=None`, or set `self_distillation=False` to distill from that teacher."
                )
            if _is_peft(student):
                if args.teacher_update_steps is not None:
                    raise ValueError(
                        f"`teacher_update_steps={args.teacher_update_steps}` with a PEFT student: its teacher is the "
                        "base model with the adapters disabled, and refreshing it would mean merging the adapters "
                        "into the base weights, which moves the student too. Unset `teacher_update_steps`, or train a "
                        "full-weight student (its teacher is then a frozen copy that can be refreshed)."
                    )
                self.adapters_off, self.teacher = True, student
            else:
                self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        elif context.teacher is None:
            raise ValueError(
                "`distill_mode='context'` needs a teacher: pass `teacher_model` (or `teacher_model_name_or_path`), or "
                "set `self_distillation=True` to use the student itself (a frozen copy, or for a PEFT student the "
                "base model with its adapters disabled)."
            )
        else:
            self.teacher = context.teacher
        check_plain_lm_head(student, "student")
        check_plain_lm_head(self.teacher, "teacher")
        self.tokenizer = context.tokenizer
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        self.max_positions = getattr(getattr(self.teacher, "config", None), "max_position_embeddings", None)
        self.text_rows_seen = False
        self.conversational = self._conversational_prompts()
        self.text_rows_seen = self.text_rows_seen or not self.conversational  # no conversational rows: text in front
        if self.text_rows_seen:
            self.text_lead, self.text_context_ids = self._text_context_ids()

    # ------------------------------------------------------------------------------------------- the teacher's prompt
    def _text_context_ids(self) -> tuple[list[int], list[int]]:
        """The tokenizer's leading special tokens (e.g. BOS) and the context's ids without special tokens."""
        context = self.args.teacher_context
        if not isinstance(context, str):
            raise TypeError(
                "`teacher_context` is a list of messages but the rows' prompts are plain text (or pre-tokenized): a "
                "conversation cannot be put in front of raw text. Give `teacher_context` as text, or use "
                "conversational rows (`messages`, or prompt/completion messages)."
            )
        bare = list(self.tokenizer(text=context, add_special_tokens=False)["input_ids"])
        full = list(self.tokenizer(text=context)["input_ids"])
        lead = next((full[:i] for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), [])
        return lead, bare

    def _conversational_prompts(self) -> dict[tuple[int, ...], list[int]]:
        """Student prompt ids -> teacher prompt ids, for every conversational row of the prepared datasets.

        A collated batch holds token ids only, so the teacher's rendering (which needs the messages) is made here once
        from the tokenized datasets' raw `prompt` column (`SFTTrainer` keeps it) and looked up per row.
        """
        table: dict[tuple[int, ...], list[int]] = {}
        for name, dataset in self.context.prepared_datasets():
            if dataset is None:
                continue
            columns = list(getattr(dataset, "column_names", None) or [])
            first = next(iter(dataset), None) if "prompt" in columns else None
            if first is None or isinstance(first["prompt"], str):
                self.text_rows_seen = True  # plain-text or pre-tokenized rows: the context's ids go in front
                continue
            if not hasattr(dataset, "__len__"):
                raise ValueError(
                    f"The {name} dataset is an IterableDataset of conversational rows: `distill_mode='context'` "
                    "renders each prompt with the context once, before training, which needs a map-style "
                    "`datasets.Dataset`. Materialize it (`Dataset.from_list(list(dataset))`)."
                )
            for index, row in enumerate(dataset):
                key, teacher_ids = self._render_conversational(row, index, name)
                table[key] = teacher_ids
        return table

    def _render_conversational(self, row: Mapping, index: int, name: str) -> tuple[tuple[int, ...], list[int]]:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        start = next((i for i, label in enumerate(labels) if label != -100), len(ids))
        key = tuple(ids[:start])
        tools = row.get("tools")
        kwargs = {"tools": tools, **(row.get("chat_template_kwargs") or {})}
        student = self._render(row["prompt"], kwargs)
        teacher = self._render(with_teacher_context(row["prompt"], self.args.teacher_context), kwargs)
        cut = len(student) - start
        # TRL starts the completion where prompt and prompt + completion tokenize differently: usually right after the
        # rendered prompt (cut = 0), a few tokens earlier when the template renders the end of the prompt otherwise.
        if student[:start] != list(key) or cut < 0 or (cut and teacher[-cut:] != student[-cut:]):
            raise ValueError(
                f"Row {index} of the {name} dataset: its prompt tokens in the tokenized row are not its chat-template "
                "rendering (was it truncated by `max_length`?), so the teacher's prompt cannot be lined up with it. "
                "Raise `max_length` or shorten the prompt."
            )
        return key, teacher[: len(teacher) - cut]

    def _render(self, messages, kwargs) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
        )
        return list(encoded["input_ids"])

    def teacher_prompt_ids(self, prompt_ids: Sequence[int]) -> list[int]:
        """The teacher's prompt for a row whose prompt (every token before its first loss token) is `prompt_ids`."""
        key = tuple(int(i) for i in prompt_ids)
        if key in self.conversational:
            return list(self.conversational[key])
        if not self.text_rows_seen:
            raise ValueError(
                "A batch row's prompt is not one of the conversational prompts of the training / evaluation datasets "
                "the trainer was built with, so its teacher prompt (the prompt's messages rendered with "
                "`teacher_context`) is unknown. Evaluate on the `eval_dataset` given to the trainer."
            )
        lead = self.text_lead
        rest = list(key[len(lead) :]) if list(key[: len(lead)]) == lead else list(key)
        return lead + self.text_context_ids + rest

    def teacher_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> TeacherBatch:
        """The teacher's rows for a right-padded student batch (`(B, T)` tensors) and the aligned positions."""
        rows, offsets = [], []
        for row in range(input_ids.shape[0]):
            length = int(attention_mask[row].sum())
            if not bool(attention_mask[row, :length].all()):
                raise ValueError("`distill_mode='context'` needs right-padded batches (`padding_side='right'`).")
            ids = input_ids[row, :length].tolist()
            in_loss = (labels[row, :length] != -100).nonzero()
            start = int(in_loss[0]) if in_loss.numel() else length
            prompt = self.teacher_prompt_ids(ids[:start])
            rows.append(prompt + ids[start:])
            offsets.append(len(prompt) - start)
        width = max(len(ids) for ids in rows)
        if self.max_positions is not None and width > self.max_positions:
            raise ValueError(
                f"With `teacher_context` in front, a teacher row has {width} tokens, more than the teacher's "
                f"`max_position_embeddings` ({self.max_positions}). Shorten the context or lower `max_length`."
            )
        teacher_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        teacher_mask = torch.zeros_like(teacher_ids)
        for row, ids in enumerate(rows):
            teacher_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            teacher_mask[row, : len(ids)] = 1
        # Position p predicts token p + 1; everything after the prompt is the same token on both sides.
        batch_rows, positions = (labels[:, 1:] != -100).nonzero(as_tuple=True)
        shift = torch.as_tensor(offsets, dtype=torch.long, device=positions.device)[batch_rows]
        return TeacherBatch(teacher_ids, teacher_mask, batch_rows, positions, positions + shift)

    # ---------------------------------------------------------------------------------------------------- the teacher
    def teacher_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states `(B, T, H)` for its rows, without gradients, in eval mode."""
        _, backbone = lm_head_and_backbone(self.teacher)
        device = next(backbone.parameters()).device
        kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "use_cache": False}
        if self.adapters_off:  # the student's own weights with its adapters switched off: the base model
            with eval_mode(self.teacher), self.teacher.disable_adapter():
                return backbone(**kwargs).last_hidden_state
        with eval_mode(self.teacher):
            return backbone(**kwargs).last_hidden_state

    def teacher_head(self) -> torch.nn.Module:
        head, _ = lm_head_and_backbone(self.teacher)
        if self.adapters_off:  # a head wrapped by PEFT (LoRA on it, or `modules_to_save`): the base model's own
            head = getattr(head, "original_module", None) or getattr(head, "base_layer", None) or head
        return head

    def refresh_teacher(self) -> None:
        """Copy the student's current weights into the frozen-copy teacher (`teacher_update_steps`)."""
        with torch.no_grad():
            self.teacher.load_state_dict(self.context.student.state_dict())

    def callbacks(self) -> list[TrainerCallback]:
        if self.args.teacher_update_steps is None:
            return []
        return [TeacherRefresh(self, self.args.teacher_update_steps)]

    # ---------------------------------------------------------------------------------------------------- the loss
    def compute_loss(self, model, inputs, num_items_in_batch):
        labels = inputs["labels"]
        if "attention_mask" not in inputs:
            raise ValueError(
                "`distill_mode='context'` needs padded batches with an `attention_mask`: set `padding_free=False`."
            )
        aligned = self.teacher_batch(inputs["input_ids"].cpu(), inputs["attention_mask"].cpu(), labels.cpu())
        teacher_hidden = self.teacher_hidden_states(aligned.input_ids, aligned.attention_mask)

        batch = model_inputs(inputs)
        batch["use_cache"] = False
        outputs = model(**batch, output_hidden_states=True, logits_to_keep=1)  # the student: no context
        student_hidden = outputs.hidden_states[-1]
        device = student_hidden.device
        student_head, teacher_head = lm_head_and_backbone(model)[0], self.teacher_head()
        rows, positions = aligned.rows.to(device), aligned.student_positions.to(device)
        teacher_paired = teacher_hidden[aligned.rows.to(teacher_hidden.device),
                                        aligned.teacher_positions.to(teacher_hidden.device)].to(device)  # fmt: skip

        def loss_of(hidden):  # reads the heads' weights when called (`call_with_lm_heads`)
            return linear_distillation_loss(
                hidden,
                student_head.weight,
                teacher_paired,
                teacher_head.weight.to(device),
                student_bias=getattr(student_head, "bias", None),
                teacher_bias=getattr(teacher_head, "bias", None),
                labels=labels.to(device)[rows, positions + 1],
                **self.kd_loss_settings(num_items_in_batch),
            )

        teacher_head_arg = None if teacher_head is student_head else teacher_head
        result = call_with_lm_heads(loss_of, student_hidden[rows, positions], student_head, teacher_head_arg)
        extra = int(aligned.attention_mask.sum()) - int(inputs["attention_mask"].sum())  # the contexts' tokens
        metrics = {"kd_loss": result.kd_loss, "ce_loss": result.ce_loss, "kd_tokens": result.num_tokens,
                   "context_tokens": torch.tensor(extra / max(labels.shape[0], 1), device=device)}  # fmt: skip
        return result.loss, metrics


class TeacherRefresh(TrainerCallback):
    """Copies the student into its frozen-copy teacher every `every` optimizer steps (`teacher_update_steps`)."""

    def __init__(self, mode: ContextDistillMode, every: int):
        self.mode, self.every = mode, every

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the teacher is the student at the last refresh, i.e. the checkpoint's
            if state.global_step % self.every:
                warnings.warn(
                    f"Resuming at step {state.global_step}, not a multiple of `teacher_update_steps={self.every}`: "
                    "the teacher is refreshed from the checkpoint's student, which is newer than the one it had at "
                    "that step. Save checkpoints at multiples of `teacher_update_steps` for an exact resume.",
                    UserWarning,
                    stacklevel=2,
                )
            self.mode.refresh_teacher()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.mode.refresh_teacher()
            logger.info("Step %d: context-distillation teacher refreshed from the student.", state.global_step)


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
