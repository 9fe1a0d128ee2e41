"""`DistillTrainer`: TRL's `SFTTrainer` with a teacher. Wiring only; the math lives in `losses`, the modes in `modes`."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments
from trl import SFTConfig, SFTTrainer

from .alignment import shared_vocab_size
from .artifact import push_offline_error, save_artifact, upload_error, write_trainer_model_card
from .callbacks import add_heldout_callback
from .config import DistillConfig
from .conversation import as_prompt_completion
from .modes import MetricsSink, ModeContext, resolve_mode
from .receipt import check_signing_key
from .sources import CompletionSource, check_prompt_column
from .teachers import lm_head_and_backbone, load_teacher, teacher_tokenizer_source
from .teachers.store import tokenization_settings
from .terms import build_feature_term


logger = logging.getLogger(__name__)


class DistillTrainer(SFTTrainer):
    r"""
    Distill a teacher language model into a student: a drop-in replacement for [`~trl.SFTTrainer`].

    Everything `SFTTrainer` does is kept (dataset formats: language modeling, prompt-completion and conversational,
    `messages` rows being split at their final assistant turn, see `trl_distill.conversation`;
    `completion_only_loss` / `assistant_only_loss`, packing, PEFT, gradient accumulation, checkpoints, `report_to`);
    the SFT cross-entropy is replaced by the distillation loss of `args.distill_mode` (default `"token"`:
    `alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE` on the response tokens, computed chunk by chunk from
    hidden states so that no `(B, T, V)` logits are held).

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or `PeftModel`):
            The student, or its Hub id / local path.
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The teacher, or its Hub id / local path. Defaults to `args.teacher_model_name_or_path`. It runs in eval mode
            under `torch.no_grad` and is never updated or saved. With `args.teacher_cache` (an offline store of its
            top-k) no teacher is loaded and this must be `None`.
        args ([`DistillConfig`], *optional*):
            Configuration. An `SFTConfig`/`TrainingArguments` is converted (with the distillation defaults).
        teacher_processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The teacher's tokenizer, used to check that the vocabularies match. Loaded from the teacher's path when
            omitted; when the teacher is an in-memory model with no path, it is assumed to share the student's.
        data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks, optimizers,
        optimizer_cls_and_kwargs, preprocess_logits_for_metrics, peft_config, formatting_func:
            As in [`~trl.SFTTrainer`].

    Raises:
        ValueError: `teacher and student tokenizers must share a vocabulary for token-level KD` when the tokenizers
            differ (the message names cross-tokenizer ULD and sequence-level KD as alternatives).
    """

    _tag_names = ["trl", "sft", "distillation", "trl-distill"]
    _name = "Distill"
    _paper = {
        "title": "Distilling the Knowledge in a Neural Network",
        "id": "1503.02531",
        "citation": (
            "@article{hinton2015distilling,\n    title  = {{Distilling the Knowledge in a Neural Network}},\n"
            "    author = {Geoffrey Hinton and Oriol Vinyals and Jeff Dean},\n    year   = 2015,\n"
            "    eprint = {arXiv:1503.02531}\n}"
        ),
    }
    # `compute_loss` already normalizes for gradient accumulation (see `_scale_for_accumulation`).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: str | nn.Module,
        teacher_model: str | nn.Module | None = None,
        args: DistillConfig | SFTConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config=None,
        formatting_func: Callable | None = None,
    ):
        # The order below is forced by what each step needs; each step says what it must come before.
        # 1. Config and mode class: a wrong mode or setting fails before anything is loaded.
        args = _as_distill_config(args, model)
        if args.receipt_signing_key:  # a bad key must fail now, not after training when the receipt is signed
            check_signing_key(args.receipt_signing_key)
        if args.teacher_cache is not None and teacher_model is not None:
            raise ValueError(
                "`teacher_cache` replaces the teacher: its targets are read from the store, so `teacher_model` must "
                "not be given (got one). Pass `teacher_model=None`, or unset `teacher_cache` to distill from the live "
                "teacher."
            )
        # The teacher *source*: a live model, or (`teacher_cache`) the mode's offline variant reading a store.
        mode_cls = resolve_mode(args)

        # 2. Teacher and its tokenizer, before the dataset is tokenized (a wrong teacher or vocabulary fails fast).
        teacher, teacher_source, teacher_tokenizer, vocab_size = _load_teacher_side(
            mode_cls, args, teacher_model, teacher_processing_class, processing_class
        )

        # 3. Raw rows, before `SFTTrainer` tokenizes them. Conversational rows (issue 12, trl_distill/conversation.py):
        # `messages` -> prompt/completion split at the final assistant turn, the one rule every mode and the held-out
        # measurement follow. Then modes that train on other targets (sequence-level KD: the teacher's completions)
        # rewrite them; on-policy / `seq_kd` training needs prompts to generate from.
        if formatting_func is None:
            train_dataset, eval_dataset = as_prompt_completion(train_dataset), as_prompt_completion(eval_dataset)
        train_dataset = mode_cls.prepare_train_dataset(
            train_dataset,
            teacher=teacher,
            teacher_source=teacher_source,
            args=args,
            teacher_tokenizer=teacher_tokenizer if teacher_tokenizer is not None else processing_class,
        )
        check_prompt_column(train_dataset, args)

        # 4. SFTTrainer: loads/wraps the student (PEFT), tokenizes the datasets, builds the accelerator.
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )

        # 5. Vocabulary (the student's tokenizer may only exist now) and lm_head checks; the teacher placed like the
        # student (needs the accelerator).
        student_tokenizer = _text_tokenizer(self.processing_class)
        self.teacher_processing_class = teacher_tokenizer if teacher_tokenizer is not None else student_tokenizer
        if not mode_cls.requires_shared_vocab:
            vocab_size = len(student_tokenizer)  # the student's own vocabulary; the teacher's is its own business
        elif vocab_size is None:  # the student's tokenizer was loaded by SFTTrainer: compare now
            vocab_size = shared_vocab_size(student_tokenizer, _text_tokenizer(self.teacher_processing_class))
        self.vocab_size = vocab_size
        _check_lm_head_rows(self.model, "student", self.vocab_size)
        if teacher is not None and mode_cls.requires_shared_vocab:
            _check_lm_head_rows(teacher, "teacher", self.vocab_size)
        self.teacher_model = self._prepare_teacher(teacher) if teacher is not None else None

        # 6. Extra terms (feature KD, issue 5): need the placed student and teacher; trained beside the student, never
        # part of it (terms/feature.py). Before the mode, which receives them.
        self.feature_term = build_feature_term(
            args,
            self.model,
            self.teacher_model,
            sharded=self.is_deepspeed_enabled or self.is_fsdp_enabled,
            add_callback=self.add_callback,
        )

        # 7. The mode, from what it may read (never the trainer itself).
        self.metrics_sink = MetricsSink(self._metrics)
        self.mode_context = ModeContext(
            args=args,
            student=self.model,
            teacher=self.teacher_model,
            tokenizer=student_tokenizer,
            teacher_tokenizer=_text_tokenizer(self.teacher_processing_class),
            vocab_size=self.vocab_size,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            tokenization=tokenization_settings(self),
            metrics=self.metrics_sink,
            feature_term=self.feature_term,
        )
        self.distill_mode = mode_cls(self.mode_context)

        # 8. Callbacks and the completion source, which read the placed teacher and the prepared datasets.
        add_heldout_callback(self)  # held-out KL / perplexity at each evaluation and at the end (`heldout_eval`)
        self.completion_source = None
        if args.lmbda > 0 or args.seq_kd:  # where the samples come from (sources/): on-policy / fresh teacher text
            self.completion_source = CompletionSource(
                args,
                tokenizer=student_tokenizer,
                teacher=self.teacher_model,
                accelerator=self.accelerator,
                metrics=self.metrics_sink,
            )

    @property
    def feature_projector(self):
        """The feature-KD projections (`None` when `feature_weight == 0`)."""
        return self.feature_term.projector if self.feature_term is not None else None

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Place the teacher like the student, for inference only (no DDP wrapper, no optimizer state)."""
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # Feature-KD projections: in the optimizer, in checkpoints and beside the exported student (terms/feature.py).
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.feature_term is not None:
            self.feature_term.add_param_groups(optimizer, weight_decay=self.args.weight_decay)
        return optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.feature_term is not None:
            self.feature_term.resume(resume_from_checkpoint)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.completion_source is None:
            return batches, num_items_in_batch
        resampled = self.completion_source.resample(batches, step=self.state.global_step, student=self.model_wrapped)
        if resampled is batches:  # a dataset step: the count stands (recounting would cost another all-reduce)
            return batches, num_items_in_batch
        # On-policy / `seq_kd` steps swap in generated completions; recount the window's tokens on the new batches.
        return super().get_batch_samples(iter(resampled), len(batches), device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        loss, metrics = self.distill_mode.compute_loss(model, inputs, num_items_in_batch)
        if self.model.training:
            loss = self._scale_for_accumulation(loss, num_items_in_batch)
        self._log_batch_metrics(mode, inputs, metrics)
        if return_outputs:
            # Only for `compute_metrics` / `preprocess_logits_for_metrics`, which need the student's full logits.
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k not in ("labels", "seq_lengths")})
            return loss, outputs
        return loss

    def _scale_for_accumulation(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Make accumulated micro-batches (and DDP's gradient averaging) give the gradient of one big batch."""
        if self.args.loss_reduction == "sum":
            # DDP averages gradients over ranks; a sum over the global batch needs them added.
            return loss * self.accelerator.num_processes
        if num_items_in_batch is None:
            # Each micro-batch is a local mean: average them over the accumulation steps.
            return loss / getattr(self, "current_gradient_accumulation_steps", 1)
        if self.args.average_tokens_across_devices:
            # `num_items_in_batch` counts the tokens of every rank, and DDP averages the gradients across ranks.
            return loss * self.accelerator.num_processes
        return loss

    def _log_batch_metrics(self, mode: str, inputs: dict, metrics: dict[str, torch.Tensor]) -> None:
        # One gather and one device sync per step for all metrics, not one per metric.
        names = list(metrics)
        values = torch.stack(
            [torch.as_tensor(metrics[n], dtype=torch.float32, device=self.accelerator.device).detach() for n in names]
        )
        gathered = self.accelerator.gather_for_metrics(values.unsqueeze(0)).reshape(-1, len(names)).mean(0).tolist()
        self.metrics_sink.log(dict(zip(names, gathered)), split=mode)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free batches carry position ids instead of a mask
                local = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(local.reshape(1)).sum().item())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    # Receipt, model card and Hub (issue 7): `artifact` holds the logic (it writes; `provenance`, `receipt` and
    # `model_card` describe, hash and render).
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        # Feature KD: the projections beside the student, never inside it (before the receipt hashes the files).
        if self.feature_term is not None and self.args.should_save:
            self.feature_term.save(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save and not getattr(self, "_saving_checkpoint", False):
            save_artifact(self, output_dir if output_dir is not None else self.args.output_dir)

    def _save_checkpoint(self, model, trial):
        self._saving_checkpoint = True  # a checkpoint is resume state, not an artifact: no receipt in it
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        if self.is_world_process_zero():
            write_trainer_model_card(self, self.args.output_dir, model_name=model_name, tags=tags)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """Save the artifact (weights, card, `distill_receipt.json`), then upload it (as `Trainer.push_to_hub`).

        The save comes first, so an unreachable Hub loses nothing: offline mode raises `OfflineModeIsEnabled` and a
        failed upload raises [`~trl_distill.artifact.HubUploadError`], both naming the directory that holds the model.
        """
        output_dir = self.args.output_dir
        self.save_model(
            _internal_call=True
        )  # before anything touches the network (transformers creates the repo first)
        generations = os.path.join(output_dir, "teacher_generations")
        if os.path.isdir(generations):
            raise ValueError(
                f"{generations!r} holds the teacher-generation cache of sequence-level KD (training targets, not "
                "part of the model) and would be uploaded with it. Move it out of `output_dir` (and set "
                f"`teacher_generation_cache_dir` elsewhere), then push again; the model is saved in {output_dir!r}."
            )
        error = push_offline_error(output_dir)
        if error is not None:
            raise error
        try:
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, **kwargs)
        except Exception as failure:  # any network/Hub error: say where the saved artifact is
            repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
            raise upload_error(output_dir, repo_id, failure) from failure


def _as_distill_config(args, model) -> DistillConfig:
    if args is None:
        name = (
            model
            if isinstance(model, str)
            else getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        )
        return DistillConfig(output_dir=f"{name.rstrip('/').split('/')[-1]}-Distill")
    if isinstance(args, DistillConfig):
        return args
    if isinstance(args, TrainingArguments):
        logger.warning(
            "`args` is a %s, not a `DistillConfig`: converting it with the default distillation settings "
            "(objective='forward_kl', kd_temperature=2.0, alpha=0.9).",
            type(args).__name__,
        )
        # Read the fields directly: `to_dict()` masks every `*_token` field (e.g. `eos_token`) with a placeholder.
        ours = {f.name for f in dataclasses.fields(DistillConfig) if f.init}
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in ours}
        return DistillConfig(**values)
    raise TypeError(f"`args` must be a `DistillConfig`, got {type(args).__name__}.")


