"""Character-offset alignment of two tokenizations of the same text (cross-tokenizer distillation, ULD).

The student's token ids are turned back into text, the teacher's tokenizer encodes that text, and each student token
is paired with a teacher token by where their character spans end. Every offset here is a character offset into the
same Python `str`, on both sides: never byte offsets of one tokenizer against character offsets of the other, so
accented letters, non-Latin scripts and emoji (one character, several bytes, possibly several byte-level tokens) line
up exactly.

Special tokens (BOS, EOS, chat markers) have no characters. They are kept apart from the text: a student special
token is paired with the teacher's special token of the same role (`bos_token`, `eos_token`, ...) inserted at the same
character position, or with nothing when the teacher has no such role. The teacher also gets the prefix its own
tokenizer adds by default (e.g. Llama's BOS), whether or not the student's tokenizer adds one.

Pairing rule (issue 4): a student token that ends at character `e` is paired with the last non-special teacher token
ending at or before `e`. That is the teacher token ending closest to `e` inside the student token's span when there is
one, and otherwise the nearest earlier teacher token (when a teacher token runs past the student token's end). The
distributions compared are the ones that *produce* the paired tokens: the student's at position `j - 1` and the
teacher's at position `i - 1`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase


# Roles matched between the two tokenizers' special tokens, most specific first (`pad` is often the EOS string).
_ROLES = ("bos_token", "eos_token", "sep_token", "cls_token", "mask_token", "pad_token", "unk_token")


@dataclass
class TokenizedText:
    """One tokenization of a text: ids, character spans `[start, end)` and which tokens are special (no characters).

    Attributes:
        ids (`list[int]`): token ids.
        spans (`list[tuple[int, int]]`): character span of each token in `text`; special tokens are empty spans
            `(c, c)` at the position where they sit.
        roles (`list[str | None]`): `None` for text tokens; for special tokens their role (`"eos_token"`, ...) or,
            for a special token without a role (e.g. a chat marker), its string.
        text (`str`): the text the spans index into.
    """

    ids: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    roles: list[str | None] = field(default_factory=list)
    text: str = ""

    def _extend(self, ids, spans, roles) -> None:
        self.ids.extend(ids)
        self.spans.extend(spans)
        self.roles.extend(roles)


def special_role(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """The role of a special token (`"bos_token"`, `"eos_token"`, ...), or its string when it has none."""
    for role in _ROLES:
        if getattr(tokenizer, f"{role}_id", None) == token_id:
            return role
    return tokenizer.convert_ids_to_tokens(token_id)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _run_spans(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode a run of non-special ids and give each token its character span in the decoded text."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) == list(ids):
        return text, [tuple(span) for span in encoded["offset_mapping"]]
    # Re-encoding gives other ids (a row truncated mid-word, a tokenizer whose decode is not its encode's inverse):
    # fall back to decoding prefixes. A token ending inside a multi-byte character (its prefix decodes to U+FFFD)
    # ends where the last complete character ends. Quadratic in the run length, so only used when needed.
    spans, end = [], 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        new_end = max(end, _common_prefix(prefix, text))
        spans.append((end, new_end))
        end = new_end
    return text, spans


def decode_with_offsets(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> TokenizedText:
    """Turn token ids back into text, with each token's character span; special tokens become empty spans.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer the ids come from (a fast tokenizer: offsets are needed).
        ids (`list[int]`): one row of token ids, without padding.

    Returns:
        [`TokenizedText`]: `text` is the concatenated decoded text of the non-special tokens.
    """
    special = set(tokenizer.all_special_ids)
    out, pieces, start, run = TokenizedText(), [], 0, []

    def flush():
        nonlocal start
        if run:
            text, spans = _run_spans(tokenizer, run)
            out._extend(run, [(start + a, start + b) for a, b in spans], [None] * len(run))
            pieces.append(text)
            start += len(text)
            run.clear()

    for token_id in ids:
        token_id = int(token_id)
        if token_id in special:
            flush()
            out._extend([token_id], [(start, start)], [special_role(tokenizer, token_id)])
        else:
            run.append(token_id)
    flush()
    out.text = "".join(pieces)
    return out


def _default_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special ids the tokenizer puts before the text by default (e.g. Llama's BOS); usually none."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def encode_like(
    source: TokenizedText, tokenizer: PreTrainedTokenizerBase, *, prefix: list[int] | None = None
) -> tuple[TokenizedText, dict[int, int]]:
    """Tokenize `source.text` with another tokenizer, putting its special tokens where `source` has them.

    The text between two special tokens of `source` is encoded on its own (tokenizers never merge across a special
    token either); each special token of `source` becomes the tokenizer's token of the same role, or is dropped when
    the tokenizer has none. The tokenizer's default prefix (e.g. a BOS) is added unless `source` starts with it.

    Args:
        source ([`TokenizedText`]): the other tokenization (from [`decode_with_offsets`]).
        tokenizer (`PreTrainedTokenizerBase`): the fast tokenizer to encode with.
        prefix (`list[int]`, *optional*): the tokenizer's default prefix ids, when already known (computed otherwise).

    Returns:
        `(tokenized, special_pairs)`: the [`TokenizedText`] and, for each special token of `source` that has a
        counterpart, `source index -> tokenized index`.
    """
    out, pairs = TokenizedText(text=source.text), {}
    prefix = _default_prefix(tokenizer) if prefix is None else prefix
    first_role = source.roles[0] if source.roles else None
    if prefix and not (first_role is not None and special_role(tokenizer, prefix[0]) == first_role):
        out._extend(prefix, [(0, 0)] * len(prefix), [special_role(tokenizer, i) for i in prefix])

    def encode(start: int, end: int):
        if end > start:
            encoded = tokenizer(source.text[start:end], add_special_tokens=False, return_offsets_mapping=True)
            spans = [(start + a, start + b) for a, b in encoded["offset_mapping"]]
            out._extend(list(encoded["input_ids"]), spans, [None] * len(spans))

    cursor = 0
    for index, (role, (position, _)) in enumerate(zip(source.roles, source.spans)):
        if role is None:
            continue
        encode(cursor, position)
        cursor = position
        counterpart = getattr(tokenizer, f"{role}_id", None) if role in _ROLES else None
        if counterpart is not None:
            pairs[index] = len(out.ids)
            out._extend([counterpart], [(position, position)], [role])
    encode(cursor, len(source.text))
    return out, pairs


def align_tokens(student: TokenizedText, teacher: TokenizedText, special_pairs: dict[int, int]) -> list[int]:
    """For each student token, the index of its paired teacher token, or -1 (see the module docstring for the rule).

    Text tokens pair with the last teacher text token ending at or before their end; special tokens pair through
    `special_pairs` (from [`encode_like`]) or not at all.
    """
    text_index = [i for i, role in enumerate(teacher.roles) if role is None]
    ends = [teacher.spans[i][1] for i in text_index]  # non-decreasing: offsets follow the text
    pairs = []
    for j, (role, (_, end)) in enumerate(zip(student.roles, student.spans)):
        if role is not None:
            pairs.append(special_pairs.get(j, -1))
            continue
        k = bisect.bisect_right(ends, end) - 1
        pairs.append(text_index[k] if k >= 0 else -1)
    return pairs


@dataclass
class AlignedBatch:
    """A student batch re-tokenized for the teacher, and the position pairs the ULD loss compares.

    Attributes:
        teacher_input_ids (`torch.LongTensor` of shape `(B, T_t)`): right-padded teacher ids.
        teacher_attention_mask (`torch.LongTensor` of shape `(B, T_t)`).
        rows (`torch.LongTensor` of shape `(N,)`): batch row of each student response token (label != -100, j >= 1).
        student_positions (`torch.LongTensor` of shape `(N,)`): position `j - 1` whose logits predict token `j`.
        teacher_positions (`torch.LongTensor` of shape `(N,)`): position `i - 1` whose logits predict the paired
            teacher token `i`; 0 where there is none.
        aligned (`torch.BoolTensor` of shape `(N,)`): whether the token has a teacher partner.
    """

    teacher_input_ids: torch.Tensor
    teacher_attention_mask: torch.Tensor
    rows: torch.Tensor
    student_positions: torch.Tensor
    teacher_positions: torch.Tensor
    aligned: torch.Tensor


def align_batch(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    teacher_max_length: int | None = None,
) -> AlignedBatch:
    """Re-tokenize a student batch for the teacher and pair every student response token with a teacher position.

    Args:
        student_tokenizer, teacher_tokenizer (`PreTrainedTokenizerBase`): fast tokenizers (character offsets).
        input_ids (`torch.LongTensor` of shape `(B, T)`): the student's ids.
        attention_mask (`torch.LongTensor` of shape `(B, T)`, *optional*): 1 on real tokens (any padding side).
        labels (`torch.LongTensor` of shape `(B, T)`): -100 outside the response; the response tokens are the ones
            distilled.
        teacher_max_length (`int`, *optional*): the teacher's sequences are cut to this many tokens (keeping the
            start); student tokens paired with a cut teacher token get no partner.

    Returns:
        [`AlignedBatch`] (tensors on CPU).
    """
    batch, teacher_rows = [], []
    prefix = _default_prefix(teacher_tokenizer)
    for b in range(input_ids.shape[0]):
        keep = torch.ones_like(input_ids[b], dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        positions = keep.nonzero().squeeze(-1).tolist()
        student = decode_with_offsets(student_tokenizer, input_ids[b, positions].tolist())
        teacher, special_pairs = encode_like(student, teacher_tokenizer, prefix=prefix)
        pairs = align_tokens(student, teacher, special_pairs)
        limit = len(teacher.ids) if teacher_max_length is None else min(teacher_max_length, len(teacher.ids))
        teacher_rows.append(teacher.ids[:limit])
        row_labels = labels[b, positions].tolist()
        for j in range(1, len(positions)):
            if row_labels[j] == -100:
                continue
            i = pairs[j]
            ok = 1 <= i < limit
            batch.append((b, positions[j - 1], i - 1 if ok else 0, ok))

    pad = teacher_tokenizer.pad_token_id
    pad = pad if pad is not None else (teacher_tokenizer.eos_token_id or 0)
    width = max((len(r) for r in teacher_rows), default=0)
    teacher_ids = torch.full((len(teacher_rows), max(width, 1)), pad, dtype=torch.long)
    teacher_mask = torch.zeros_like(teacher_ids)
    for b, row in enumerate(teacher_rows):
        teacher_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        teacher_mask[b, : len(row)] = 1
    columns = list(zip(*batch)) if batch else [(), (), (), ()]
    return AlignedBatch(
        teacher_ids,
        teacher_mask,
        torch.tensor(columns[0], dtype=torch.long),
        torch.tensor(columns[1], dtype=torch.long),
        torch.tensor(columns[2], dtype=torch.long),
        torch.tensor(columns[3], dtype=torch.bool),
    )


def shared_token_pairs(
    student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher ids of the tokens whose surface string exists in both vocabularies (`uld_exact_match`).

    The surface string of a token is what it adds to the text after another token (so that a SentencePiece "▁the"
    and a byte-level "Ġthe" both read `" the"`). Special tokens, tokens holding part of a multi-byte character and
    strings that two ids of one tokenizer share are left out.

    Returns:
        `(student_ids, teacher_ids)`: two `torch.LongTensor` of the same length `M`, sorted by student id.
    """
    student, teacher = _surfaces(student_tokenizer), _surfaces(teacher_tokenizer)
    pairs = sorted((sid, teacher[text]) for text, sid in student.items() if text in teacher)
    if not pairs:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    ids = torch.tensor(pairs, dtype=torch.long)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


def _surfaces(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Surface string -> id for the tokenizer's unambiguous text tokens."""
    anchor_ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    anchor = tokenizer.decode(anchor_ids, clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in sorted(set(tokenizer.get_vocab().values())) if i not in special]
    decoded = tokenizer.batch_decode([anchor_ids + [i] for i in ids], clean_up_tokenization_spaces=False)
    found: dict[str, int] = {}
    ambiguous = set()
    for token_id, text in zip(ids, decoded):
        if not text.startswith(anchor) or "\ufffd" in text or len(text) == len(anchor):
            continue
        surface = text[len(anchor) :]
        if surface in found:
            ambiguous.add(surface)
        found[surface] = token_id
    return {text: token_id for text, token_id in found.items() if text not in ambiguous}
