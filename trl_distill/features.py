"""Feature (hidden-state) KD beside the logit loss: layer maps, learned projections, and their life with the student.

With `feature_weight > 0`, the token mode adds `feature_weight * L_feat` to its loss, where `L_feat` compares the
student's hidden states, mapped to the teacher's width by one learned projection per layer pair, with the teacher's
(see [`~trl_distill.losses.feature_distillation_loss`]). This module owns everything around that loss:

- the layer map: `parse_layer_map` (the config's forms) and `resolve_layer_map` (indices checked against the models);
- [`FeatureProjector`]: the projections, trained with the student but never part of it;
- the trainer's hooks, each called from a one-line override in `trainer.py`: building the projector, its optimizer
  param group, saving it (checkpoints and the exported student) and restoring it on resume.

Layer `i` means the output of decoder layer `i` (0-based; `hidden_states[i + 1]` of a transformers model, so the last
layer is the final normed hidden state the `lm_head` reads). Negative indices count from the end.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback

from .losses import feature_distillation_loss


if TYPE_CHECKING:
    from .trainer import DistillTrainer


logger = logging.getLogger(__name__)

FEATURE_PROJECTIONS_NAME = "feature_projections.safetensors"
FEATURE_PROJECTION_MODES = ("auto", "always")
_FORMAT_VERSION = "1"
_LAYER_MAP_EXAMPLE = "'0:1,1:3' or [[0, 1], [1, 3]]"

try:  # transformers >= 5.x keeps only the hidden states whose indices `output_hidden_states` lists
    from transformers.utils.output_capturing import selected_hidden_states as _  # noqa: F401

    _SELECTS_HIDDEN_STATES = True
except ImportError:  # older releases: request them all
    _SELECTS_HIDDEN_STATES = False


# ---------------------------------------------------------------------------------------------------------- layer map
def parse_layer_map(value: Any) -> list[list[int]] | None:
    """Normalize `DistillConfig.feature_layer_map` to `[[student_layer, teacher_layer], ...]` (or `None`: default).

    Accepted: `"0:1,1:3"` (command line), a JSON string `"[[0, 1], [1, 3]]"`, a list of pairs `[[0, 1], (1, 3)]` or of
    `"s:t"` strings (Python, YAML). Checks the form only; indices are checked against the models at trainer start.
    """
    if value is None:
        return None
    try:
        if isinstance(value, str):
            text = value.strip()
            items = json.loads(text) if text.startswith("[") else [item for item in text.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"a {type(value).__name__} is neither a string nor a list")
        pairs = [_pair(item) for item in items]
    except ValueError as error:
        raise ValueError(
            f"`feature_layer_map` must be (student layer, teacher layer) pairs such as {_LAYER_MAP_EXAMPLE}; got "
            f"{value!r} ({error})."
        ) from None
    if not pairs:
        raise ValueError(
            f"`feature_layer_map` is empty ({value!r}); give at least one pair such as {_LAYER_MAP_EXAMPLE}, or leave "
            "it unset for evenly spaced pairs."
        )
    return pairs


def _pair(item: Any) -> list[int]:
    if isinstance(item, str):
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(f"{item.strip()!r} is not of the form 'student:teacher'")
        try:
            return [int(parts[0]), int(parts[1])]
        except ValueError:
            raise ValueError(f"{item.strip()!r} has a non-integer layer index") from None
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(_is_int(i) for i in item):
        return [int(item[0]), int(item[1])]
    raise ValueError(f"{item!r} is not a pair of integers")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """`min(L_s, L_t)` pairs evenly spaced over both models, the last pair matching the last layers.

    Pair `k` (1-based) of `n` maps student layer `k * L_s // n - 1` to teacher layer `k * L_t // n - 1`; a 2-layer
    student and a 4-layer teacher give `[(0, 1), (1, 3)]`.
    """
    n = min(student_layers, teacher_layers)
    return [(k * student_layers // n - 1, k * teacher_layers // n - 1) for k in range(1, n + 1)]


def resolve_layer_map(
    layer_map: Sequence[Sequence[int]] | None, student_layers: int, teacher_layers: int
) -> tuple[tuple[int, int], ...]:
    """The layer map with non-negative indices, checked against the models' depths (the default when `None`)."""
    if layer_map is None:
        return tuple(default_layer_map(student_layers, teacher_layers))
    resolved = []
    for pair in layer_map:
        s, t = int(pair[0]), int(pair[1])
        if not (-student_layers <= s < student_layers and -teacher_layers <= t < teacher_layers):
            raise ValueError(
                f"`feature_layer_map` pair {s}:{t} is out of range: the student has {student_layers} layers (indices "
                f"0..{student_layers - 1}) and the teacher {teacher_layers} (0..{teacher_layers - 1}); negative "
                "indices count from the end. Fix the pair, or leave `feature_layer_map` unset for the default "
                f"{_format(default_layer_map(student_layers, teacher_layers))!r}."
            )
        resolved.append((s % student_layers, t % teacher_layers))
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`feature_layer_map` {_format(resolved)!r} lists the same pair twice; remove the duplicate.")
    return tuple(resolved)