def _load_teacher_side(mode_cls, args, teacher_model, teacher_processing_class, processing_class):
    """`(teacher, teacher_source, teacher_tokenizer, vocab_size)` before `SFTTrainer` runs.

    `vocab_size` is the shared vocabulary when the mode needs one and both tokenizers are known already, else `None`
    (computed once `SFTTrainer` has loaded the student's tokenizer).
    """
    if args.teacher_cache is None:
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
    if teacher_model is None and mode_cls.requires_teacher:
        raise ValueError(
            f"`distill_mode={args.distill_mode!r}` needs a teacher: pass `teacher_model` (a model or a Hub id / "
            "local path) or set `teacher_model_name_or_path` in the config."
        )
    distributed = args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED")
    teacher, teacher_source = None, None
    if teacher_model is not None:
        teacher, teacher_source = load_teacher(
            teacher_model,
            args.teacher_model_init_kwargs,
            trust_remote_code=args.trust_remote_code,
            distributed=distributed,
        )
    teacher_tokenizer = teacher_processing_class
    if teacher_tokenizer is None and teacher is not None:
        teacher_tokenizer = _load_teacher_tokenizer(teacher_source, args, from_string=isinstance(teacher_model, str))
    vocab_size = None
    if mode_cls.requires_shared_vocab and processing_class is not None and teacher_tokenizer is not None:
        vocab_size = shared_vocab_size(_text_tokenizer(processing_class), _text_tokenizer(teacher_tokenizer))
    return teacher, teacher_source, teacher_tokenizer, vocab_size


