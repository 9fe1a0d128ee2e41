"""Loading a live teacher and reaching the parts the chunked loss needs (backbone and `lm_head`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..inference import unwrap_model


logger = logging.getLogger(__name__)
_T = TypeVar("_T")


def _init_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(kwargs or {})
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(
                f"`teacher_model_init_kwargs['dtype']` must be a torch dtype name or 'auto', got {dtype!r}."
            )
        kwargs["dtype"] = getattr(torch, dtype)
    return kwargs


def load_teacher(
    teacher: str | nn.Module,
    init_kwargs: dict[str, Any] | None = None,
    *,
    trust_remote_code: bool = False,
    distributed: bool = False,
) -> tuple[nn.Module, str | None]:
    """Return the teacher in eval mode with gradients off, and the id/path it came from (for its tokenizer).

    Args:
        teacher (`str` or `PreTrainedModel`): a Hub id / local directory, or an instantiated model (or `PeftModel`).
        init_kwargs (`dict`, *optional*): `from_pretrained` keyword arguments (a `dtype` string is converted).
        trust_remote_code (`bool`): forwarded to `from_pretrained`.
        distributed (`bool`): under DDP/DeepSpeed, `device_map` must stay unset.
    """
    if isinstance(teacher, str):
        kwargs = _init_kwargs(init_kwargs)
        kwargs.setdefault("trust_remote_code", trust_remote_code)
        if distributed:
            kwargs["device_map"] = None
        model = AutoModelForCausalLM.from_pretrained(teacher, **kwargs)
        source = teacher
    elif isinstance(teacher, nn.Module):
        if init_kwargs:
            logger.warning("`teacher_model_init_kwargs` is ignored: the teacher is already instantiated.")
        model = teacher
        source = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    else:
        raise TypeError(
            f"`teacher_model` must be a model id/path (str) or a `PreTrainedModel`, got {type(teacher).__name__}."
        )
    model.eval()
    model.requires_grad_(False)
    return model, source


def teacher_tokenizer_source(source: str | None) -> str | None:
    """The path/id to load the teacher's tokenizer from, or None when there is nothing to load from."""
    if not source:
        return None
    if os.path.isdir(source):
        return (
            source
            if any(
                os.path.exists(os.path.join(source, name))
                for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
            )
            else None
        )
    # A Hub id (namespace/name or name); an absolute path that does not exist is not one.
    return None if os.path.isabs(source) else source


def lm_head_and_backbone(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The output projection and the backbone (the module returning `last_hidden_state`) of a causal LM.

    Looks through DDP/accelerate wrappers and PEFT; with LoRA the adapters stay inside the backbone's layers, so the
    backbone's output carries them.
    """
    inner = unwrap_model(model)
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"Expected a transformers causal LM, got {type(inner).__name__}.")
    head = inner.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(inner).__name__} has no output embeddings (`lm_head`); token-level KD needs one.")
    backbone = getattr(inner, inner.base_model_prefix, None)
    if backbone is None or backbone is inner:
        raise ValueError(
            f"Cannot find the backbone of {type(inner).__name__} (attribute {inner.base_model_prefix!r})."
        )
    return head, backbone


def call_with_lm_heads(
    loss_fn: Callable[[torch.Tensor], _T],
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module | None = None,
) -> _T:
    """`loss_fn(student_hidden)` for a loss that projects hidden states with the `lm_head` weights itself.

    `loss_fn` must read `student_head.weight` / `.bias` (and the teacher's) inside, when it is called. Without
    DeepSpeed ZeRO-3 this is a plain call. Under ZeRO-3 every parameter is a shard (`numel 0` on most ranks) that only
    the owning module's hooks gather, and the chunked losses read the weight without calling the module, so:

    - the teacher's head is all-gathered for the call (`deepspeed.zero.GatheredParameters`, `modifier_rank=None`:
      nobody changes it; every rank re-partitions it on exit);
    - `loss_fn` runs *as the forward of the student's `lm_head`*, so ZeRO-3's module hooks handle it like the head's
      own forward: they gather the weight and bias before the call and release them after, and in the backward they
      gather them again, before the gradient that `loss_fn` computed reaches them, and release them once the gradient
      of `student_hidden` is through. Gathering the student's head only around the call is not enough: its gradient
      would then be accumulated into a partitioned parameter, whose `(0,)` shape autograd refuses.

    The gathered parameters' gradients are reduce-scattered by ZeRO-3 as usual.

    Args:
        loss_fn (`Callable[[torch.Tensor], Any]`): computes the loss from the hidden states it is given (use that
            argument, not `student_hidden` from the enclosing scope: under ZeRO-3 the hooks hand a tracked copy).
        student_hidden (`torch.Tensor`): the student's hidden states the loss projects (gradients flow here).
        student_head, teacher_head (`nn.Module`): the output projections, e.g. from [`lm_head_and_backbone`].
    """
    with _gathered(teacher_head):
        if not _is_zero3_param(getattr(student_head, "weight", None)):
            return loss_fn(student_hidden)
        had_own_forward = "forward" in student_head.__dict__
        own_forward = student_head.__dict__.get("forward")
        student_head.forward = loss_fn  # the instance attribute shadows the class's forward for this call only
        try:
            return student_head(student_hidden)
        finally:
            if had_own_forward:
                student_head.forward = own_forward
            else:
                del student_head.forward


@contextmanager
def _gathered(head: nn.Module | None) -> Iterator[None]:
    """All-gather `head.weight` and `head.bias` under ZeRO-3 for reading only; whole parameters are left alone (ZeRO-3
    keeps small "persistent" ones whole, and an outer gather may hold one: gathering it again would raise)."""
    params = [
        param
        for param in (getattr(head, "weight", None), getattr(head, "bias", None))
        if _is_zero3_param(param) and param.ds_status.name != "AVAILABLE"
    ]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _is_zero3_param(param) -> bool:
    return isinstance(param, torch.Tensor) and hasattr(param, "ds_id")  # set on every parameter ZeRO-3 partitions


_LOGIT_MODIFIERS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)


def check_plain_lm_head(model: nn.Module, role: str) -> None:
    """Refuse models whose logits are not `hidden @ lm_head.weight.T (+ bias)` (softcapping, logit scaling).

    The chunked loss projects hidden states itself; silently skipping a model's logit transform would train against
    the wrong distribution.
    """
    head, _ = lm_head_and_backbone(model)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_MODIFIERS:
        value = getattr(text_config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"The {role} model's config sets `{name}={value}`, which changes its logits after the `lm_head`; "
                "token-level KD from hidden states does not support it yet."
            )