def _format(layer_map) -> str:
    return ",".join(f"{s}:{t}" for s, t in layer_map)


# -------------------------------------------------------------------------------------------------------- projections
class FeatureProjector(nn.Module):
    r"""One map from the student's hidden width to the teacher's per layer pair (FitNets' regressors).

    With `projection="auto"` a pair whose widths match uses the identity (nothing to learn); otherwise each pair gets
    an `nn.Linear(student_dim, teacher_dim)`, initialized semi-orthogonal (norm-preserving when it widens) from `seed`,
    or to the identity when the widths match (`projection="always"`). Biases start at zero.

    The projector is not a submodule of the student: its parameters are added to the optimizer, saved in checkpoints
    and beside the exported student as `feature_projections.safetensors`, and never enter `model.safetensors`.

    Args:
        layer_map (sequence of `(student_layer, teacher_layer)`): non-negative layer indices (see `resolve_layer_map`).
        student_dim (`int`), teacher_dim (`int`): hidden sizes.
        projection (`str`): `"auto"` or `"always"`.
        seed (`int`): seed of the initialization (independent of the global RNG, so a resumed run rebuilds the same).
    """

    def __init__(self, layer_map, student_dim: int, teacher_dim: int, *, projection: str = "auto", seed: int = 0):
        super().__init__()
        if projection not in FEATURE_PROJECTION_MODES:
            raise ValueError(f"`feature_projection` must be one of {FEATURE_PROJECTION_MODES}, got {projection!r}.")
        self.layer_map = tuple((int(s), int(t)) for s, t in layer_map)
        self.student_dim, self.teacher_dim, self.projection = int(student_dim), int(teacher_dim), projection
        generator = torch.Generator().manual_seed(seed)
        self.projections = nn.ModuleList(self._new_projection(generator) for _ in self.layer_map)

    def _new_projection(self, generator: torch.Generator) -> nn.Module:
        if self.projection == "auto" and self.student_dim == self.teacher_dim:
            return nn.Identity()
        linear = nn.Linear(self.student_dim, self.teacher_dim)
        with torch.no_grad():
            if self.student_dim == self.teacher_dim:
                linear.weight.copy_(torch.eye(self.student_dim))
            else:
                nn.init.orthogonal_(linear.weight, generator=generator)
            linear.bias.zero_()
        return linear

    @property
    def teacher_hidden_state_indices(self) -> list[int]:
        """Indices into the teacher's `hidden_states` that the map reads (layer `t` is `hidden_states[t + 1]`)."""
        return sorted({t + 1 for _, t in self.layer_map})

    def forward(self, student_hidden_states, teacher_hidden_states, mask: torch.Tensor):
        """Select the positions of `mask` (shape `(B, T')`, `T' <= T`) and project the student's side.

        Returns:
            Two lists, one `(N, teacher_dim)` tensor per pair: projected student features, teacher features (on the
            student's device, no gradient).
        """
        width = mask.shape[1]
        student, teacher = [], []
        for (s, t), projection in zip(self.layer_map, self.projections):
            hidden = student_hidden_states[s + 1][:, :width][mask]
            weight = getattr(projection, "weight", None)
            student.append(projection(hidden if weight is None else hidden.to(weight.dtype)))
            teacher.append(teacher_hidden_states[t + 1][:, :width].to(mask.device)[mask].detach())
        return student, teacher

    def metadata(self) -> dict[str, str]:
        """What must match for saved projections to be reused (stored in the safetensors header)."""
        return {
            "format": "pt",
            "trl_distill_feature_projections": _FORMAT_VERSION,
            "layer_map": json.dumps([list(pair) for pair in self.layer_map]),
            "student_dim": str(self.student_dim),
            "teacher_dim": str(self.teacher_dim),
            "projection": self.projection,
        }


