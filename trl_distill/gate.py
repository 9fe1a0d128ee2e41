"""The release gate: thresholds a distilled student must meet before `push_to_hub` publishes it (issue 16).

A gate has two parts, both optional:

- **thresholds** on the held-out figures the [`~trl_distill.callbacks.HeldOutKLCallback`] logs, under the same names
  (`heldout_kl_teacher_student<=0.5`, `heldout_top1_agreement>=0.6`, `heldout_student_perplexity<=40`, ...);
- a **check** of the student's greedy answers to the held-out prompts: a function named by import path
  (`module:function`) that says which answers pass (e.g. that no answer repeats a fact the teacher hallucinates), and
  the fraction of answers that must pass (`min_pass`).

This module is pure (standard library only): it parses the settings, loads the check function, decides pass/fail from
measured values, and checks that a recorded result agrees with the recorded figures (`trl-distill verify`). The
measurement itself (held-out figures, greedy answers) is the callback's (`trl_distill.callbacks`).

A gate record, as the receipt holds it in the distill stage (`stage["release_gate"]`):

```json
{"settings": {"thresholds": ["heldout_kl_teacher_student<=0.5"], "check": "my_checks:no_made_up_city",
              "min_pass": 1.0},
 "result": {"evaluated": true, "passed": false, "step": 40,
            "checks": [{"name": "heldout_kl_teacher_student", "op": "<=", "threshold": 0.5, "value": 0.73,
                        "passed": false},
                       {"name": "my_checks:no_made_up_city", "op": ">=", "threshold": 1.0, "value": 0.875,
                        "passed": false, "num_answers": 8}]},
 "override": {"reason": "known regression, tracked in #123"}}
```
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any


__all__ = [
    "GATE_METRICS",
    "ReleaseGateError",
    "compare",
    "evaluate_gate",
    "gate_failures",
    "gate_settings",
    "load_release_check",
    "not_evaluated",
    "parse_release_gate",
    "record_problems",
    "rejudge",
    "score_answers",
    "split_threshold",
    "wrong_direction",
]

# The held-out figures a threshold may name (the callback's logged names) -> whether lower is better.
GATE_METRICS: dict[str, bool] = {
    "heldout_kl_teacher_student": True,
    "heldout_kl_student_teacher": True,
    "heldout_top1_agreement": False,
    "heldout_acceptance_rate": False,
    "heldout_student_perplexity": True,
    "heldout_teacher_perplexity": True,
    "heldout_perplexity_gap": True,
    "heldout_num_tokens": False,
}
PREFIX = "heldout_"
OPERATORS = ("<=", ">=", "<", ">")
_ITEM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*(\S+)\s*")
_REL = 1e-9  # recorded values are rounded to 12 significant digits by the receipt's canonical form


class ReleaseGateError(RuntimeError):
    """`push_to_hub` refused: the student failed its release gate. It is saved in `output_dir`; `failures` lists the
    failed checks (each a dict with `name`, `op`, `threshold`, `value`)."""

    def __init__(self, message: str, output_dir: str, failures: list[dict]):
        super().__init__(message)
        self.output_dir, self.failures = output_dir, failures


# ---- settings -------------------------------------------------------------------------------------------------------


def _threshold_item(name: str, op: str, value: Any, field: str) -> str:
    if name not in GATE_METRICS:
        hint = f" (did you mean {PREFIX + name!r}?)" if PREFIX + name in GATE_METRICS else ""
        raise ValueError(
            f"`{field}` names {name!r}, which is not a held-out figure{hint}. Use one of {sorted(GATE_METRICS)}, "
            "e.g. 'heldout_kl_teacher_student<=0.5'."
        )
    if op not in OPERATORS:
        raise ValueError(f"`{field}`: {name!r} has the operator {op!r}; use one of {list(OPERATORS)}.")
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = math.nan
    if isinstance(value, bool) or not math.isfinite(threshold):
        raise ValueError(f"`{field}`: the threshold of {name!r} must be a finite number, got {value!r}.")
    return f"{name}{op}{threshold!r}"


def _parse_string_item(item: str, field: str) -> str:
    match = _ITEM.fullmatch(item)
    if match is None:
        raise ValueError(
            f"`{field}` entry {item!r} is not 'name<=value' or 'name>=value' (e.g. 'heldout_kl_teacher_student<=0.5', "
            "'heldout_top1_agreement>=0.6')."
        )
    return _threshold_item(*match.groups(), field=field)


def parse_release_gate(value: Any, field: str = "release_gate") -> list[str]:
    """
    The thresholds of a gate in canonical form: a list of `"name<=value"` / `"name>=value"` strings, one per figure.

    Accepts `None` (no thresholds), a list of such strings, one string of them separated by commas (the command line:
    `--release_gate "heldout_kl_teacher_student<=0.5,heldout_top1_agreement>=0.6"`), a JSON object or list in a
    string, or a mapping `{name: "<=0.5"}` (YAML). Names are the held-out figures the callback logs ([`GATE_METRICS`]);
    operators `<=`, `>=`, `<`, `>`.

    Raises:
        ValueError: naming `field`, the entry and the fix, for an unknown figure, a bad operator or threshold, or a
            figure given twice. TypeError for a value of another type.
    """
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("{", "[")):
            try:
                value = json.loads(text)
            except ValueError as error:
                raise ValueError(f"`{field}` looks like JSON but does not parse ({error}): {value!r}.") from error
        else:
            value = [item for item in text.split(",") if item.strip()]
    if isinstance(value, Mapping):
        items = []
        for name, bound in value.items():
            match = re.fullmatch(r"\s*(<=|>=|<|>)\s*(\S+)\s*", bound) if isinstance(bound, str) else None
            if match is None:
                raise ValueError(
                    f"`{field}[{name!r}]` must be a string like '<=0.5' or '>=0.6' (operator, then threshold), got "
                    f"{bound!r}."
                )
            items.append(_threshold_item(str(name), match.group(1), match.group(2), field))
    elif isinstance(value, (list, tuple)):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise TypeError(
                    f"`{field}` entries must be strings like 'heldout_kl_teacher_student<=0.5', got {item!r}."
                )
            items.append(_parse_string_item(item, field))
    else:
        raise TypeError(
            f"`{field}` must be None, a list of 'name<=value' strings, a comma-separated string of them or a mapping "
            f"{{name: '<=value'}}, got {type(value).__name__} ({value!r})."
        )
    names = [_ITEM.fullmatch(item).group(1) for item in items]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"`{field}` gives {repeated} more than once; give one bound per figure.")
    return items


def split_threshold(item: str) -> tuple[str, str, float]:
    """`("heldout_kl_teacher_student", "<=", 0.5)` from a canonical threshold `"heldout_kl_teacher_student<=0.5"`."""
    name, op, value = _ITEM.fullmatch(item).groups()
    return name, op, float(value)


def wrong_direction(thresholds: Sequence[str]) -> list[str]:
    """The thresholds that bound a figure on the side where it improves (e.g. a KL *at least* x): likely a typo."""
    odd = []
    for item in thresholds:
        name, op, _ = split_threshold(item)
        if name != "heldout_num_tokens" and (op in (">=", ">")) == GATE_METRICS[name]:
            odd.append(item)
    return odd


def gate_settings(
    thresholds: Sequence[str], check: str | None, min_pass: float, max_new_tokens: int | None = None
) -> dict[str, Any]:
    """The `settings` part of a gate record (`max_new_tokens`: the check's answer budget, for `verify --replay`)."""
    return {
        "thresholds": list(thresholds),
        "check": check,
        "min_pass": float(min_pass) if check else None,
        "max_new_tokens": max_new_tokens if check else None,
    }


# ---- the check function ---------------------------------------------------------------------------------------------


def _import(path: str, field: str) -> Callable:
    if not isinstance(path, str):
        raise TypeError(f"`{field}` must be an import path 'package.module:function', got {path!r}.")
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"`{field}` must be an import path like 'package.module:function', got {path!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"`{field}={path!r}`: cannot import the module {module_name!r} ({error}).") from error
    function = getattr(module, attr, None)
    if function is None:
        raise ValueError(f"`{field}={path!r}`: the module {module_name!r} has no attribute {attr!r}; name a function.")
    if not callable(function):
        raise TypeError(f"`{field}={path!r}`: {module_name}.{attr} is a {type(function).__name__}, not a function.")
    return function


def load_release_check(path: str, field: str = "release_gate_check") -> Callable[..., list[float]]:
    """
    The check at `path` (`"module:function"` or `"module.function"`) as `check(prompts, completions, references)`
    returning one score in [0, 1] per answer (1 = passes).

    A function with `prompts` and `completions` parameters is called once on all answers (with `references`, the
    held-out completions, when it has that parameter) and returns one bool/float per answer, or one pass fraction for
    them all. Any other function is called per answer as `function(prompt, completion) -> bool | float` (as
    `trl_distill.demo:is_correct`, or a GRPO recipe's reward).

    Raises:
        ValueError: naming `field` when the path is malformed, the module does not import or the name is not callable.
    """
    function = _import(path, field)
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        parameters = {}
    batched = {"prompts", "completions"} <= set(parameters)
    wants_references = "references" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())

    def check(prompts: list, completions: list[str], references: list | None = None) -> list[float]:
        if batched:
            extra = {"references": references} if wants_references and references is not None else {}
            scores = function(prompts=prompts, completions=completions, **extra)
            if isinstance(scores, (bool, int, float)):  # one pass fraction for the whole set
                scores = [float(scores)] * len(completions)
        else:
            scores = [function(prompt, completion) for prompt, completion in zip(prompts, completions)]
        return _scores(list(scores), len(completions), path)

    check.__name__ = getattr(function, "__name__", "check")
    return check


