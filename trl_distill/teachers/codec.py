"""The 4-bytes-per-entry encoding of a teacher's top-k targets (pure torch).

One position's targets are the teacher's k most likely token ids, their log-probabilities at the loss temperature, and
the log-probability of the "other" bucket (everything else). They are stored as `k + 1` 32-bit words, `4 * (k + 1)`
bytes (k = 64: 260 bytes per position):

- each of the first k words holds a token id in its low `id_bits = ceil(log2(V))` bits (10 for V = 1000, 18 for
  Qwen's V = 151936) and, in the remaining `32 - id_bits` bits (22, resp. 14), the code
  `round(M * sqrt(-log p / scale))` with `M = 2**(32 - id_bits) - 1`;
- the last word is the row header: the row's `scale` in its top 8 bits (`scale = 2**((c - 128) / 16)`, the smallest
  such value at least the largest `-log p` of the row's k entries, at most 245: entries below `exp(-245)` are stored
  as `exp(-245)`, which changes no loss), and `x = -log p_other` in the low 24 bits as code `c`:
  - `c < 3 * 2**22`: fixed point, `x = c * 88 / (2**24 - 1)` (step 5.2e-6, `x < 66`);
  - `3 * 2**22 <= c < 2**24 - 1`: logarithmic, `x = 66 * 2**((c - 3 * 2**22) / 2**16)` (relative step 1.1e-5, up to
    `x ~ 1.2e21`), so a bucket far below float32's smallest probability keeps its log-mass (the losses work in log
    space; nothing is clamped at `exp(-88)`);
  - `c = 2**24 - 1`: `x = inf`, an empty bucket (`p_other = 0`, e.g. a masked vocabulary).
  Stores written before the logarithmic range existed used the fixed point up to `x = 88`: they decode identically
  below `x = 66` (`p_other > 2e-29`), and above it to a smaller `p_other`, which changes no loss.

Why a square root of the log-probability: the loss needs every probability with a small *relative* error (reverse KL
and the JSD divide by the teacher's probabilities), so the log-probability is quantized rather than the probability.
The square root spends the codes where the probability mass is: near `log p = 0` the step in `log p` is
`~ scale / M**2`, at the row's smallest entry it is `~ 2 * scale / M`. With 14 bits and `scale = 20` the relative
error of a probability is at most 6e-5 where `p > 0.1` and 6e-4 at `p ~ 2e-9`, where it no longer matters to the loss.
"""

from __future__ import annotations

import torch

from ..losses import TopKTargets


ENTRY_BITS = 32
MIN_LOG_PROB_BITS = 12
_OTHER_BITS = 24
_OTHER_STEP = 88.0 / ((1 << _OTHER_BITS) - 1)  # fixed-point step of -log p_other (the original format's)
_OTHER_LOG_START = 3 << 22  # first logarithmic code; below it, fixed point (x < 66)
_OTHER_LOG_BASE = _OTHER_LOG_START * _OTHER_STEP  # x at the first logarithmic code (66.000004): continuous
_OTHER_LOG_STEPS = 1 << 16  # logarithmic codes per doubling of x
_OTHER_INF = (1 << _OTHER_BITS) - 1  # p_other = 0
_SCALE_OFFSET, _SCALE_STEPS = 128, 16  # scale = 2 ** ((c - 128) / 16), c in [0, 255]: 2**-8 .. 2**7.94