def save_feature_projections(projector: FeatureProjector, directory: str | os.PathLike) -> str:
    """Write `directory/feature_projections.safetensors` (weights and the metadata that must match to reuse them)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FEATURE_PROJECTIONS_NAME)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in projector.state_dict().items()}
    save_file(tensors, path, metadata=projector.metadata())
    return path


def load_feature_projections(projector: FeatureProjector, path: str | os.PathLike) -> None:
    """Copy saved projections into `projector` in place (bit for bit); `ValueError` if they were made for another map."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        saved = f.metadata() or {}
        state = {name: f.get_tensor(name) for name in f.keys()}
    expected = projector.metadata()
    different = {k: (saved.get(k), v) for k, v in expected.items() if k != "format" and saved.get(k) != v}
    if different:
        details = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in different.items())
        raise ValueError(
            f"The feature projections in {os.fspath(path)!r} were trained for another setup ({details}). Use the same "
            "`feature_layer_map`/`feature_projection` and models, or delete the file to start new projections."
        )
    projector.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------- trainer's hooks
def build_feature_projector(trainer: "DistillTrainer") -> FeatureProjector | None:
    """The trainer's projector (`None` when `feature_weight == 0`), on the student's device.

    Checks what feature KD needs (a live teacher, no DeepSpeed/FSDP), resolves the layer map, reuses
    `feature_projections.safetensors` found beside a student loaded from a directory, and registers the callback that
    averages (across processes) and clips the projections' gradients.
    """
    args = trainer.args
    if args.feature_weight == 0:
        return None
    if trainer.teacher_model is None:
        raise ValueError(
            f"`feature_weight={args.feature_weight}` needs a live teacher to read hidden states from; pass "
            "`teacher_model` or set `feature_weight=0`."
        )
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise NotImplementedError(
            f"`feature_weight={args.feature_weight}` is not supported with DeepSpeed or FSDP yet (the projections are "
            "trained outside the sharded model); use DDP or a single device, or set `feature_weight=0`."
        )
    student_config, teacher_config = _text_config(trainer.model), _text_config(trainer.teacher_model)
    layer_map = resolve_layer_map(
        args.feature_layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers
    )
    projector = FeatureProjector(
        layer_map, student_config.hidden_size, teacher_config.hidden_size, projection=args.feature_projection,
        seed=args.seed,
    )
    device = next(trainer.model.parameters()).device
    projector.to(device)
    _reuse_saved_projections(projector, trainer.model)
    trainer.add_callback(FeatureProjectionCallback(projector))
    return projector


def _text_config(model: nn.Module):
    inner = model.module if isinstance(getattr(model, "module", None), nn.Module) else model  # DDP wrapper
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PeftModel
    config = inner.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _reuse_saved_projections(projector: FeatureProjector, model: nn.Module) -> None:
    """Continue from the projections saved beside a student that was loaded from a directory (see `save_projections`)."""
    source = getattr(_text_config(model), "_name_or_path", None) or getattr(model.config, "_name_or_path", None)
    path = os.path.join(source, FEATURE_PROJECTIONS_NAME) if source and os.path.isdir(source) else None
    if path is None or not os.path.isfile(path):
        return
    try:
        load_feature_projections(projector, path)
    except ValueError as error:
        logger.warning("Not reusing the saved feature projections: %s Starting new ones.", error)
        return
    logger.info("Feature KD continues from the projections in %s.", path)


