"""Depth pruning of a decoder-only model: score its layers on calibration text, keep the most useful ones.

The usual way to get a student that starts close to its teacher is to cut the teacher itself: drop whole decoder
layers, then distill from the original ("prune, then distill", [Minitron](https://huggingface.co/papers/2407.14679)). Which
layers to drop follows [ShortGPT](https://huggingface.co/papers/2403.03853): a layer whose output hidden state points
the same way as its input changes little, so its *block influence* `1 - cos(h_in, h_out)`, averaged over the real
(non-padding) tokens of some calibration text, ranks it for removal.

```python
from trl_distill.pruning import calibration_batches, depth_prune, score_layers, select_layers

scores = score_layers(model, calibration_batches(tokenizer, texts, max_length=128))  # (num_layers,)
# or score_layers_by_kl(model, batches): the KL each single-layer removal causes (num_layers + 1 forwards per batch)
keep = select_layers(scores, num_keep=20)  # first and last layers always kept
student = depth_prune(copy.deepcopy(model), keep)  # student layer i is teacher layer keep[i]
```

Supported: decoders whose `model.get_decoder().layers` is the stack of layers and whose config has
`num_hidden_layers` (Llama, Qwen2, Mistral, Gemma, Gemma3 with its per-layer `layer_types`, ...).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Sequence
from typing import Any


__all__ = [
    "calibration_batches",
    "decoder_layers",
    "depth_prune",
    "score_layers",
    "score_layers_by_kl",
    "select_layers",
]


def decoder_layers(model) -> Any:
    """The `torch.nn.ModuleList` of decoder layers of a causal LM (`model.get_decoder().layers`)."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(
            f"`model` ({type(model).__name__}) has no `get_decoder().layers` ModuleList: depth pruning supports "
            "decoder-only models such as Llama, Qwen2 and Gemma3."
        )
    return layers


def depth_prune(model, keep_layers: Sequence[int]):
    """
    Keep only the decoder layers `keep_layers` of `model` (in place) and return it.

    The kept layers keep their weights and their order; every module's `layer_idx` (attention caches index their
    key/value states by it) is renumbered `0..len(keep_layers)-1`, `config.num_hidden_layers` is updated and a
    per-layer list `config.layer_types` (Gemma3's sliding/full attention pattern) is cut to the kept layers, so the model saves
    with `save_pretrained`, reloads with `from_pretrained` and generates with a KV cache. Student layer `i` is teacher
    layer `keep_layers[i]`: keep that list to map layers for feature distillation.

    Args:
        model (`transformers.PreTrainedModel`): A decoder-only causal LM.
        keep_layers (`Sequence[int]`): Strictly increasing layer indices in `[0, num_hidden_layers)`, at least one.

    Returns:
        The same `model` object, pruned. Deep-copy first to keep the original.
    """
    import torch

    layers = decoder_layers(model)
    num_layers = len(layers)
    keep = list(keep_layers)
    if not keep or any(not isinstance(i, int) or isinstance(i, bool) for i in keep):
        raise ValueError(f"`keep_layers` must be a non-empty sequence of ints, got {keep_layers!r}.")
    if any(b <= a for a, b in itertools.pairwise(keep)) or keep[0] < 0 or keep[-1] >= num_layers:
        raise ValueError(
            f"`keep_layers` must be strictly increasing indices in [0, {num_layers}), got {keep}; sort and "
            "deduplicate it (e.g. `sorted(set(keep_layers))`)."
        )
    kept = [layers[i] for i in keep]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    model.get_decoder().layers = torch.nn.ModuleList(kept)
    for config in {id(c): c for c in (model.config, getattr(model.get_decoder(), "config", model.config))}.values():
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            if len(layer_types) != num_layers:
                raise ValueError(
                    f"`config.layer_types` has {len(layer_types)} entries for {num_layers} layers; cannot cut it."
                )
            config.layer_types = [layer_types[i] for i in keep]
        config.num_hidden_layers = len(keep)
    return model