def _text_tokenizer(processing_class):
    """The tokenizer inside a processor (vision-language models), or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def _load_teacher_tokenizer(source: str | None, args: DistillConfig, *, from_string: bool):
    path = teacher_tokenizer_source(source)
    if path is None:
        logger.warning(
            "The teacher has no path to load its tokenizer from; assuming it shares the student's vocabulary. Pass "
            "`teacher_processing_class` to have the vocabularies checked."
        )
        return None
    revision = (args.teacher_model_init_kwargs or {}).get("revision")
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:
        if from_string:
            raise ValueError(
                f"Could not load the teacher's tokenizer from {path!r} ({error}). Pass `teacher_processing_class`."
            ) from error
        logger.warning(
            "Could not load the teacher's tokenizer from %r (%s); assuming it shares the student's vocabulary. Pass "
            "`teacher_processing_class` to have the vocabularies checked.",
            path,
            error,
        )
        return None


def _check_lm_head_rows(model: nn.Module, role: str, vocab_size: int) -> None:
    head, _ = lm_head_and_backbone(model)
    rows = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # DeepSpeed ZeRO-3 keeps the full shape aside
    if rows < vocab_size:
        raise ValueError(
            f"The {role}'s lm_head has {rows} rows but the tokenizer has {vocab_size} tokens. Resize its embeddings "
            "(`model.resize_token_embeddings(len(tokenizer))`) or use the matching tokenizer."
        )