def _scores(scores: list, expected: int, path: str) -> list[float]:
    if len(scores) != expected:
        raise ValueError(f"The release-gate check {path!r} returned {len(scores)} scores for {expected} answers.")
    values = []
    for score in scores:
        value = float(score) if isinstance(score, (bool, int, float)) else math.nan
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"The release-gate check {path!r} returned {score!r}; return a bool or a number in [0, 1] per answer."
            )
        values.append(value)
    return values


def score_answers(check: Callable, path: str, prompts: list, completions: list[str], references=None) -> dict:
    """Run `check` (from [`load_release_check`]) on the answers: `{"pass_fraction", "num_answers", "failed"}`.

    `failed` holds the indices of the answers that did not pass fully (score below 1), for the log.
    """
    if not completions:
        raise ValueError(f"The release-gate check {path!r} has no answers to score (no held-out prompts).")
    scores = check(prompts, completions, references)
    return {
        "pass_fraction": sum(scores) / len(scores),
        "num_answers": len(scores),
        "failed": [i for i, s in enumerate(scores) if s < 1.0],
    }


# ---- deciding -------------------------------------------------------------------------------------------------------


def compare(value: float, op: str, threshold: float) -> bool:
    """Whether `value op threshold` holds (NaN never passes)."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return {"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold, ">": value > threshold}[op]


def evaluate_gate(
    settings: Mapping, heldout: Mapping[str, float] | None, check: Mapping | None = None, step: int | None = None
) -> dict[str, Any]:
    """
    The `result` part of a gate record: each threshold against the held-out figures, then the check's pass fraction.

    Args:
        settings (`dict`): From [`gate_settings`].
        heldout (`dict`, *optional*): The figures of `trl_distill.evaluation.heldout_metrics` (keys without the
            `heldout_` prefix). A threshold on a figure that was not measured fails (value `None`).
        check (`dict`, *optional*): From [`score_answers`]; required when `settings["check"]` is set (else that check
            fails as not run).
        step (`int`, *optional*): The training step the figures belong to.
    """
    checks = []
    for item in settings.get("thresholds") or []:
        name, op, threshold = split_threshold(item)
        value = (heldout or {}).get(name[len(PREFIX) :])
        value = float(value) if isinstance(value, (int, float)) else None
        checks.append(
            {
                "name": name,
                "op": op,
                "threshold": threshold,
                "value": value,
                "passed": value is not None and compare(value, op, threshold),
            }
        )
    if settings.get("check"):
        fraction = (check or {}).get("pass_fraction")
        entry = {
            "name": settings["check"],
            "op": ">=",
            "threshold": float(settings["min_pass"]),
            "value": fraction,
            "passed": fraction is not None and compare(fraction, ">=", float(settings["min_pass"])),
            "num_answers": (check or {}).get("num_answers"),
        }
        checks.append(entry)
    return {"evaluated": True, "passed": all(c["passed"] for c in checks), "step": step, "checks": checks}


def rejudge(record: Mapping, heldout: Mapping[str, float]) -> dict[str, Any]:
    """`record` with its thresholds judged on `heldout` instead (figures measured outside the trainer, which the
    receipt records): the check's recorded result is kept. A record that was not evaluated is returned as it is."""
    result = record.get("result") or {}
    if not result.get("evaluated"):
        return dict(record)
    settings = record.get("settings") or {}
    check = next((c for c in result.get("checks") or [] if c.get("name") == settings.get("check")), {})
    check = {"pass_fraction": check.get("value"), "num_answers": check.get("num_answers")}
    return {**record, "result": evaluate_gate(settings, heldout, check, step=result.get("step"))}


