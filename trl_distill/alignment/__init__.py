"""Vocabulary checks and character-offset alignment of two tokenizations. Imports tokenizers/transformers/torch only."""

from .offsets import (
    AlignedBatch,
    TokenizedText,
    align_batch,
    align_tokens,
    decode_with_offsets,
    encode_like,
    shared_token_pairs,
)
from .vocab import VOCAB_MISMATCH_MESSAGE, shared_vocab_size


__all__ = [
    "VOCAB_MISMATCH_MESSAGE",
    "AlignedBatch",
    "TokenizedText",
    "align_batch",
    "align_tokens",
    "decode_with_offsets",
    "encode_like",
    "shared_token_pairs",
    "shared_vocab_size",
]
