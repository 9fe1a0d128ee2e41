"""Quantized students for quantization-aware recovery: bitsandbytes 4-bit (QLoRA) and torchao fake-quantization (QAT).

Both libraries are optional extras (`pip install trl_distill[quant]`) and are imported inside the functions.

- QLoRA recovery: load the student in 4-bit with `BitsAndBytesConfig` and train LoRA adapters with the distillation
  loss, the full-precision model as teacher. On CPUs with avx512-bf16, a `bnb.nn.Linear4bit` repacks its weight during
  any eval / no-grad forward, after which training raises "a view of a leaf Variable that requires grad is being used
  in an in-place operation"; [`disable_bnb_cpu_repack`] turns that path off.
- QAT: [`qat_prepare`] swaps the student's linear layers for fake-quantized ones (torchao `QATConfig`, step
  `"prepare"`), the student is trained with the distillation loss, and [`qat_convert`] turns them into real quantized
  weights. The `lm_head` stays in full precision: the chunked loss reads `lm_head.weight` directly, so a fake quantizer
  on it would be bypassed in training and then applied at conversion.
"""

from __future__ import annotations

import torch
from torch import nn


QAT_SCHEMES = ("int8_dynact_int4_weight", "int4_weight_only")


def disable_bnb_cpu_repack(model: nn.Module) -> int:
    """Turn off bitsandbytes' avx512-bf16 weight repacking on every `Linear4bit` of `model`; return how many.

    Without it, on such CPUs, training after an eval or `torch.no_grad` forward (held-out metrics, `generate`) fails.
    Does nothing (returns 0) when bitsandbytes is not installed or the model has no 4-bit layers.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _base_config(scheme: str, group_size: int):
    """The torchao post-training config a QAT run imitates (and converts to)."""
    if scheme not in QAT_SCHEMES:
        raise ValueError(f"`qat_scheme` must be one of {QAT_SCHEMES}, got {scheme!r}.")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"`qat_group_size` must be a positive int (e.g. 32), got {group_size!r}.")
    try:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError as error:
        raise ImportError("QAT needs torchao: `pip install trl_distill[quant]` (or `pip install torchao`).") from error
    if scheme == "int8_dynact_int4_weight":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def _quantizable(model: nn.Module, group_size: int):
    """Filter for torchao: every `nn.Linear` but the output head, whose input width `group_size` divides."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    too_narrow = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and module.in_features % group_size
    ]
    if too_narrow:
        raise ValueError(
            f"`qat_group_size={group_size}` does not divide the input width of {too_narrow[:3]}: pick a divisor of "
            "the model's hidden and intermediate sizes (e.g. 32)."
        )
    return lambda module, fqn: isinstance(module, nn.Linear) and module is not head


def qat_prepare(model: nn.Module, *, scheme: str = "int8_dynact_int4_weight", group_size: int = 32) -> nn.Module:
    """Swap `model`'s linear layers (not the `lm_head`) for torchao fake-quantized ones, in place; return `model`.

    Args:
        model (`PreTrainedModel`): The full-precision student.
        scheme (`str`, *optional*, defaults to `"int8_dynact_int4_weight"`): `"int8_dynact_int4_weight"` (int8 dynamic
            activations, int4 grouped weights: torchao's `Int8DynamicActivationIntxWeightConfig`) or
            `"int4_weight_only"` (`IntxWeightOnlyConfig`).
        group_size (`int`, *optional*, defaults to `32`): Weights per int4 scale; must divide each layer's input width.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    base = _base_config(scheme, group_size)
    quantize_(model, QATConfig(base, step="prepare"), filter_fn=_quantizable(model, group_size))
    return model


def qat_convert(model: nn.Module, *, scheme: str = "int8_dynact_int4_weight", group_size: int = 32) -> nn.Module:
    """Replace the fake-quantized layers of a [`qat_prepare`]d model by real quantized weights, in place.

    Applied to a model that was never prepared, this is plain post-training quantization with the same scheme (which
    is also how the QAT recipe's saved full-precision weights are turned into the deployed model: the result equals
    the converted model exactly).
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    base = _base_config(scheme, group_size)
    if any(isinstance(module, FakeQuantizedLinear) for module in model.modules()):
        quantize_(model, QATConfig(base, step="convert"), filter_fn=_quantizable(model, group_size))
    else:
        quantize_(model, base, filter_fn=_quantizable(model, group_size))
    return model


def unwrap_fake_quantized(model: nn.Module) -> nn.Module:
    """Put plain `nn.Linear` layers (same weights) back in place of fake-quantized ones, so the model saves as usual."""
    from torchao.quantization.qat import FakeQuantizedLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantizedLinear):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], module.to_linear())
    return model