def not_evaluated(step: int | None = None) -> dict[str, Any]:
    """The `result` of a gate that was not evaluated on the saved weights (it never passes)."""
    return {"evaluated": False, "passed": False, "step": step, "checks": []}


def gate_failures(record: Mapping) -> list[str]:
    """One line per failed check of a gate record ('name = value (must be op threshold)'); empty when it passed."""
    result = record.get("result") or {}
    if not result.get("evaluated"):
        return ["the gate was not evaluated on these weights (train first, or measure held-out figures at this step)"]
    lines = []
    for check in result.get("checks") or []:
        if check.get("passed"):
            continue
        value = "not measured" if check.get("value") is None else f"{check['value']:.6g}"
        answers = f" of {check['num_answers']} greedy answers" if check.get("num_answers") else ""
        lines.append(f"{check['name']} = {value}{answers} (must be {check['op']} {check['threshold']:.6g})")
    return lines


# ---- verifying a recorded gate --------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= _REL * max(abs(a), abs(b), 1)


def record_problems(
    stage: Mapping, heldout: Mapping[str, float] | None = None, where: str = "release gate"
) -> list[str]:
    """
    What is inconsistent in the stage's gate record (empty when consistent): settings that do not parse, checks that
    do not match the settings, a value that is not the recorded held-out figure, a pass/fail that does not follow from
    value and threshold, an overall verdict that does not follow from the checks, an override without a reason.

    Args:
        stage (`dict`): A receipt stage with a `release_gate` record.
        heldout (`dict`, *optional*): Figures to judge the thresholds on instead of the recorded ones (`--replay`
            passes the recomputed figures; the recorded verdict must then still follow).
    """
    record = stage.get("release_gate")
    if not isinstance(record, Mapping):
        return [f"{where}: the record is not an object"]
    settings, result = record.get("settings") or {}, record.get("result") or {}
    try:
        thresholds = parse_release_gate(settings.get("thresholds"), field="release_gate")
    except (TypeError, ValueError) as error:
        return [f"{where}: recorded thresholds do not parse ({error})"]
    if settings.get("check") and not (
        isinstance(settings.get("min_pass"), (int, float)) and 0 <= settings["min_pass"] <= 1
    ):
        return [f"{where}: recorded `min_pass` {settings.get('min_pass')!r} is not a number in [0, 1]"]
    override = record.get("override")
    if override and not (
        isinstance(override, Mapping) and isinstance(override.get("reason"), str) and override["reason"].strip()
    ):
        return [f"{where}: the override has no reason ({override!r})"]
    if not result.get("evaluated"):
        return [f"{where}: recorded as passed but not evaluated"] if result.get("passed") else []
    figures = heldout if heldout is not None else ((stage.get("results") or {}).get("heldout") or {})
    check_entry = next((c for c in result.get("checks") or [] if c.get("name") == settings.get("check")), None)
    expected = evaluate_gate(
        gate_settings(thresholds, settings.get("check"), settings.get("min_pass") or 0.0),
        figures,
        {"pass_fraction": (check_entry or {}).get("value"), "num_answers": (check_entry or {}).get("num_answers")},
    )
    recorded = result.get("checks") or []
    problems = []
    if [c.get("name") for c in recorded] != [c["name"] for c in expected["checks"]]:
        problems.append(
            f"{where}: recorded checks {[c.get('name') for c in recorded]} are not the configured ones "
            f"{[c['name'] for c in expected['checks']]}"
        )
        return problems
    source = "the recomputed" if heldout is not None else "the recorded"
    for have, want in zip(recorded, expected["checks"]):
        name = have["name"]
        if have.get("op") != want["op"] or not _same(have.get("threshold"), want["threshold"]):
            problems.append(
                f"{where}: {name} is recorded against {have.get('op')} {have.get('threshold')}, the "
                f"settings say {want['op']} {want['threshold']}"
            )
        if name.startswith(PREFIX) and heldout is None and not _same(have.get("value"), want["value"]):
            problems.append(
                f"{where}: {name} is recorded as {have.get('value')}, {source} held-out figure is {want['value']}"
            )
        if bool(have.get("passed")) != want["passed"]:
            verdict = "passed" if have.get("passed") else "failed"
            problems.append(
                f"{where}: {name} is recorded as {verdict}, but {want['value']} {want['op']} "
                f"{want['threshold']} on {source} figures is {want['passed']}"
            )
    if bool(result.get("passed")) != expected["passed"]:
        problems.append(
            f"{where}: recorded as {'passed' if result.get('passed') else 'failed'}, but its checks "
            f"{'all pass' if expected['passed'] else 'do not all pass'}"
        )
    return problems


