"""Check a saved artifact against its receipt: `trl-distill verify OUTPUT_DIR [--replay] [--public-key KEY]`.

Every check says what it compared; a failure names what differs (a file, a receipt field, a figure, a key):

1. the receipt parses, is in canonical form, and its content matches its `content_id`;
2. every file it lists exists with the recorded sha256 (files it does not list are reported; with `strict` they fail);
3. the model card is exactly the card the receipt gives (`model_card.card_text`, regenerated): any other line (an
   edited `model-index` figure, teacher name, held-out table, an added `base_model`...) fails, naming the line;
4. with a public key, `distill_receipt.sig` is a valid Ed25519 signature of the receipt by that key;
5. with `replay`, teacher and student are reloaded and the held-out figures recomputed on the recorded rows, and
   must match the receipt within float noise (and the teacher's weights must hash as recorded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


__all__ = ["Verification", "verify_artifact"]


@dataclass
class Verification:
    """The outcome of [`verify_artifact`]: `passed` and `notes` inform, any entry in `problems` fails it."""

    output_dir: str
    content_id: str | None = None
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        lines = [f"Verifying {self.output_dir} (receipt {self.content_id or 'unreadable'})"]
        lines += [f"  OK    {m}" for m in self.passed] + [f"  FAIL  {m}" for m in self.problems]
        lines += [f"  NOTE  {m}" for m in self.notes]
        verdict = "verified" if self.ok else f"FAILED ({len(self.problems)} problem{'s' * (len(self.problems) > 1)})"
        return "\n".join(lines + [verdict])


def _short(digest: str | None) -> str:
    return (digest or "none")[:12]


def _check_receipt(path: Path, result: Verification) -> dict | None:
    from .receipt import canonical_bytes, content_id, load_receipt

    try:
        receipt = load_receipt(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        result.problems.append(str(error))
        return None
    if not isinstance(receipt.get("stages"), list) or not all(isinstance(s, dict) for s in receipt["stages"]):
        result.problems.append("distill_receipt.json: `stages` is not a list of stage records.")
        return None
    result.content_id = receipt.get("content_id")
    raw = (path / "distill_receipt.json").read_bytes()
    if canonical_bytes(receipt) != raw:
        result.problems.append("distill_receipt.json: not in canonical form: it was rewritten after it was made.")
    computed = content_id(receipt)
    if computed != receipt.get("content_id"):
        result.problems.append(
            f"distill_receipt.json: its content hashes to {computed}, not to its recorded content id "
            f"{receipt.get('content_id')}: the receipt was edited after it was written (differences from the model "
            "card and the signature, if any, are listed below)."
        )
    else:
        result.passed.append(f"distill_receipt.json matches its content id {computed}")
    return receipt


def _check_files(path: Path, receipt: dict, result: Verification, strict: bool) -> None:
    from .receipt import artifact_paths, hash_files

    recorded = receipt.get("artifacts") or {}
    if not isinstance(recorded, dict) or not all(isinstance(e, dict) for e in recorded.values()):
        result.problems.append("distill_receipt.json: `artifacts` is not a map of file records.")
        return
    current = hash_files(path, sorted(recorded), desc="Verifying artifact")
    changed = 0
    for name, entry in sorted(recorded.items()):
        if name not in current:
            result.problems.append(f"{name}: missing (the receipt lists it, sha256 {_short(entry.get('sha256'))})")
            changed += 1
        elif current[name]["sha256"] != entry.get("sha256"):
            now = current[name]
            result.problems.append(
                f"{name}: changed (sha256 {_short(now['sha256'])}, the receipt says {_short(entry.get('sha256'))}; "
                f"{now['bytes']} bytes, the receipt says {entry.get('bytes')})"
            )
            changed += 1
    if not changed:
        result.passed.append(f"all {len(recorded)} artifact files match the receipt")
    for name in artifact_paths(path):
        if name not in recorded:
            message = f"{name}: not covered by the receipt (added after it was written)"
            (result.problems if strict else result.notes).append(message)


_MAX_CARD_LINES = 12


def card_differences(text: str, expected: str) -> list[str]:
    """The lines where the card `text` differs from the card the receipt gives (`expected`), named by line number."""
    import difflib

    have, want = text.splitlines(), expected.splitlines()
    problems = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, have, want, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        for offset in range(max(i2 - i1, j2 - j1)):
            line_no, ours, theirs = i1 + offset + 1, i1 + offset < i2, j1 + offset < j2
            if ours and theirs:
                problems.append(
                    f"README.md line {line_no}: says {have[i1 + offset]!r}, the receipt gives {want[j1 + offset]!r}"
                )
            elif ours:
                problems.append(
                    f"README.md line {line_no}: {have[i1 + offset]!r} is not in the card the receipt gives"
                )
            else:
                problems.append(f"README.md after line {i2}: missing {want[j1 + offset]!r}, which the receipt gives")
    if len(problems) > _MAX_CARD_LINES:
        problems = problems[:_MAX_CARD_LINES] + [f"README.md: {len(problems) - _MAX_CARD_LINES} more differing lines"]
    return problems


def _check_card(path: Path, receipt: dict, result: Verification) -> None:
    from .model_card import CARD_NAME, card_text

    card = path / CARD_NAME
    if not card.is_file():
        result.problems.append(
            f"{CARD_NAME}: missing (the receipt gives a model card; regenerate it with "
            "`trl_distill.model_card.write_model_card(dir, receipt)`)"
        )
        return
    try:
        text = card.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        result.problems.append(f"{CARD_NAME}: not UTF-8 text ({error})")
        return
    try:
        expected = card_text(receipt)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        result.problems.append(f"{CARD_NAME}: the receipt cannot give a card ({type(error).__name__}: {error})")
        return
    problems = card_differences(text.replace("\r\n", "\n"), expected)
    result.problems += problems
    if not problems:
        result.passed.append(f"{CARD_NAME} is the card the receipt gives (metadata, model-index, text: regenerated)")


def _check_signature(path: Path, public_key, result: Verification) -> None:
    from .receipt import SIGNATURE_NAME, signature_problem

    signed = (path / SIGNATURE_NAME).is_file()
    if public_key is None:
        if signed:
            try:
                key_id = json.loads((path / SIGNATURE_NAME).read_text(encoding="utf-8")).get("key_id")
            except (ValueError, AttributeError, UnicodeDecodeError):
                result.problems.append(f"{SIGNATURE_NAME}: not a trl_distill signature (unreadable JSON)")
                return
            result.notes.append(f"{SIGNATURE_NAME}: signed by {key_id}; pass a public key to check it")
        return
    try:
        problem = signature_problem(path, public_key)
    except (ValueError, OSError, ImportError) as error:  # a missing or malformed key file
        problem = f"public key: {error}"
    if problem:
        result.problems.append(problem)
    else:
        result.passed.append(f"{SIGNATURE_NAME}: valid signature by the given public key")


def verify_artifact(
    output_dir,
    *,
    public_key=None,
    replay: bool = False,
    teacher: str | None = None,
    strict: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    device: str | None = None,
) -> Verification:
    """
    Verify the artifact in `output_dir` against its `distill_receipt.json` (see the module docstring).

    Args:
        output_dir (`str` or `os.PathLike`): A directory written by `DistillTrainer.save_model` or `append_stage`.
        public_key (`str` or `os.PathLike`, *optional*): Ed25519 public key (PEM); the signature must verify with it.
        replay (`bool`, *optional*, defaults to `False`): Reload teacher and student and recompute the held-out
            figures of the last stage on the recorded rows.
        teacher (`str`, *optional*): Where to load the teacher from for `replay`, when the receipt's path is not
            reachable here; its weights must still hash as recorded.
        strict (`bool`, *optional*, defaults to `False`): Fail on files the receipt does not list.
        rtol, atol (`float`): Tolerance of the replayed figures.
        device (`str`, *optional*): Device for `replay` (default: CUDA when available, else CPU).

    Returns:
        [`Verification`]: `ok`, and what passed, failed and was noted; `report()` renders it.
    """
    path = Path(output_dir)
    result = Verification(str(output_dir))
    receipt = _check_receipt(path, result)
    if receipt is None:
        return result
    _check_files(path, receipt, result, strict)
    _check_card(path, receipt, result)
    _check_signature(path, public_key, result)
    if replay:
        from .replay import replay_problems

        problems, passed, notes = replay_problems(path, receipt, teacher=teacher, rtol=rtol, atol=atol, device=device)
        result.problems += problems
        result.passed += passed
        result.notes += notes
    return result
