"""The mode registry and the mode interface: what is matched is chosen by name (`DistillConfig.distill_mode`).

The registry is the only way a mode is found: `DistillConfig` validates `distill_mode` against it (and calls the
mode's own config checks), the trainer builds the mode from it, and receipts describe the run with the mode's label
and papers. A mode registered from a user's own code (`@register_mode("mine")`) is therefore usable like the
built-in ones, as long as it is registered before its `DistillConfig` is created.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .context import ModeContext


_MODES: dict[str, type[DistillMode]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class DistillMode(ABC):
    """One way of turning a batch into a distillation loss (*what is matched*).

    Lifecycle, in the order the trainer calls it:

    1. `validate_config(args)` (classmethod), from `DistillConfig.__post_init__`: refuse settings the mode cannot
       honour (errors name the field, the value and the fix).
    2. `for_teacher_cache()` (classmethod), when `args.teacher_cache` is set: the mode that reads the teacher's side
       from an offline store instead of a live teacher (`None`: the mode needs a live teacher).
    3. `prepare_train_dataset(...)` (classmethod), before `SFTTrainer` tokenizes the raw training rows.
    4. `__init__(context)`: once the student, teacher, tokenizers and datasets are ready (a [`ModeContext`]).
    5. `callbacks()`, once, right after: trainer callbacks the mode needs between steps (default: none).
    6. `compute_loss(model, inputs, num_items_in_batch)` at every training and evaluation batch.

    Class attributes:
        name (`str`): Set by [`register_mode`].
        requires_teacher (`bool`): Whether a live teacher model must be given.
        requires_shared_vocab (`bool`): Whether teacher and student must share a vocabulary (token-level logits are
            compared id by id). Modes that compare text or sorted distributions set it to `False`.
        supports_feature_term (`bool`): Whether the mode adds `context.feature_term` (feature KD,
            `feature_weight > 0`) to its loss; the config refuses `feature_weight > 0` otherwise.
        supports_generated_completions (`bool`): Whether the mode can score completions generated during training
            (on-policy `lmbda > 0`, `seq_kd=True`: batches of the student's token ids with the teacher live).
        label (`str`): Human description used by receipts and model cards; see [`describe`].
        papers (`tuple[dict, ...]`): The method's papers, each `{"arxiv": "1503.02531", "title": "..."}`.
    """

    name: ClassVar[str] = ""
    requires_teacher: ClassVar[bool] = True
    requires_shared_vocab: ClassVar[bool] = True
    supports_feature_term: ClassVar[bool] = False
    supports_generated_completions: ClassVar[bool] = False
    label: ClassVar[str] = ""
    papers: ClassVar[tuple[dict[str, str], ...]] = ()

    def __init__(self, context: ModeContext):
        self.context = context
        self.args = context.args

    @classmethod
    def describe(cls, args) -> str:
        """The run's method in words, e.g. `"token-level knowledge distillation (forward_kl)"`.

        The default is `label` (or `"<name> distillation"`); modes whose loss uses `objective` append it.
        """
        return cls.label or f"{cls.name} distillation"

    @classmethod
    def validate_config(cls, args) -> None:
        """Refuse (`ValueError`) or warn about settings this mode cannot honour; called by `DistillConfig`.

        The default checks the shared knobs against the class attributes: `feature_weight > 0` needs
        `supports_feature_term`, `lmbda > 0` / `seq_kd=True` need `supports_generated_completions`, `teacher_cache`
        needs [`for_teacher_cache`]. Overrides add their own checks and call `super().validate_config(args)`.
        """
        if args.feature_weight > 0 and not cls.supports_feature_term:
            supported = [name for name in available_modes() if get_mode(name).supports_feature_term]
            names = " or ".join(f"`distill_mode={name!r}`" for name in supported)
            raise ValueError(
                f"`feature_weight={args.feature_weight}` is supported with {names} only (it needs the teacher run on "
                f"the same token positions), got `distill_mode={cls.name!r}`. Set `feature_weight=0` or use "
                f"{names}."
            )
        if (args.lmbda > 0 or args.seq_kd) and not cls.supports_generated_completions:
            raise ValueError(
                f"`distill_mode={cls.name!r}` cannot score completions generated during training, so `lmbda="
                f"{args.lmbda}` / `seq_kd={args.seq_kd}` are refused. Set `lmbda=0` and `seq_kd=False`, or use "
                "`distill_mode='token'`."
            )
        if args.teacher_cache is not None and _offline_variant(cls, args) is None:
            kind = getattr(args, "teacher_cache_kind", None) or "topk"
            served = [name for name in available_modes() if _offline_variant(get_mode(name), args) is not None]
            raise ValueError(
                f"`distill_mode={cls.name!r}` needs a live teacher and cannot train from `teacher_cache`; offline "
                f"stores serve {served} (`teacher_cache_kind={kind!r}`). Unset `teacher_cache` or use one of those "
                "modes."
            )

    @classmethod
    def for_teacher_cache(cls) -> type[DistillMode] | None:
        """The mode that trains this objective with the teacher's side read from `teacher_cache` (a teacher
        *source*), or `None` when the mode needs a live teacher (e.g. hidden states, or new samples to score)."""
        return None

    @classmethod
    def for_served_teacher(cls) -> type[DistillMode] | None:
        """The mode that trains this objective with the teacher's top-k scored live by a server (`teacher_url`,
        issue 16), or `None` when the mode needs a loaded teacher."""
        return None

    @classmethod
    def for_sampled_teacher_cache(cls) -> type[DistillMode] | None:
        """The mode that trains this objective from a *sampled* store (`teacher_cache_kind="sampled"`: tokens drawn
        from the teacher, Sparse Logit Sampling), or `None` when the mode has no such variant."""
        return None

    @classmethod
    def prepare_train_dataset(cls, dataset, *, teacher, teacher_tokenizer, teacher_source, args):
        """Turn the raw training dataset into the one this mode trains on, before `SFTTrainer` tokenizes it.

        Called once from the trainer's `__init__` (the mode is not built yet); the default returns `dataset` as is.
        `teacher` is the loaded teacher or `None`, `teacher_tokenizer` its tokenizer (else the student's, else
        `None`), `teacher_source` the id/path it came from.
        """
        return dataset

    def kd_loss_settings(self, num_items_in_batch, *, without: tuple[str, ...] = ()) -> dict:
        """The [`~trl_distill.losses.linear_distillation_loss`] keywords that come from the config (divergence,
        temperature, top-k, alpha, vocabulary, reduction, chunking); `without` drops those a loss does not take (the
        stored-teacher losses get `k` from their targets, the sampled one has no `beta`)."""
        args = self.args
        settings = dict(
            objective=args.objective,
            beta=args.beta,
            temperature=args.kd_temperature,
            top_k=args.kd_top_k,
            alpha=args.alpha,
            vocab_size=self.context.vocab_size,
            reduction=args.loss_reduction,
            num_items_in_batch=num_items_in_batch,
            chunk_size=args.kd_chunk_size,
            return_components=True,
        )
        return {key: value for key, value in settings.items() if key not in without}

    def callbacks(self) -> list:
        """`transformers.TrainerCallback`s the trainer adds for this mode, for work between optimizer steps (e.g. context
        distillation's `teacher_update_steps` refresh); the default has none."""
        return []

    @abstractmethod
    def compute_loss(
        self, model: torch.nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the scalar loss to optimize and detached per-batch metrics to log (name -> scalar tensor).

        `model` is the student to run forward on (possibly DDP-wrapped, so that gradient hooks fire); `inputs` a
        collated batch (`labels` -100 outside the loss); `num_items_in_batch` the accumulation window's count of
        tokens in the loss (or `None`), to pass to `reduce_loss` / the losses' `num_items_in_batch`.
        """


def register_mode(name: str) -> Callable[[type[DistillMode]], type[DistillMode]]:
    """Class decorator registering a [`DistillMode`] under `name` (lowercase letters, digits, `_`).

    ```python
    @register_mode("my_mode")
    class MyMode(DistillMode):
        def compute_loss(self, model, inputs, num_items_in_batch): ...

    DistillConfig(output_dir="out", distill_mode="my_mode")
    ```
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"Mode names are lowercase identifiers like 'token' or 'uld', got {name!r}.")

    def decorator(cls: type[DistillMode]) -> type[DistillMode]:
        if not (isinstance(cls, type) and issubclass(cls, DistillMode)):
            raise TypeError(f"`register_mode({name!r})` decorates a DistillMode subclass, got {cls!r}.")
        if name in _MODES and _MODES[name] is not cls:
            raise ValueError(f"A distillation mode named {name!r} is already registered ({_MODES[name].__name__}).")
        cls.name = name
        _MODES[name] = cls
        return cls

    return decorator


def get_mode(name: str) -> type[DistillMode]:
    """The mode class registered under `name`; `ValueError` naming the registered modes otherwise."""
    try:
        return _MODES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown `distill_mode` {name!r}; registered modes: {sorted(_MODES)}. A mode of your own must be "
            "registered (`@trl_distill.register_mode(name)`) before its `DistillConfig` is created."
        ) from None


