"""Moved: the on-policy / `seq_kd` completion source is [`trl_distill.sources.completions`] (it is not a mode)."""

from ..sources.completions import (  # noqa: F401
    CompletionSource,
    check_prompt_column,
    completion_batch,
    completion_starts,
    on_policy_coin,
)
