"""What is matched: distillation modes, one module each, found by name through a registry.

How the pieces fit (the README's three knobs, and where each lives in the package):

| knob | package | what plugs in | chosen by |
|---|---|---|---|
| what is matched | `modes/` | a `DistillMode` subclass, `@register_mode(name)` | `distill_mode` |
| how the gap is measured | `losses/` | pure torch functions a mode calls | `objective`, `kd_temperature`, ... |
| where the samples come from | `sources/` | `CompletionSource` | `lmbda`, `seq_kd` |
| where the teacher's side comes from | `teachers/` | live model; a store via `for_teacher_cache()` | `teacher_cache` |
| extra terms beside the loss | `terms/` | `FeatureTerm` in `ModeContext.feature_term` | `feature_weight` |

- A **mode** (e.g. `token`, `uld`, `sequence`, or one of your own) turns a batch into a loss. It is built from a
  [`ModeContext`] (args, student, teacher, both tokenizers, vocabulary size, tokenized datasets, a [`MetricsSink`],
  the extra terms), never from the trainer. Its class declares what it needs and supports (`requires_teacher`,
  `requires_shared_vocab`, `supports_feature_term`, `supports_generated_completions`), its config checks
  (`validate_config`), and how receipts name it (`label`, `describe(args)`, `papers`).
- An offline **teacher source** (`teacher_cache`) is the same objective with the teacher's targets read from a store:
  the mode names that variant in `for_teacher_cache()` (`TokenMode` -> `OfflineTokenMode`), and the trainer builds it
  instead (`resolve_mode`). Modes without one are refused with `teacher_cache`. A sampled store
  (`teacher_cache_kind="sampled"`) is served by `for_sampled_teacher_cache()` (`TokenMode` ->
  `SampledOfflineTokenMode`).
- A **completion source** replaces the batch's completions before the loss (on-policy student samples, fresh teacher
  text); modes are unaware of it and only declare `supports_generated_completions`.
- An **extra term** (feature KD) is built by the trainer and handed to the mode in the context; a mode with
  `supports_feature_term = True` adds it to its loss.

Extending it:

- a new mode (e.g. MiniLLM's policy-gradient reverse KL, context distillation) is a registered `DistillMode`
  subclass with `compute_loss`, reading only its `ModeContext`; new config fields it needs are checked in its
  `validate_config`, and it names itself with `label` / `describe(args)` / `papers`;
- a new top-k teacher source (a served teacher over HTTP, a store of sampled positions) subclasses
  [`OfflineTokenMode`] and overrides `open_teacher_targets(context)` to return an object with
  `targets(inputs, top_k) -> TopKTargets`; the mode that should use it returns that class from its
  `for_teacher_cache()` (or a sibling hook chosen by the new config field, added to `resolve_mode`);
- a new completion source goes in `sources/` and is wired in `DistillTrainer.get_batch_samples`; modes that can score
  it set `supports_generated_completions`.
"""

from .base import DistillMode, available_modes, get_mode, register_mode, resolve_mode
from .context import MetricsSink, ModeContext
from .context_distill import ContextDistillMode
from .minillm import MiniLLMMode
from .sequence import SequenceMode
from .token import TokenMode
from .token_offline import OfflineTokenMode
from .token_sampled import SampledOfflineTokenMode
from .uld import ULDMode


__all__ = [
    "ContextDistillMode",
    "DistillMode",
    "MetricsSink",
    "MiniLLMMode",
    "ModeContext",
    "OfflineTokenMode",
    "SampledOfflineTokenMode",
    "SequenceMode",
    "TokenMode",
    "ULDMode",
    "available_modes",
    "get_mode",
    "register_mode",
    "resolve_mode",
]
