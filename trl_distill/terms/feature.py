"""Feature (hidden-state) KD: an extra *term* added to a mode's loss, with the projections it trains.

With `feature_weight > 0`, a mode that supports it (`DistillMode.supports_feature_term`; the token mode) adds
`feature_weight * L_feat` to its loss, where `L_feat` compares the student's hidden states, mapped to the teacher's
width by one learned projection per layer pair, with the teacher's (see
[`~trl_distill.losses.feature_distillation_loss`]). This module owns everything around that loss:

- [`FeatureProjector`]: the projections, trained with the student but never part of it;
- [`FeatureTerm`]: what a mode calls (`teacher_forward_kwargs`, `add`) and what the trainer calls (`add_param_groups`,
  `save`, `resume`), built by [`build_feature_term`] once the student and the teacher are placed;
- the layer map lives in the leaf module [`trl_distill.terms.layer_map`] (the config validates it without torch).

Layer `i` means the output of decoder layer `i` (0-based; `hidden_states[i + 1]` of a transformers model, so the last
layer is the final normed hidden state the `lm_head` reads). Negative indices count from the end.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..inference import unwrap_model
from ..losses import feature_distillation_loss
from .layer_map import FEATURE_PROJECTION_MODES, resolve_layer_map


logger = logging.getLogger(__name__)

FEATURE_PROJECTIONS_NAME = "feature_projections.safetensors"
_FORMAT_VERSION = "1"

try:  # transformers >= 5.x keeps only the hidden states whose indices `output_hidden_states` lists
    from transformers.utils.output_capturing import selected_hidden_states as _  # noqa: F401

    _SELECTS_HIDDEN_STATES = True
except ImportError:  # older releases: request them all
    _SELECTS_HIDDEN_STATES = False


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


# ------------------------------------------------------------------------------------------------------- the term
class FeatureTerm:
    """`feature_weight * L_feat` beside a mode's loss, and the life of its projections with the student.

    Built by the trainer ([`build_feature_term`]) and handed to the mode in `ModeContext.feature_term` (`None` when
    `feature_weight == 0`). A mode that supports the term asks the teacher for hidden states with
    [`teacher_forward_kwargs`] and adds the term with [`add`]; the trainer trains the projections with the student's
    optimizer ([`add_param_groups`]), saves them beside the student ([`save`]) and restores them on resume
    ([`resume`]).
    """

    def __init__(self, projector: FeatureProjector, args):
        self.projector = projector
        self.weight = float(args.feature_weight)
        self.loss = args.feature_loss
        self.reduction = args.loss_reduction

    def teacher_forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the teacher's forward: the hidden states of the mapped layers only."""
        layers = self.projector.teacher_hidden_state_indices if _SELECTS_HIDDEN_STATES else True
        return {"output_hidden_states": layers}

    def add(
        self,
        loss: torch.Tensor,
        metrics: dict[str, torch.Tensor],
        student_hidden_states: Sequence[torch.Tensor],
        teacher_hidden_states: Sequence[torch.Tensor] | None,
        shift_labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`loss + feature_weight * L_feat` and the metrics with `feature_kd_loss`.

        Positions are those of the logit loss: position `i` is in the loss when `shift_labels[:, i] != -100`. The same
        `loss_reduction` and `num_items_in_batch` apply, so gradient accumulation still gives one big batch's gradient.
        """
        mask = (shift_labels != -100).to(student_hidden_states[-1].device)
        student, teacher = self.projector(student_hidden_states, teacher_hidden_states, mask)
        result = feature_distillation_loss(
            student,
            teacher,
            loss=self.loss,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            return_components=True,
        )
        return loss + self.weight * result.loss, {**metrics, "feature_kd_loss": result.feature_loss}

    def add_param_groups(self, optimizer: torch.optim.Optimizer, *, weight_decay: float) -> None:
        """Train the projections with the student's optimizer (same learning rate and schedule; no decay on biases)."""
        params = [p for p in self.projector.parameters() if p.requires_grad]
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not params or all(id(p) in present for p in params):
            return
        weights = [p for p in params if p.ndim > 1]
        biases = [p for p in params if p.ndim <= 1]
        optimizer.add_param_group({"params": weights, "weight_decay": weight_decay})
        if biases:
            optimizer.add_param_group({"params": biases, "weight_decay": 0.0})

    def save(self, output_dir: str) -> None:
        """Save the projections beside what `Trainer._save` wrote (a checkpoint or the exported student)."""
        save_feature_projections(self.projector, output_dir)

    def resume(self, checkpoint: str) -> None:
        """Restore the projections saved in `checkpoint` (bit for bit); warn if it has none."""
        path = os.path.join(checkpoint, FEATURE_PROJECTIONS_NAME)
        if not os.path.isfile(path):
            logger.warning(
                "Checkpoint %s has no %s (saved without feature KD?): the feature projections start from their "
                "initialization.",
                checkpoint,
                FEATURE_PROJECTIONS_NAME,
            )
            return
        load_feature_projections(self.projector, path)


def build_feature_term(
    args, student: nn.Module, teacher: nn.Module | None, *, sharded: bool, add_callback: Callable[[Any], None]
) -> FeatureTerm | None:
    """The feature term (`None` when `feature_weight == 0`), its projections on the student's device.

    Checks what feature KD needs (a live teacher, no DeepSpeed/FSDP: `sharded`), resolves the layer map, reuses
    `feature_projections.safetensors` found beside a student loaded from a directory, and registers (through
    `add_callback`) the callback that averages (across processes) and clips the projections' gradients.
    """
    if args.feature_weight == 0:
        return None
    if teacher is None:
        raise ValueError(
            f"`feature_weight={args.feature_weight}` needs a live teacher to read hidden states from; pass "
            "`teacher_model` or set `feature_weight=0`."
        )
    if sharded:
        raise NotImplementedError(
            f"`feature_weight={args.feature_weight}` is not supported with DeepSpeed or FSDP yet (the projections are "
            "trained outside the sharded model); use DDP or a single device, or set `feature_weight=0`."
        )
    student_config, teacher_config = _text_config(student), _text_config(teacher)
    layer_map = resolve_layer_map(
        args.feature_layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers
    )
    projector = FeatureProjector(
        layer_map,
        student_config.hidden_size,
        teacher_config.hidden_size,
        projection=args.feature_projection,
        seed=args.seed,
    )
    projector.to(next(student.parameters()).device)
    _reuse_saved_projections(projector, student)
    add_callback(FeatureProjectionCallback(projector))
    return FeatureTerm(projector, args)


def _text_config(model: nn.Module):
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _reuse_saved_projections(projector: FeatureProjector, model: nn.Module) -> None:
    """Continue from the projections saved beside a student loaded from a directory (see `FeatureTerm.save`)."""
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