def id_bits(vocab_size: int) -> int:
    """Bits needed for a token id below `vocab_size` (at least 1)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"`vocab_size` must be an integer >= 2, got {vocab_size!r}.")
    return max(1, (vocab_size - 1).bit_length())


def log_prob_bits(vocab_size: int) -> int:
    """Bits left for the quantized log-probability once the id is packed into a 32-bit entry."""
    bits = ENTRY_BITS - id_bits(vocab_size)
    if bits < MIN_LOG_PROB_BITS:
        raise ValueError(
            f"A vocabulary of {vocab_size} tokens needs {id_bits(vocab_size)} bits per id, leaving {bits} < "
            f"{MIN_LOG_PROB_BITS} bits for the log-probability in a 32-bit entry; vocabularies up to "
            f"{2 ** (ENTRY_BITS - MIN_LOG_PROB_BITS)} tokens are supported."
        )
    return bits


def bytes_per_position(top_k: int) -> int:
    """Stored bytes per response position: k entries and the row header, 4 bytes each."""
    return 4 * (top_k + 1)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (in int64) reinterpreted as int32, the dtype they are stored in."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _scale(code: torch.Tensor) -> torch.Tensor:
    return torch.exp2((code.float() - _SCALE_OFFSET) / _SCALE_STEPS)


def encode(targets: TopKTargets, vocab_size: int) -> torch.Tensor:
    """Pack top-k targets into `(N, k + 1)` int32 words (the unsigned words reinterpreted as signed).

    Args:
        targets ([`~trl_distill.losses.TopKTargets`]): `ids` `(N, k)` in `[0, vocab_size)` and `log_probs` `(N, k + 1)`
            (the last column is the "other" bucket), at the loss temperature.
        vocab_size (`int`): the vocabulary the ids come from (sets the bit split).
    """
    ids, log_probs = targets
    ibits, vbits = id_bits(vocab_size), log_prob_bits(vocab_size)
    # Entries below exp(-245) (the largest scale; -inf for a masked token) are stored at the largest scale.
    top = (-log_probs[:, :-1].float()).clamp(0.0, float(_scale(torch.tensor(255))))
    largest = top.amax(-1)
    scale_code = torch.ceil(torch.log2(largest.clamp_min(2.0**-8)) * _SCALE_STEPS).long() + _SCALE_OFFSET
    scale_code += (_scale(scale_code) < largest).long()  # float rounding: every entry must fit under the scale
    scale_code.clamp_(0, 255)
    levels = (1 << vbits) - 1
    codes = torch.round(torch.sqrt(top / _scale(scale_code)[:, None]).clamp_(max=1.0) * levels).long()
    words = (codes << ibits) | ids.long()
    header = (scale_code << _OTHER_BITS) | _encode_other(-log_probs[:, -1].float())
    return _as_int32(torch.cat([words, header[:, None]], dim=-1))


def decode(entries: torch.Tensor, vocab_size: int) -> TopKTargets:
    """Unpack `(N, k + 1)` words from [`encode`] into `TopKTargets` (int64 ids, float32 log-probabilities)."""
    ibits, vbits = id_bits(vocab_size), log_prob_bits(vocab_size)
    words = entries.long() & 0xFFFFFFFF
    top, header = words[:, :-1], words[:, -1:]
    ids = top & ((1 << ibits) - 1)
    fraction = (top >> ibits).float() / float((1 << vbits) - 1)
    other = _decode_other(header & ((1 << _OTHER_BITS) - 1))
    log_probs = torch.cat([-_scale(header >> _OTHER_BITS) * fraction.square(), -other], dim=-1)
    return TopKTargets(ids, log_probs)


def _encode_other(x: torch.Tensor) -> torch.Tensor:
    """24-bit code of `x = -log p_other` (see the module docstring): fixed point, then logarithmic, then infinity."""
    x = x.clamp_min(0.0)
    fixed = torch.round(x.clamp(max=_OTHER_LOG_BASE) / _OTHER_STEP).long()
    log_steps = torch.log2(x.clamp_min(_OTHER_LOG_BASE) / _OTHER_LOG_BASE) * _OTHER_LOG_STEPS
    logarithmic = torch.round(log_steps.clamp(max=_OTHER_INF - 1 - _OTHER_LOG_START)).long() + _OTHER_LOG_START
    code = torch.where(x < _OTHER_LOG_BASE, fixed, logarithmic)
    return code.masked_fill(torch.isposinf(x), _OTHER_INF)


def _decode_other(code: torch.Tensor) -> torch.Tensor:
    """`x = -log p_other` from its 24-bit code (float32)."""
    fixed = code.float() * _OTHER_STEP
    logarithmic = _OTHER_LOG_BASE * torch.exp2((code - _OTHER_LOG_START).clamp_min(0).float() / _OTHER_LOG_STEPS)
    x = torch.where(code < _OTHER_LOG_START, fixed, logarithmic)
    return x.masked_fill(code == _OTHER_INF, float("inf"))


def fold(targets: TopKTargets, top_k: int) -> TopKTargets:
    """Keep the first `top_k` entries (the ids are sorted by decreasing probability) and add the rest to "other".

    Exact: the teacher's top-`top_k` are the first `top_k` of its top-k, and the new bucket is the old one plus the
    dropped entries (summed in log space).
    """
    ids, log_probs = targets
    if top_k >= ids.shape[-1]:
        return targets
    other = torch.logsumexp(log_probs[:, top_k:], dim=-1, keepdim=True)
    return TopKTargets(ids[:, :top_k], torch.cat([log_probs[:, :top_k], other], dim=-1))
