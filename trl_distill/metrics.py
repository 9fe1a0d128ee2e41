"""The project's metrics as in-package `evaluate` modules, so they work offline.

`evaluate.load("perplexity")` fetches a script from the Hub and fails offline; these `evaluate.Metric` subclasses are
instantiated directly and need nothing but the package:

```python
from trl_distill.metrics import TeacherStudentGap, TokenPerplexity

metric = TokenPerplexity()
metric.add_batch(nll=[2.1, 0.3])        # per-token negative log-likelihoods of the gold tokens, one batch at a time
metric.compute()                        # {"perplexity": ..., "mean_nll": ..., "num_tokens": 2}
```

Both aggregate per-token values (computed by [`trl_distill.evaluation.heldout_metrics`]) as float64 means over all the
tokens added, pooled over batches: a long completion weighs more than a short one, as in the training loss.
"""

from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np


__all__ = ["TeacherStudentGap", "TokenPerplexity"]

_CITATION_SPECULATIVE = (
    "@inproceedings{leviathan2023fast,\n  title={Fast Inference from Transformers via Speculative Decoding},\n"
    "  author={Leviathan, Yaniv and Kalman, Matan and Matias, Yossi},\n  booktitle={ICML},\n  year={2023},\n"
    "  eprint={arXiv:2211.17192}\n}"
)


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


class TokenPerplexity(evaluate.Metric):
    """
    Perplexity from per-token negative log-likelihoods: `exp(mean(nll))`.

    Inputs (`add_batch` / `compute` keyword):
        nll (`list[float]`): `-log p(gold token)` at each scored position, in nats.

    Returns:
        `dict` with `perplexity`, `mean_nll` and `num_tokens` (`perplexity` and `mean_nll` are NaN with no tokens).
    """

    def __init__(self, **kwargs):
        super().__init__(**{"keep_in_memory": True, **kwargs})

    def _info(self):
        return evaluate.MetricInfo(
            description="Perplexity exp(mean nll) over scored tokens, pooled over batches.",
            citation="",
            inputs_description="nll: per-token negative log-likelihood of the gold token, in nats.",
            features=datasets.Features({"nll": datasets.Value("float64")}),
            format="numpy",
        )

    def _compute(self, nll):
        mean_nll = _mean(nll)
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "num_tokens": int(np.size(nll))}


class TeacherStudentGap(evaluate.Metric):
    """
    How far a student's next-token distributions are from its teacher's, from per-position values.

    Inputs (`add_batch` / `compute` keywords), one value per scored position:
        kl_teacher_student (`list[float]`): KL(teacher‖student) = Σ_v p_t(v) log(p_t(v) / p_s(v)) (forward KL).
        kl_student_teacher (`list[float]`): KL(student‖teacher) (reverse KL).
        top1_agreement (`list[float]`): 1 where both argmaxes agree, else 0.
        acceptance_rate (`list[float]`): Σ_v min(p_t(v), p_s(v)) = 1 − TV(p_t, p_s), the probability that a token
            drafted by the student is accepted by the teacher in speculative sampling (Leviathan et al. 2023).

    Returns:
        `dict` with the mean of each input over all positions, and `num_tokens`.
    """

    _COLUMNS = ("kl_teacher_student", "kl_student_teacher", "top1_agreement", "acceptance_rate")

    def __init__(self, **kwargs):
        super().__init__(**{"keep_in_memory": True, **kwargs})

    def _info(self):
        return evaluate.MetricInfo(
            description="Mean per-position KL in both directions, top-1 agreement and speculative acceptance rate.",
            citation=_CITATION_SPECULATIVE,
            inputs_description="One float per scored position for each of: " + ", ".join(self._COLUMNS) + ".",
            features=datasets.Features({name: datasets.Value("float64") for name in self._COLUMNS}),
            format="numpy",
        )

    def _compute(self, kl_teacher_student, kl_student_teacher, top1_agreement, acceptance_rate):
        columns = (kl_teacher_student, kl_student_teacher, top1_agreement, acceptance_rate)
        result = {name: _mean(values) for name, values in zip(self._COLUMNS, columns)}
        result["num_tokens"] = int(np.size(kl_teacher_student))
        return result
