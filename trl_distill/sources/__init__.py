"""Where a step's completions come from (the third knob): the dataset, the student's samples, or teacher text.

[`CompletionSource`] swaps generated completions into a window's batches (`lmbda > 0`: on-policy, GKD;
`seq_kd=True`: fresh teacher generations). The dataset's own completions need no source. See
[`trl_distill.modes`] for how sources, modes and terms fit together.
"""

from .completions import (
    CompletionSource,
    check_prompt_column,
    completion_batch,
    completion_starts,
    on_policy_coin,
    sampling_seed,
)


__all__ = [
    "CompletionSource",
    "check_prompt_column",
    "completion_batch",
    "completion_starts",
    "on_policy_coin",
    "sampling_seed",
]