def check_gate_settings(config) -> None:
    """Validate a config's `release_gate*` fields now, not after training (called by `DistillConfig.__post_init__`):
    `release_gate` parsed in place, `release_gate_check` imported, errors naming the field, warnings for a bound on
    the wrong side and an ignored `release_gate_min_pass`."""
    config.release_gate = parse_release_gate(config.release_gate, field="release_gate")
    for item in wrong_direction(config.release_gate):
        warnings.warn(
            f"`release_gate` entry {item!r} bounds the figure on the side where it improves (lower KL and "
            "perplexity, higher agreement are better): a better student would fail it. Flip the operator if this "
            "is a typo.",
            UserWarning,
            stacklevel=4,
        )
    if config.release_gate and not config.heldout_eval:
        raise ValueError(
            f"`release_gate={config.release_gate}` is judged on the held-out figures, which `heldout_eval=False` "
            "turns off. Set `heldout_eval=True` (and pass a teacher and an `eval_dataset`), or drop "
            "`release_gate`."
        )
    if config.release_gate_check is not None:
        load_release_check(config.release_gate_check, field="release_gate_check")  # import now, not after training
    minimum = config.release_gate_min_pass
    if isinstance(minimum, bool) or not (isinstance(minimum, (int, float)) and 0.0 <= minimum <= 1.0):
        raise ValueError(
            f"`release_gate_min_pass` must be a number in [0, 1] (the fraction of answers `release_gate_check` "
            f"must pass), got {minimum!r}."
        )
    if config.release_gate_check is None and minimum != 1.0:
        warnings.warn(
            f"`release_gate_min_pass={minimum}` is ignored because `release_gate_check` is not set.",
            UserWarning,
            stacklevel=4,
        )
    if config.release_gate_override is not None and not (
        isinstance(config.release_gate_override, str) and config.release_gate_override.strip()
    ):
        raise ValueError(
            f"`release_gate_override` must be a non-empty reason (it is recorded in the receipt), got "
            f"{config.release_gate_override!r}."
        )