def available_modes() -> tuple[str, ...]:
    return tuple(sorted(_MODES))


def _offline_variant(mode_cls: type[DistillMode], args: Any) -> type[DistillMode] | None:
    """The mode's variant for `args.teacher_cache`, by the store's kind (`teacher_cache_kind`)."""
    if getattr(args, "teacher_cache_kind", "topk") == "sampled":
        return mode_cls.for_sampled_teacher_cache()
    return mode_cls.for_teacher_cache()


def resolve_mode(args: Any) -> type[DistillMode]:
    """The mode class the trainer builds: `distill_mode`'s, its offline variant when `teacher_cache` is set, or its
    served variant when only `teacher_url` is (live scoring through a vLLM server)."""
    mode_cls = get_mode(args.distill_mode)
    if args.teacher_cache is None and getattr(args, "teacher_url", None) is not None:
        served = mode_cls.for_served_teacher()
        if served is None:  # the config refuses this already
            raise ValueError(f"`distill_mode={mode_cls.name!r}` cannot score through `teacher_url`; unset it.")
        return served
    if args.teacher_cache is None:
        return mode_cls
    offline = _offline_variant(mode_cls, args)
    if offline is None:  # the config refuses this already; a config edited after validation lands here
        mode_cls.validate_config(args)
        raise ValueError(f"`distill_mode={mode_cls.name!r}` cannot train from `teacher_cache`; unset `teacher_cache`.")
    return offline
