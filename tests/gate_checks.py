"""Release-gate check functions for tests/test_gate.py, imported by path (`tests.gate_checks:name`)."""

CALLS: list[dict] = []


def always_passes(prompt, completion) -> bool:
    """Per-answer form: `(prompt, completion) -> bool`."""
    return True


def never_passes(prompts, completions) -> list[bool]:
    """Batch form: `(prompts, completions) -> one bool per answer`."""
    return [False] * len(completions)


def every_other(prompts, completions) -> list[float]:
    """Passes answers 0, 2, 4, ...: a pass fraction of one half on an even number of prompts."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def recorded(prompts, completions, references) -> list[bool]:
    """Records what it is called with (the test compares it with the student's own greedy answers)."""
    CALLS.append({"prompts": list(prompts), "completions": list(completions), "references": list(references)})
    return [True] * len(completions)


NOT_A_FUNCTION = 3