def calibration_batches(tokenizer, texts: Iterable[str], *, batch_size: int = 4, max_length: int = 128) -> list[dict]:
    """
    Tokenize `texts` into padded batches (`input_ids`, `attention_mask`) for [`score_layers`].

    Args:
        tokenizer: The model's tokenizer (needs a pad token; its eos token is used when it has none).
        texts (`Iterable[str]`): Calibration text, e.g. a few dozen paragraphs like the training data.
        batch_size (`int`, *optional*, defaults to `4`): Rows per batch.
        max_length (`int`, *optional*, defaults to `128`): Truncation length in tokens.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("`texts` is empty: give a few paragraphs of calibration text.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), batch_size):
        rows = texts[start : start + batch_size]
        encoded = tokenizer(rows, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append(dict(encoded))
    return batches


def score_layers(model, batches: Iterable[dict]):
    """
    ShortGPT block influence of every decoder layer: `1 - cos(h_in, h_out)` averaged over non-padding tokens.

    `h_in` is the hidden state entering the layer and `h_out` the one leaving it (residual stream, shape
    `(batch, seq, hidden)`), captured with forward hooks, so no final norm is mixed in. Computed in float32 without
    gradients; the model is put in eval mode for the measurement and restored.

    Args:
        model (`transformers.PreTrainedModel`): A decoder-only causal LM.
        batches (`Iterable[dict]`): Batches with `input_ids` `(batch, seq)` and optionally `attention_mask` (padding
            positions, mask 0, are left out of the average), e.g. from [`calibration_batches`].

    Returns:
        `torch.Tensor` of shape `(num_layers,)`, float64: higher means the layer changes its input more (keep it).
    """
    import torch
    import torch.nn.functional as F

    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}

    def pre_hook(index):
        def hook(module, args, kwargs):
            captured[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            h_out = output[0] if isinstance(output, tuple) else output
            h_in = captured.pop(index)
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (batch, seq)
            sums[index] += (1.0 - cos.double())[mask_holder["mask"]].sum()

        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(index), with_kwargs=True))
    with _measuring(model, handles):
        for input_ids, attention_mask in _on_device(model, batches):
            mask_holder["mask"] = attention_mask.bool()
            count += int(attention_mask.sum())
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if count == 0:
        raise ValueError("`batches` held no (non-padding) tokens to score the layers on.")
    return sums / count


def score_layers_by_kl(model, batches: Iterable[dict]):
    """
    The KL divergence each single-layer removal causes: `KL(p_full ‖ p_without_layer_i)` per token, averaged.

    For every decoder layer `i`, the model is run with that layer skipped (its output replaced by its input, the
    residual stream passing through unchanged, which is what `depth_prune` without layer `i` computes) and the
    forward KL from the full model's next-token distribution, `Σ_v p(v) (log p(v) - log q_i(v))`, is averaged over the
    non-padding positions of `batches`. A direct measure of what removing one layer costs (ShortGPT's cosine is a
    cheaper proxy); `num_layers + 1` forwards per batch, in float32 without gradients, the model in eval mode.

    Args:
        model (`transformers.PreTrainedModel`): A decoder-only causal LM.
        batches (`Iterable[dict]`): Batches with `input_ids` `(batch, seq)` and optionally `attention_mask`, e.g. from
            [`calibration_batches`].

    Returns:
        `torch.Tensor` of shape `(num_layers,)`, float64, nats per token: higher means removing the layer costs more
        (keep it), so it goes to [`select_layers`] like [`score_layers`]'s output.
    """
    import torch
    import torch.nn.functional as F

    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    skipped: dict[str, int | None] = {"index": None}

    def skip_hook(index):
        def hook(module, args, kwargs, output):
            if skipped["index"] != index:
                return None
            h_in = args[0] if args else kwargs["hidden_states"]
            return (h_in, *output[1:]) if isinstance(output, tuple) else h_in

        return hook

    handles = [layer.register_forward_hook(skip_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with _measuring(model, handles):
        for input_ids, attention_mask in _on_device(model, batches):
            count += int(attention_mask.bool().sum())
            skipped["index"] = None
            full = _log_probs(model, input_ids, attention_mask)
            for index in range(len(layers)):
                skipped["index"] = index
                # kl_div(input=log q, target=log p, log_target=True) = p (log p - log q), 0 where p underflows
                log_q = _log_probs(model, input_ids, attention_mask)
                kl = F.kl_div(log_q, full, reduction="none", log_target=True).sum(-1)
                sums[index] += kl.double().sum()
    if count == 0:
        raise ValueError("`batches` held no (non-padding) tokens to score the layers on.")
    return sums / count


@contextlib.contextmanager
def _measuring(model, handles):
    """Eval mode and no gradients for a measurement; afterwards the hooks (`handles`) are removed and the mode
    restored, whatever happens."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _on_device(model, batches: Iterable[dict]):
    """`(input_ids, attention_mask)` of each batch on the model's device (an all-ones mask when a batch has none)."""
    import torch

    device = next(model.parameters()).device
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch.get("attention_mask")
        yield input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)


def _log_probs(model, input_ids, attention_mask):
    """Float32 next-token log-probabilities at the non-padding positions: `(tokens, vocab)`."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return F.log_softmax(logits[attention_mask.bool()].float(), dim=-1)


def select_layers(scores, num_keep: int, *, keep_first: int = 1, keep_last: int = 1) -> list[int]:
    """
    The `num_keep` layers to keep: the first `keep_first` and last `keep_last` always, then the highest `scores`.

    The first layers build the representation every later layer reads (and, in SmolLM2, the massive activation at the
    first position) and the last one writes what the LM head reads: ShortGPT and Minitron both find them the worst
    to drop, so they are protected whatever their score.

    Args:
        scores (`Sequence[float]` or `torch.Tensor`): One importance score per layer, higher = more important (e.g.
            [`score_layers`]).
        num_keep (`int`): Layers to keep, `keep_first + keep_last <= num_keep <= len(scores)`.
        keep_first, keep_last (`int`, *optional*, default to `1`): Layers at each end kept unconditionally.

    Returns:
        `list[int]`: sorted layer indices, ready for [`depth_prune`]. Ties go to the earlier layer.
    """
    scores = [float(s) for s in scores]
    num_layers = len(scores)
    if keep_first < 0 or keep_last < 0:
        raise ValueError(f"`keep_first` and `keep_last` must be >= 0, got {keep_first} and {keep_last}.")
    if not isinstance(num_keep, int) or not keep_first + keep_last <= num_keep <= num_layers or num_keep < 1:
        raise ValueError(
            f"`num_keep` must be an int in [{max(1, keep_first + keep_last)}, {num_layers}] (the protected first/last "
            f"layers up to all {num_layers} scored layers), got {num_keep!r}."
        )
    protected = set(range(keep_first)) | set(range(num_layers - keep_last, num_layers))
    middle = sorted((i for i in range(num_layers) if i not in protected), key=lambda i: (-scores[i], i))
    return sorted(protected | set(middle[: num_keep - len(protected)]))
