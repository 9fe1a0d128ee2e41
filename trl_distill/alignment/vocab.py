"""Shared-vocabulary check for token-level KD."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


VOCAB_MISMATCH_MESSAGE = "teacher and student tokenizers must share a vocabulary for token-level KD"

_HINT = (
    "Token-level KD compares the two next-token distributions entry by entry, which is only meaningful when token id i "
    "means the same string for both models. For teacher/student pairs with different tokenizers use cross-tokenizer "
    'distillation (ULD, `distill_mode="uld"`: character-offset alignment and sorted top-k matching) or sequence-level '
    'KD (`distill_mode="sequence"`: the student is fine-tuned on the teacher\'s generated text).'
)


def _vocab(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"Expected a tokenizer with `get_vocab()`, got {type(tokenizer).__name__}.")
    return tokenizer.get_vocab()


def shared_vocab_size(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase) -> int:
    """Check that two tokenizers map every token string to the same id, and return the vocabulary size.

    The size is `max id + 1`: the number of leading `lm_head` rows that are real tokens. Rows past it (embedding padding,
    as in Qwen2.5 models whose sizes pad the embeddings differently) are excluded from the distributions.

    Raises:
        ValueError: `teacher and student tokenizers must share a vocabulary for token-level KD`, followed by what
            differs and a hint naming ULD and sequence-level KD.
    """
    student_vocab = _vocab(student_tokenizer)
    if teacher_tokenizer is not student_tokenizer:
        teacher_vocab = _vocab(teacher_tokenizer)
        if student_vocab != teacher_vocab:
            differing = sorted(
                tok
                for tok in student_vocab.keys() | teacher_vocab.keys()
                if student_vocab.get(tok) != teacher_vocab.get(tok)
            )
            examples = ", ".join(
                f"{tok!r}: student {student_vocab.get(tok)} / teacher {teacher_vocab.get(tok)}"
                for tok in differing[:3]
            )
            raise ValueError(
                f"{VOCAB_MISMATCH_MESSAGE}. The student's tokenizer has {len(student_vocab)} tokens and the teacher's "
                f"{len(teacher_vocab)}; {len(differing)} token strings map to different ids (e.g. {examples}). {_HINT}"
            )
    if not student_vocab:
        raise ValueError("The student's tokenizer has an empty vocabulary.")
    return max(student_vocab.values()) + 1
