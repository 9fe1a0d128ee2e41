"""Saving a distilled model as a verifiable artifact: held-out rows, receipt, signature and model card, then upload.

This module owns every write; the pieces it assembles import none of each other:
`provenance` describes a run (a receipt stage), `receipt` hashes, canonicalizes and signs, `model_card` renders the
card as a pure function of the receipt. Nothing is stored on the trainer: the card of a saved artifact is rendered
from the receipt on disk.

```python
trainer.save_model()                                         # DistillTrainer calls save_artifact itself
save_artifact(trainer, out, heldout=figures, heldout_rows=rows)  # figures measured outside the trainer (recipes)
append_stage(out, {"name": "recovery", "method": "sft"}, previous=distilled_dir)
```
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import model_card, provenance
from . import receipt as receipts


__all__ = ["HubUploadError", "append_stage", "push_offline_error", "save_artifact", "write_trainer_model_card"]

logger = logging.getLogger(__name__)

# Never uploaded from an output directory: resume state, private files, and a teacher-generation cache (the training
# targets of sequence-level KD, which an older default wrote to `output_dir/teacher_generations`).
PUSH_IGNORE_PATTERNS = ["_*", "checkpoint-*", "runs/*", "teacher_generations/*", "teacher_generations"]


class HubUploadError(RuntimeError):
    """`push_to_hub` could not upload; the artifact is saved locally (`output_dir`, `files`)."""

    def __init__(self, message: str, output_dir: str, files: list[str]):
        super().__init__(message)
        self.output_dir, self.files = output_dir, files


def _write_rows(path: Path, rows: list[Mapping]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(provenance.jsonable(dict(row)), ensure_ascii=False, sort_keys=True) + "\n")


def trainer_tags(trainer) -> list[str]:
    tags = list(getattr(trainer, "_tag_names", []))
    return tags + list(getattr(getattr(trainer, "model", None), "model_tags", None) or [])


def _model_name(trainer, output_dir: Path) -> str:
    hub_id = getattr(trainer, "hub_model_id", None) or getattr(trainer.args, "hub_model_id", None) or ""
    return hub_id.split("/")[-1] or output_dir.resolve().name


def save_artifact(
    trainer,
    output_dir: str | os.PathLike,
    *,
    heldout: Mapping[str, float] | None = None,
    heldout_rows: list[Mapping] | None = None,
    heldout_vocab_size: int | None = None,
) -> dict:
    """
    Make `output_dir` (where `save_model` just wrote the weights) a complete, verifiable artifact.

    Writes the held-out rows ([`~trl_distill.provenance.HELDOUT_ROWS_NAME`], for `trl-distill verify --replay`), the
    receipt (one stage: this run), its Ed25519 signature when `args.receipt_signing_key` is set, and the model card
    rendered from the receipt. Call it again after writing more files into `output_dir` to cover them.

    Args:
        trainer (`DistillTrainer`): the trained trainer.
        output_dir (`str` or `os.PathLike`): the directory holding the saved weights.
        heldout (`dict`, *optional*): held-out figures measured outside the trainer (the keys of
            [`~trl_distill.heldout_metrics`]); default: the trainer's held-out callback's last figures, if any.
        heldout_rows (`list[dict]`, *optional*): the rows `heldout` was measured on (required with `heldout`, so
            `verify --replay` can recompute the figures).
        heldout_vocab_size (`int`, *optional*): the `vocab_size` the figures were measured with (default
            `trainer.vocab_size`).

    Returns:
        `dict`: the receipt as written.
    """
    from .callbacks import heldout_results

    if heldout is not None and heldout_rows is None:
        raise ValueError("`heldout` was given without `heldout_rows`: pass the rows the figures were measured on.")
    output_dir = Path(output_dir)
    rows = heldout_rows
    if heldout is None:
        heldout, rows = heldout_results(trainer)
    rows_path = output_dir / provenance.HELDOUT_ROWS_NAME
    if rows is not None:
        _write_rows(rows_path, rows)
    elif rows_path.exists():
        rows_path.unlink()  # from an earlier save: the figures it backed are not in this receipt
    stage = provenance.distill_stage(
        trainer, heldout, provenance.HELDOUT_ROWS_NAME if rows is not None else None, heldout_vocab_size
    )
    stage["applicable_settings"] = sorted(provenance.applicable_settings(stage["settings"]))
    card = {"model_name": _model_name(trainer, output_dir), "tags": trainer_tags(trainer)}
    receipt = receipts.new_receipt(output_dir, [stage], card=card)
    receipts.write_receipt(output_dir, receipt)
    if trainer.args.receipt_signing_key:
        receipts.sign_receipt(output_dir, trainer.args.receipt_signing_key)
    model_card.write_model_card(output_dir, receipt)
    logger.info("Wrote %s (content id %s) in %s", receipts.RECEIPT_NAME, receipt["content_id"], output_dir)
    return receipt


def _check_stage(stage: Any) -> None:
    if not isinstance(stage, Mapping):
        raise TypeError(f"`stage` must be a dict, got {type(stage).__name__}.")
    for key in ("name", "method"):
        if not isinstance(stage.get(key), str) or not stage[key]:
            raise ValueError(f"`stage[{key!r}]` must be a non-empty string, got {stage.get(key)!r}.")


def append_stage(output_dir: str | os.PathLike, stage: Mapping, *, previous: str | os.PathLike | None = None) -> dict:
    """
    Record one more training stage in `output_dir/distill_receipt.json` and re-hash the artifact.

    Loads the receipt of `output_dir` if there is one (else starts a new one), carries first the stages of
    `previous` (the directory or receipt file of an earlier stage; skipped when they already lead the list), appends
    `stage`, re-hashes every artifact file in `output_dir`, writes the receipt canonically and rewrites the model card
    (`README.md`) from it. A signature of the old receipt is removed (sign again with `receipt.sign_receipt`).

    Args:
        output_dir (`str` or `os.PathLike`): The directory of the stage's artifact (weights, tokenizer...).
        stage (`dict`): JSON-able, with at least `"name"` (e.g. `"recovery"`) and `"method"` (e.g. `"sft"`);
            `"settings"`, `"results"` and `"models"` are optional. The library versions are added as `"libraries"`
            unless given.
        previous (`str` or `os.PathLike`, *optional*): Receipt (or its directory) of the stage this one continues.

    Returns:
        `dict`: the receipt as written (with its `content_id`).
    """
    _check_stage(stage)
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"`output_dir` {str(output_dir)!r} is not a directory; save the stage's model there.")
    current = receipts.load_receipt(output_dir) if receipts.receipt_path(output_dir).is_file() else {}
    stages = list(current.get("stages") or [])
    card = current.get("card")
    if previous is not None:
        earlier_receipt = receipts.load_receipt(previous)
        earlier = earlier_receipt["stages"]
        if stages[: len(earlier)] != earlier:
            stages = earlier + stages
        card = card or earlier_receipt.get("card")
    stage = {"libraries": provenance.library_versions(), **copy.deepcopy(dict(stage))}
    stages.append(receipts.normalize(stage, "stage"))
    receipt = receipts.new_receipt(output_dir, stages, card=card)
    receipts.write_receipt(output_dir, receipt)
    model_card.write_model_card(output_dir, receipt)
    return receipt


def write_trainer_model_card(trainer, output_dir, *, model_name=None, tags=None) -> Path:
    """`DistillTrainer.create_model_card`: the card of the receipt in `output_dir`, or a draft before any save.

    The card of a saved artifact is rendered from its receipt alone (`model_name`/`tags` given here are already in
    it, from the trainer's `hub_model_id` and tags), so `verify` can regenerate it. Before any save, a draft card with
    no content id is written.
    """
    from .callbacks import heldout_results

    output_dir = Path(output_dir)
    if receipts.receipt_path(output_dir).is_file():
        return model_card.write_model_card(output_dir, receipts.load_receipt(output_dir))
    tags = trainer_tags(trainer) + ([tags] if isinstance(tags, str) else list(tags or []))
    stage = provenance.distill_stage(trainer, heldout_results(trainer)[0])
    stage["applicable_settings"] = sorted(provenance.applicable_settings(stage["settings"]))
    draft = {
        "format": receipts.FORMAT,
        "stages": [stage],
        "card": {"model_name": model_name or _model_name(trainer, output_dir), "tags": sorted(set(tags))},
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    return model_card.write_model_card(output_dir, receipts.normalize(draft))


def push_offline_error(output_dir) -> Exception | None:
    """The error `push_to_hub` raises in offline mode (`HF_HUB_OFFLINE=1`), or None when the Hub may be reached."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if not constants.is_offline_mode():
        return None
    return OfflineModeIsEnabled(
        f"`push_to_hub` needs the Hub, but offline mode is on (HF_HUB_OFFLINE=1). The model, its card and "
        f"distill_receipt.json are saved in {str(output_dir)!r}: unset HF_HUB_OFFLINE (or point HF_ENDPOINT at a "
        "reachable Hub) and push again, or upload that directory later with `hf upload`."
    )


def upload_error(output_dir, hub_model_id: str | None, error: BaseException) -> HubUploadError:
    """What `push_to_hub` raises when the upload fails: the cause, and what was saved where (nothing is lost)."""
    saved = receipts.receipt_path(output_dir).is_file()
    files = sorted(receipts.load_receipt(output_dir)["artifacts"]) if saved else []
    shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    message = (
        f"`push_to_hub` could not upload to {hub_model_id or 'the Hub'!r} ({type(error).__name__}: {error}). Nothing "
        f"is lost: the model, README.md and distill_receipt.json are saved in {str(output_dir)!r} ({shown}). Push "
        f"again when the Hub is reachable, or upload that directory with `hf upload {hub_model_id or '<repo>'} "
        f"{output_dir}`; `trl-distill verify {output_dir}` checks it first."
    )
    return HubUploadError(message, str(output_dir), files)
