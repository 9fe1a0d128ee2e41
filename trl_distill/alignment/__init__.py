"""Vocabulary checks and (later) alignment of two tokenizations. Imports tokenizers/transformers only."""

from .vocab import VOCAB_MISMATCH_MESSAGE, shared_vocab_size


__all__ = ["VOCAB_MISMATCH_MESSAGE", "shared_vocab_size"]