def feature_teacher_kwargs(trainer: "DistillTrainer") -> dict[str, Any]:
    """Extra keyword arguments for the teacher's forward: hidden states only when feature KD is on (else `{}`)."""
    projector = getattr(trainer, "feature_projector", None)
    if projector is None:
        return {}
    return {"output_hidden_states": projector.teacher_hidden_state_indices if _SELECTS_HIDDEN_STATES else True}


def add_feature_loss(
    trainer: "DistillTrainer",
    loss: torch.Tensor,
    metrics: dict[str, torch.Tensor],
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor] | None,
    shift_labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`loss + feature_weight * L_feat` and the metrics with `feature_kd_loss`; unchanged when feature KD is off.

    Positions are those of the logit loss: position `i` is in the loss when `shift_labels[:, i] != -100`. The same
    `loss_reduction` and `num_items_in_batch` apply, so gradient accumulation still gives one big batch's gradient.
    """
    projector = getattr(trainer, "feature_projector", None)
    if projector is None:
        return loss, metrics
    args = trainer.args
    mask = (shift_labels != -100).to(student_hidden_states[-1].device)
    student, teacher = projector(student_hidden_states, teacher_hidden_states, mask)
    result = feature_distillation_loss(
        student, teacher, loss=args.feature_loss, reduction=args.loss_reduction,
        num_items_in_batch=num_items_in_batch, return_components=True,
    )
    return loss + args.feature_weight * result.loss, {**metrics, "feature_kd_loss": result.feature_loss}


def add_projection_param_group(trainer: "DistillTrainer", optimizer: torch.optim.Optimizer) -> None:
    """Train the projections with the student's optimizer (same learning rate and schedule; no decay on biases)."""
    projector = getattr(trainer, "feature_projector", None)
    params = [] if projector is None else [p for p in projector.parameters() if p.requires_grad]
    present = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not params or all(id(p) in present for p in params):
        return
    weights = [p for p in params if p.ndim > 1]
    biases = [p for p in params if p.ndim <= 1]
    optimizer.add_param_group({"params": weights, "weight_decay": trainer.args.weight_decay})
    if biases:
        optimizer.add_param_group({"params": biases, "weight_decay": 0.0})


def save_projections(trainer: "DistillTrainer", output_dir: str | None) -> None:
    """Save the projections beside what `Trainer._save` wrote (a checkpoint or the exported student)."""
    projector = getattr(trainer, "feature_projector", None)
    if projector is not None and trainer.args.should_save:
        save_feature_projections(projector, output_dir if output_dir is not None else trainer.args.output_dir)


def resume_projections(trainer: "DistillTrainer", checkpoint: str) -> None:
    """Restore the projections saved in `checkpoint` (bit for bit); warn if it has none."""
    projector = getattr(trainer, "feature_projector", None)
    if projector is None:
        return
    path = os.path.join(checkpoint, FEATURE_PROJECTIONS_NAME)
    if not os.path.isfile(path):
        logger.warning(
            "Checkpoint %s has no %s (saved without feature KD?): the feature projections start from their "
            "initialization.",
            checkpoint,
            FEATURE_PROJECTIONS_NAME,
        )
        return
    load_feature_projections(projector, path)


class FeatureProjectionCallback(TrainerCallback):
    """What the trainer does for the model's parameters only, done for the projections' too.

    Before each optimizer step: average their gradients over processes (DDP averages the student's, but the
    projections are outside the DDP wrapper), then clip them to `max_grad_norm` (on their own norm). After it: zero
    them (the trainer calls `model.zero_grad()`, which does not reach them; without this they would accumulate over
    steps).
    """

    def __init__(self, projector: FeatureProjector):
        self.projector = projector

    def on_train_begin(self, args, state, control, **kwargs):
        self.projector.zero_grad(set_to_none=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projector.zero_grad(set_to_none=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in self.projector.parameters() if p.grad is not None]
        if not grads:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
            if world_size > 1:
                for grad in grads:
                    torch.distributed.all_reduce(grad)
                    grad.div_(world_size)
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.projector.parameters()), args.max_grad_norm)
