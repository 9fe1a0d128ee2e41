"""Cross-tokenizer distillation (ULD): offset alignment, the sorted-matching loss, and `distill_mode="uld"` end to end."""

import pytest
import torch

from tests import helpers
from tests.reference import per_token_loss
from tests.reference_uld import uld_reference
from trl_distill import DistillConfig, DistillTrainer
from trl_distill.alignment import align_batch, align_tokens, decode_with_offsets, encode_like, shared_token_pairs
from trl_distill.alignment.offsets import TokenizedText
from trl_distill.demo.tiny import build_tiny_model
from trl_distill.losses import distillation_loss, linear_uld_loss, uld_loss


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers: the demo's byte-level BPE (session fixture `tokenizer`) and a character-level one with a BOS prefix.


def build_char_tokenizer(alphabet: str, *, add_bos: bool = True):
    """One token per character (WordLevel over the alphabet), `<s>` prepended by default: a genuinely other scheme."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:?!'\néöü日本語🙂-"


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_char_tokenizer(ALPHABET)


# --------------------------------------------------------------------------------------------------------------------
# Alignment


def test_pairing_rule_on_hand_made_spans():
    # Student "he|llo|!" vs teacher "hello|!" and vs "h|el|lo!": text tokens pair with the last teacher text token
    # ending at or before their end; none -> -1.
    student = TokenizedText([10, 11, 12], [(0, 2), (2, 5), (5, 6)], [None, None, None], "hello!")
    coarse = TokenizedText([1, 2], [(0, 5), (5, 6)], [None, None], "hello!")
    fine = TokenizedText([9, 1, 2, 3], [(0, 0), (0, 1), (1, 3), (3, 6)], ["bos_token", None, None, None], "hello!")
    assert align_tokens(student, coarse, {}) == [-1, 0, 1]
    # "he" ends at 2: "h" (index 1, end 1); "llo" ends at 5: "el" (index 2, end 3; "lo!" runs past 5); "!" ends at
    # 6: "lo!" (index 3). The BOS (index 0, empty) is never the partner of a text token.
    assert align_tokens(student, fine, {}) == [1, 2, 3]


def test_decode_with_offsets_multibyte_and_specials(tokenizer):
    text = " héllo wörld 日本 🙂 ok"
    ids = [tokenizer.bos_token_id] + tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    row = decode_with_offsets(tokenizer, ids)
    assert row.text == text
    assert row.roles[0] == "bos_token" and row.roles[-1] == "eos_token"
    assert row.spans[0] == (0, 0) and row.spans[-1] == (len(text), len(text))
    # Character offsets of the same Python string: a byte-level token holding part of "🙂" spans that one character.
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    assert row.spans[1:-1] == [tuple(o) for o in offsets]
    emoji = text.index("🙂")
    assert {row.spans[j] for j, (a, b) in enumerate(row.spans) if a <= emoji < b} == {(emoji, emoji + 1)}


def test_decode_with_offsets_falls_back_on_truncated_rows(tokenizer):
    # A row cut inside a word re-encodes differently; a row cut inside a multi-byte character decodes to U+FFFD.
    ids = tokenizer(" leading")["input_ids"][1:]  # 'a', 'd', 'ing'
    row = decode_with_offsets(tokenizer, ids)
    assert row.text == "ading" and row.spans == [(0, 1), (1, 2), (2, 5)]
    cut = tokenizer("aé")["input_ids"][:-1]  # 'a' + the first byte of 'é'
    row = decode_with_offsets(tokenizer, cut)
    assert row.spans[0] == (0, 1) and row.spans[-1][1] == len(row.text)


@pytest.mark.parametrize(
    "text",
    [" café", "日本語", "🙂!", " leading spaces", "Question: what?\nAnswer: 3"],
)
def test_bpe_student_char_teacher_pairs(tokenizer, char_tokenizer, text):
    """Hand-checkable: with one teacher token per character, each student token pairs with the character it ends on."""
    student = decode_with_offsets(tokenizer, tokenizer(text)["input_ids"])
    teacher, special_pairs = encode_like(student, char_tokenizer)
    assert teacher.ids[0] == char_tokenizer.bos_token_id  # the teacher's own BOS, the student has none
    assert teacher.ids[1:] == char_tokenizer(text, add_special_tokens=False)["input_ids"]
    pairs = align_tokens(student, teacher, special_pairs)
    assert pairs == [end for _, end in student.spans]  # char c sits at teacher index c + 1 (after the BOS)


@pytest.mark.parametrize(
    "text, teacher_tokens, pairs",
    [
        # " " has no teacher token ending inside it ("Ġc" runs past it) and none earlier: no partner. "é" is two
        # byte-level tokens on the teacher side, both spanning that one character: it pairs with the last.
        (" café", ["<|bos|>", "Ġc", "a", "f", "Ã", "©", "<|eos|>"], [0, -1, 1, 2, 3, 5, 6]),
        (
            " 日本🙂",
            ["<|bos|>", "Ġ", "æ", "Ĺ", "¥", "æ", "ľ", "¬", "ð", "Ł", "Ļ", "Ĥ", "<|eos|>"],
            [0, 1, 4, 7, 11, 12],
        ),
    ],
)
def test_hand_checked_pairs_char_student_bpe_teacher(tokenizer, char_tokenizer, text, teacher_tokens, pairs):
    # Student: <s>, one token per character, </s>; teacher: the demo's byte-level BPE. The student's BOS and EOS
    # become the teacher's own (matched by role) at the same character positions.
    ids = char_tokenizer(text)["input_ids"] + [char_tokenizer.eos_token_id]
    student = decode_with_offsets(char_tokenizer, ids)
    assert student.text == text and student.roles[0] == "bos_token" and student.roles[-1] == "eos_token"
    teacher, special_pairs = encode_like(student, tokenizer)
    assert tokenizer.convert_ids_to_tokens(teacher.ids) == teacher_tokens
    assert align_tokens(student, teacher, special_pairs) == pairs


def test_align_batch_response_positions_and_truncation(tokenizer, char_tokenizer):
    prompt, completion = "Question: 2 + 1?\nAnswer:", " 3"
    full = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    n_response = len(full) - n_prompt  # "Ġ", "3", EOS
    ids = torch.tensor([full, full[:-1] + [tokenizer.pad_token_id]])  # row 1: EOS cut, padded on the right
    mask = torch.tensor([[1] * len(full), [1] * (len(full) - 1) + [0]])
    labels = ids.clone()
    labels[:, :n_prompt] = -100
    labels[mask == 0] = -100
    out = align_batch(tokenizer, char_tokenizer, ids, mask, labels)
    assert n_response == 3
    assert out.rows.tolist() == [0, 0, 0, 1, 1]
    assert out.student_positions.tolist() == [n_prompt - 1, n_prompt, n_prompt + 1, n_prompt - 1, n_prompt]
    text_len = len(prompt + completion)
    # Teacher: <s> then one token per character. "Ġ" ends on character text_len - 1 (teacher token text_len - 1,
    # predicted by position text_len - 2), "3" on text_len; the student EOS pairs with the teacher's EOS, appended
    # after the text at index text_len + 1.
    assert out.teacher_positions.tolist() == [text_len - 2, text_len - 1, text_len, text_len - 2, text_len - 1]
    assert out.aligned.all()
    assert out.teacher_input_ids[0, text_len + 1] == char_tokenizer.eos_token_id
    assert out.teacher_attention_mask.sum(-1).tolist() == [text_len + 2, text_len + 1]
    # Truncating the teacher side leaves the student tokens whose partner was cut without one.
    short = align_batch(tokenizer, char_tokenizer, ids, mask, labels, teacher_max_length=text_len)
    assert short.aligned.tolist() == [True, False, False, True, False]
    assert short.teacher_input_ids.shape[1] == text_len


def test_shared_token_pairs(tokenizer, other_tokenizer, char_tokenizer):
    s, t = shared_token_pairs(tokenizer, tokenizer)
    # Every text token but the 3 special ones and the 128 byte tokens 0x80-0xFF (parts of multi-byte characters).
    assert torch.equal(s, t) and s.numel() == len(tokenizer) - 3 - 128
    s, t = shared_token_pairs(tokenizer, char_tokenizer)
    for a, b in zip(s.tolist(), t.tolist()):
        assert tokenizer.decode([a]) == char_tokenizer.decode([b])
    assert 0 < s.numel() <= len(set(ALPHABET))


# --------------------------------------------------------------------------------------------------------------------
# The loss against the float64 reference


def _inputs(n=11, vs=37, vt=23, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vs, generator=g) * scale
    t = torch.randn(n, vt, generator=g) * scale
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[[2, 7]] = -100
    paired = torch.ones(n, dtype=torch.bool)
    paired[[4]] = False
    return s, t, labels, paired


EXACT = (torch.tensor([0, 5, 6, 30]), torch.tensor([3, 1, 22, 0]))
CASES = [
    dict(distance="wasserstein", top_k=5, temperature=2.0, alpha=0.7),
    dict(distance="wasserstein", top_k=None, temperature=1.0, alpha=1.0),
    dict(distance="wasserstein", top_k=30, temperature=1.0, alpha=1.0),  # k between V_t=23 and V_s=37: zero padding
    dict(distance="kl", top_k=5, temperature=2.0, alpha=0.7),
    dict(distance="kl", top_k=None, temperature=0.5, alpha=0.0),
    dict(distance="wasserstein", top_k=8, temperature=2.0, alpha=0.9, exact_match_ids=EXACT),
    dict(distance="kl", top_k=8, temperature=1.0, alpha=1.0, exact_match_ids=EXACT, objective="reverse_kl"),
    dict(distance="wasserstein", top_k=4, temperature=1.0, alpha=1.0, exact_match_ids=EXACT, objective="jsd"),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: (
        "-".join(f"{k}={v}" for k, v in c.items() if k != "exact_match_ids")
        + ("-exact" if "exact_match_ids" in c else "")
    ),
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_uld_loss_matches_reference(case, reduction):
    s, t, labels, paired = _inputs()
    expected_s = s.double().requires_grad_()
    expected = uld_reference(expected_s, t, labels=labels, paired=paired, reduction=reduction, **case)
    expected.backward()
    got_s = s.clone().requires_grad_()
    got = uld_loss(got_s, t, labels=labels, paired=paired, reduction=reduction, chunk_size=4, **case)
    got.backward()
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_s.grad.double(), expected_s.grad, rtol=1e-4, atol=1e-6)
    # Negative control: the same formula comparing entries in vocabulary order (no sorting) is another number.
    if case["alpha"] > 0:  # (alpha = 0 is the CE alone)
        unsorted = uld_reference(s.double(), t, labels=labels, paired=paired, reduction=reduction, sort=False, **case)
        assert not torch.allclose(unsorted, expected.detach(), rtol=1e-3)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=["wasserstein", "kl", "exact"])
def test_linear_uld_loss_matches_reference(case):
    g = torch.Generator().manual_seed(1)
    h_s, h_t = torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 12, generator=g)
    w_s, w_t = torch.randn(40, 8, generator=g), torch.randn(26, 12, generator=g)  # 3 padded rows each side
    labels = torch.randint(0, 37, (2, 7), generator=g)
    labels[0, :3] = -100
    h_s_ref, w_s_ref = h_s.double().requires_grad_(), w_s.double().requires_grad_()
    expected = uld_reference(
        (h_s_ref @ w_s_ref.T)[..., :37].reshape(14, 37),
        (h_t.double() @ w_t.double().T)[..., :23].reshape(14, 23),
        labels=labels.reshape(-1),
        num_items_in_batch=20,
        **case,
    )
    expected.backward()
    h_s_got, w_s_got = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    got = linear_uld_loss(
        h_s_got,
        w_s_got,
        h_t,
        w_t,
        labels=labels,
        student_vocab_size=37,
        teacher_vocab_size=23,
        chunk_size=3,
        num_items_in_batch=20,
        **case,
    )
    got.backward()
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_s_got.grad.double(), h_s_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_s_got.grad.double(), w_s_ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.all(w_s_got.grad[37:] == 0)  # padded rows get nothing


@pytest.mark.parametrize("distance", ["wasserstein", "kl"])
def test_zero_for_identical_distributions_and_permutation_invariant(distance):
    s, t, labels, _ = _inputs(vs=29, vt=29)
    assert uld_loss(s, s.clone(), distance=distance, top_k=None, temperature=2.0) < 1e-6
    base = uld_loss(s, t, distance=distance, top_k=10, temperature=2.0)
    perm_s, perm_t = torch.randperm(29), torch.randperm(29)
    permuted = uld_loss(s[:, perm_s], t[:, perm_t], distance=distance, top_k=10, temperature=2.0)
    torch.testing.assert_close(permuted, base)
    # Negative control: token-level KD compares entry by entry and is not invariant.
    kd = distillation_loss(s, t, temperature=2.0)
    assert not torch.allclose(distillation_loss(s, t[:, perm_t], temperature=2.0), kd, rtol=1e-3)


def test_gradients_finite_and_masked_rows():
    s, t, labels, _ = _inputs()
    s = (s * 30).requires_grad_()  # near one-hot distributions
    for distance in ("wasserstein", "kl"):
        loss = uld_loss(s, t * 30, labels=labels, alpha=0.5, distance=distance, exact_match_ids=EXACT, top_k=4)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Everything masked: an exact zero with zero gradients, never NaN.
    loss = uld_loss(s, t, labels=torch.full_like(labels, -100), alpha=0.5)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    # Rows without a partner get the CE term only.
    paired = torch.zeros(s.shape[0], dtype=torch.bool)
    ce_only = uld_loss(s, t, labels=labels, paired=paired, alpha=0.5)
    kept = s.detach().double()[labels != -100]
    ce = per_token_loss(
        kept, kept, labels[labels != -100], objective="forward_kl", beta=0.5, temperature=1.0, top_k=None, alpha=0.0
    )
    torch.testing.assert_close(ce_only.double(), 0.5 * ce.mean().detach())


def test_spec_validation():
    s, t, _, _ = _inputs()
    with pytest.raises(ValueError, match="`distance`"):
        uld_loss(s, t, distance="l1")
    with pytest.raises(ValueError, match="`top_k`"):
        uld_loss(s, t, top_k=0)
    with pytest.raises(ValueError, match="`exact_match_ids`"):
        uld_loss(s, t, exact_match_ids=(torch.tensor([1, 2]), torch.tensor([1])))
    with pytest.raises(ValueError, match="`teacher_vocab_size`"):
        uld_loss(s, t, teacher_vocab_size=99)


# --------------------------------------------------------------------------------------------------------------------
# DistillTrainer with distill_mode="uld"


def _config(tmp_path, **kwargs):
    return helpers.config(tmp_path, **{"max_steps": 2, "distill_mode": "uld", "kd_temperature": 1.0, **kwargs})


@pytest.fixture
def other_teacher(other_tokenizer):
    return build_tiny_model(other_tokenizer, hidden_size=48, num_layers=2, num_heads=4, seed=3)


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(uld_distance="kl", uld_top_k=None, alpha=0.5, uld_exact_match=True)],
    ids=["wasserstein", "kl-exact"],
)
def test_trains_with_a_teacher_of_another_tokenizer(
    tmp_path, tokenizer, other_tokenizer, make_student, other_teacher, prompt_completion_dataset, settings
):
    student = make_student()
    before_s, before_t = _snapshot(student), _snapshot(other_teacher)
    trainer = DistillTrainer(
        model=student,
        teacher_model=other_teacher,
        args=_config(tmp_path, **settings),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
        teacher_processing_class=other_tokenizer,
    )
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param.detach(), before_s[name]) or "embed" in name, name
    for name, param in trainer.teacher_model.named_parameters():
        assert torch.equal(param.detach(), before_t[name]), name
    logged = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert logged and all(log["kd_loss"] > 0 and log["kd_tokens"] > 0 for log in logged)
    assert all(log["uld_unpaired"] == 0 for log in logged)  # both tokenizers have an EOS: every token has a partner
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)


def test_token_mode_still_refuses_other_tokenizers(
    tmp_path, tokenizer, other_tokenizer, make_student, other_teacher, prompt_completion_dataset
):
    with pytest.raises(ValueError, match='must share a vocabulary for token-level KD.*distill_mode="uld"'):
        DistillTrainer(
            model=make_student(),
            teacher_model=other_teacher,
            args=_config(tmp_path, distill_mode="token"),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
            teacher_processing_class=other_tokenizer,
        )


def test_lora_and_gradient_accumulation_match_one_big_batch(
    tmp_path, tokenizer, other_tokenizer, make_student, other_teacher, prompt_completion_dataset
):
    from peft import LoraConfig

    def one_step(name, **kwargs):
        trainer = DistillTrainer(
            model=make_student(),
            teacher_model=other_teacher,
            args=_config(tmp_path / name, max_steps=1, **kwargs),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
            teacher_processing_class=other_tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        )
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    # Plain SGD: Adam's first step is blind to a wrong overall scale of the gradient.
    big = one_step("big", per_device_train_batch_size=4, alpha=0.8, optim="sgd", learning_rate=1.0)
    accumulated = one_step(
        "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, alpha=0.8, optim="sgd", learning_rate=1.0
    )
    assert big and all("lora" in name for name in big)
    assert any(not torch.all(p == 0) for n, p in big.items() if "lora_B" in n)  # B starts at zero: it trained
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6)


def test_packing_is_refused_and_config_is_validated(
    tmp_path, tokenizer, other_tokenizer, make_student, other_teacher, prompt_completion_dataset
):
    with pytest.raises(ValueError, match="`packing=True` is not supported with `distill_mode='uld'`"):
        DistillTrainer(
            model=make_student(),
            teacher_model=other_teacher,
            args=_config(tmp_path, packing=True, max_length=64),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
            teacher_processing_class=other_tokenizer,
        )
    with pytest.raises(ValueError, match="`uld_top_k` must be None"):
        _config(tmp_path, uld_top_k=0)
    with pytest.raises(ValueError, match="`uld_distance` must be one of"):
        _config(tmp_path, uld_distance="l2")
    with pytest.warns(UserWarning, match="`kd_top_k=8` is ignored"):
        _config(tmp_path, kd_top_k=8)


def test_uld_config_parses_from_command_line_and_yaml(tmp_path):
    import json

    from trl import TrlParser

    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(json.dumps({"output_dir": str(tmp_path), "distill_mode": "uld", "uld_distance": "kl"}))
    (args,) = TrlParser((DistillConfig,)).parse_args_and_config(
        ["--config", str(yaml_path), "--uld_top_k", "16", "--uld_exact_match", "true", "--use_cpu", "true"]
    )
    assert (args.distill_mode, args.uld_distance, args.uld_top_k, args.uld_exact_match) == ("uld", "kl", 16, True)


def test_heldout_kl_is_not_measured_across_tokenizers(
    tmp_path, tokenizer, other_tokenizer, make_student, other_teacher, prompt_completion_dataset, eval_dataset, caplog
):
    from trl_distill.callbacks import find_heldout_callback

    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=other_teacher,
        args=_config(tmp_path),
        train_dataset=prompt_completion_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        teacher_processing_class=other_tokenizer,
    )
    assert find_heldout_callback(trainer) is None
    assert "teacher's tokenizer differs" in caplog.text
    metrics = trainer.evaluate()
    assert not any("heldout" in key for key in metrics) and torch.isfinite(torch.tensor(metrics["eval_loss"]))
