"""MiniLLM (`distill_mode="minillm"`): the surrogate against float64 references, its expected gradient against the
exact gradient of the sequence-level reverse KL, teacher-mixed sampling, config checks and the trainer."""

import itertools
import math

import pytest
import torch

from tests import reference_minillm as ref
from tests.helpers import config, snapshot
from trl_distill import DistillConfig, DistillTrainer
from trl_distill.losses.minillm import linear_minillm_loss, minillm_coefficients
from trl_distill.modes import get_mode
from trl_distill.sources.mixture import mixture_distribution, sample_mixture


# ---------------------------------------------------------------- the surrogate vs the float64 reference


def _random_case(seed, *, B=3, L=7, H=5, V=11, padded_rows=0, mix=0.3):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, L, H, generator=g, requires_grad=True)
    w_s = torch.randn(V + padded_rows, H, generator=g, requires_grad=True)
    h_t = torch.randn(B, L, H + 2, generator=g)
    w_t = torch.randn(V + padded_rows, H + 2, generator=g) * 1.5
    tokens = torch.randint(0, V, (B, L), generator=g)
    lengths = [L, 3, 0][:B] if B >= 3 else [L] * B  # a full row, a short one, an all-masked one
    mask = torch.tensor([[i < n for i in range(L)] for n in lengths])
    with torch.no_grad():
        logq = torch.log_softmax((h_s @ w_s.T)[..., :V], -1).gather(-1, tokens[..., None]).squeeze(-1)
        logp = torch.log_softmax((h_t @ w_t.T)[..., :V], -1).gather(-1, tokens[..., None]).squeeze(-1)
        sample = torch.log(mix * logp.exp() + (1 - mix) * logq.exp())
    return h_s, w_s, h_t, w_t, tokens, mask, logq, logp, sample, V


def _ours(case, *, length_normalize, clip, chunk_size=None):
    h_s, w_s, h_t, w_t, tokens, mask, logq, logp, sample, V = case
    coefficients = minillm_coefficients(logq, logp, sample, mask, length_normalize=length_normalize, clip=clip)
    out = linear_minillm_loss(
        h_s, w_s, h_t, w_t, tokens=tokens, kl_weight=coefficients.kl_weight, pg_weight=coefficients.pg_weight,
        mask=mask, vocab_size=V, chunk_size=chunk_size,
    )  # fmt: skip
    loss = out.surrogate_sum / out.num_tokens.clamp(min=1)
    grads = torch.autograd.grad(loss, (h_s, w_s))
    return loss, grads, out


def _reference(case, form, *, length_normalize, clip):
    h_s, w_s, h_t, w_t, tokens, mask, _, _, sample, V = case
    hd, wd = h_s.detach().double().requires_grad_(), w_s.detach().double().requires_grad_()
    student_logits = (hd @ wd.T)[..., :V]
    teacher_logits = (h_t.double() @ w_t.double().T)[..., :V]
    loss = form(student_logits, teacher_logits, tokens, sample, mask, length_normalize=length_normalize, clip=clip)
    return loss, torch.autograd.grad(loss, (hd, wd))


@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("clip", [None, 0.2, 0.05])
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("padded_rows", [0, 3])
def test_surrogate_matches_reference(length_normalize, clip, chunk_size, padded_rows):
    case = _random_case(0, padded_rows=padded_rows)
    loss, grads, _ = _ours(case, length_normalize=length_normalize, clip=clip, chunk_size=chunk_size)
    ref_loss, ref_grads = _reference(case, ref.minillm_surrogate, length_normalize=length_normalize, clip=clip)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-6)


def test_clip_gradient_is_the_ppo_objectives_gradient():
    # With a large teacher mix the weights spread beyond [0.95, 1.05]: the clip binds on some tokens, on both sides.
    case = _random_case(3, mix=0.6)
    _, grads, _ = _ours(case, length_normalize=True, clip=0.05)
    coefficients = minillm_coefficients(*case[6:9], case[5], length_normalize=True, clip=0.05)
    assert 0 < int(coefficients.clipped.sum()) < int(case[5].sum())
    _, ppo_grads = _reference(case, ref.ppo_surrogate, length_normalize=True, clip=0.05)
    for ours, theirs in zip(grads, ppo_grads):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-6)


def test_negative_controls_do_not_match():
    case = _random_case(1)
    _, grads, _ = _ours(case, length_normalize=True, clip=None)
    # Another normalization, and the reference without the long-term term, must both be told apart.
    _, other = _reference(case, ref.minillm_surrogate, length_normalize=False, clip=None)
    assert not torch.allclose(grads[1].double(), other[1], rtol=1e-3, atol=1e-5)
    h_s, w_s, h_t, w_t, tokens, mask, logq, _, sample, V = case
    single_only = linear_minillm_loss(
        h_s, w_s, h_t, w_t, tokens=tokens, kl_weight=torch.exp(logq - sample), pg_weight=torch.zeros_like(logq),
        mask=mask, vocab_size=V,
    )  # fmt: skip
    g_single = torch.autograd.grad(single_only.surrogate_sum / single_only.num_tokens, w_s)[0]
    assert not torch.allclose(g_single, grads[1], rtol=1e-3, atol=1e-5)


def test_all_masked_gives_zero_loss_and_zero_gradients():
    h_s, w_s, h_t, w_t, tokens, mask, logq, logp, sample, V = _random_case(2)
    none = torch.zeros_like(mask)
    c = minillm_coefficients(logq, logp, sample, none)
    out = linear_minillm_loss(h_s, w_s, h_t, w_t, tokens=tokens, kl_weight=c.kl_weight, pg_weight=c.pg_weight,
                              mask=none, vocab_size=V)  # fmt: skip
    loss = out.surrogate_sum / out.num_tokens.clamp(min=1)
    assert loss.item() == 0.0 and int(out.num_tokens) == 0
    assert all(float(g.abs().sum()) == 0.0 for g in torch.autograd.grad(loss, (h_s, w_s)))


def test_coefficients_by_hand():
    # One row of 3 tokens: rewards r = logp - logq = [1, -2, 4]; no teacher mix (w = 1).
    logq = torch.tensor([[-1.0, -1.0, -1.0, 0.0]])
    logp = torch.tensor([[0.0, -3.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    c = minillm_coefficients(logq, logp, logq, mask, length_normalize=False, clip=None)
    assert c.future_reward.tolist() == [[2.0, 4.0, 0.0, 0.0]]  # R_{t+1}: sums of the later rewards
    c = minillm_coefficients(logq, logp, logq, mask, length_normalize=True, clip=None)
    assert c.future_reward.tolist() == [[1.0, 4.0, 0.0, 0.0]]  # their means (2 / 2, 4 / 1)
    assert c.kl_weight.tolist() == [[1.0, 1.0, 1.0, 0.0]]


# ---------------------------------------------------------------- unbiasedness on an enumerable problem


def _tabular(V, L, seed):
    """A policy whose logits after each prefix are free parameters: hidden = one-hot(prefix), lm_head = the table."""
    prefixes = [p for n in range(L) for p in itertools.product(range(V), repeat=n)]
    index = {p: i for i, p in enumerate(prefixes)}
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(V, len(prefixes), generator=g, requires_grad=True)
    teacher = torch.randn(V, len(prefixes), generator=g) * 2
    return prefixes, index, student, teacher


def _expected_surrogate_gradient(V, L, seed, *, mix, length_normalize, double_count=False):
    """`sum_y p~(y) grad surrogate(y)` over every sequence (the estimator's exact expectation under `p~`)."""
    prefixes, index, student, teacher = _tabular(V, L, seed)
    sequences = list(itertools.product(range(V), repeat=L))
    eye = torch.eye(len(prefixes))
    hidden = torch.stack([torch.stack([eye[index[y[:i]]] for i in range(L)]) for y in sequences])  # (N, L, P)
    tokens = torch.tensor(sequences)
    with torch.no_grad():
        logq = torch.log_softmax(hidden @ student.T, -1).gather(-1, tokens[..., None]).squeeze(-1)
        logp = torch.log_softmax(hidden @ teacher.T, -1).gather(-1, tokens[..., None]).squeeze(-1)
        log_mix = torch.log(mix * logp.exp() + (1 - mix) * logq.exp())
        sequence_prob = log_mix.sum(-1).exp()  # p~(y), the probability of drawing the whole sequence
    mask = torch.ones_like(tokens, dtype=torch.bool)
    c = minillm_coefficients(logq, logp, log_mix, mask, length_normalize=length_normalize, clip=None)
    pg_weight = c.pg_weight + (c.kl_weight * (logp - logq) if double_count else 0.0)
    out = linear_minillm_loss(
        hidden, student, hidden, teacher, tokens=tokens, kl_weight=c.kl_weight * sequence_prob[:, None],
        pg_weight=pg_weight * sequence_prob[:, None], mask=mask,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(out.surrogate_sum, student)
    return grad.double(), prefixes, student, teacher


def _true_gradient(V, L, prefixes, student, teacher):
    table = student.detach().double().requires_grad_()
    kl = ref.sequence_reverse_kl(
        {p: table[:, i] for i, p in enumerate(prefixes)}, {p: teacher[:, i] for i, p in enumerate(prefixes)}, V, L
    )
    return torch.autograd.grad(kl, table)[0]


def test_expected_gradient_is_the_sequence_reverse_kl_gradient():
    V, L = 3, 3
    expected, prefixes, student, teacher = _expected_surrogate_gradient(V, L, 0, mix=0.0, length_normalize=False)
    true = _true_gradient(V, L, prefixes, student, teacher)
    assert float(true.abs().max()) > 1e-2  # not a trivially zero gradient
    torch.testing.assert_close(expected, true, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "variant", [{"double_count": True}, {"length_normalize": True}], ids=["r_t-counted-twice", "length-normalized"]
)
def test_expected_gradient_negative_controls(variant):
    V, L = 3, 3
    kwargs = {"mix": 0.0, "length_normalize": False, **variant}
    expected, prefixes, student, teacher = _expected_surrogate_gradient(V, L, 0, **kwargs)
    true = _true_gradient(V, L, prefixes, student, teacher)
    assert not torch.allclose(expected, true, rtol=1e-2, atol=1e-4)


def test_teacher_mix_estimate_stays_close_to_the_true_gradient():
    # The single-step importance weight is the paper's approximation: not exact, but aligned with the true gradient.
    V, L = 3, 3
    expected, prefixes, student, teacher = _expected_surrogate_gradient(V, L, 0, mix=0.2, length_normalize=False)
    true = _true_gradient(V, L, prefixes, student, teacher)
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), true.flatten(), dim=0)
    assert cosine > 0.9, cosine


# ---------------------------------------------------------------- teacher-mixed sampling


def test_mixture_distribution_formula():
    g = torch.Generator().manual_seed(0)
    zq, zp = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    q, p = torch.softmax(zq.double() / 0.7, -1), torch.softmax(zp.double() / 0.7, -1)
    log_mix = mixture_distribution(zq, zp, teacher_mix=0.2, temperature=0.7)
    torch.testing.assert_close(log_mix.double().exp(), 0.2 * p + 0.8 * q, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mixture_distribution(zq, zp, teacher_mix=0.0), torch.log_softmax(zq, -1))
    top2 = mixture_distribution(zq, zp, teacher_mix=0.2, temperature=0.7, top_k=2).exp()
    assert ((top2 > 0).sum(-1) == 2).all() and torch.allclose(top2.sum(-1), torch.ones(4))
    nucleus = mixture_distribution(zq, zp, teacher_mix=0.2, top_p=0.5).exp().double()
    full = 0.2 * torch.softmax(zp.double(), -1) + 0.8 * torch.softmax(zq.double(), -1)
    for row in range(4):  # the kept set is the smallest prefix of the sorted mixture holding >= 0.5
        kept = nucleus[row] > 0
        ordered = full[row].sort(descending=True).values
        n = int(kept.sum())
        assert ordered[: n - 1].sum() < 0.5 <= ordered[:n].sum() + 1e-9
        torch.testing.assert_close(nucleus[row][kept], full[row][kept] / full[row][kept].sum())


def test_sampled_log_probs_match_full_forwards(tokenizer, make_student, make_teacher):
    student, teacher = make_student(), make_teacher()
    prompts = [
        tokenizer("add 3 and 4")["input_ids"],
        tokenizer("x")["input_ids"],
        tokenizer("say hi twice")["input_ids"],
    ]
    eos = set(range(0, 1000, 3))  # a third of the vocabulary ends a row: some rows stop early
    torch.manual_seed(0)
    samples = sample_mixture(
        student, teacher, prompts, teacher_mix=0.3, max_new_tokens=6, eos_ids=eos, pad_token_id=0, vocab_size=1000
    )
    assert any(samples.ended) and all(len(c) <= 6 for c in samples.completions)
    for prompt, completion, ended, lq, lp, lm in zip(
        prompts, samples.completions, samples.ended, samples.student_logprobs, samples.teacher_logprobs,
        samples.sample_logprobs,
    ):  # fmt: skip
        assert ended == (completion[-1] in eos) and not any(t in eos for t in completion[:-1])
        assert ended or len(completion) == 6
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            q = torch.log_softmax(student(ids).logits[0, len(prompt) - 1 : -1, :1000], -1)
            p = torch.log_softmax(teacher(ids).logits[0, len(prompt) - 1 : -1, :1000], -1)
        target = torch.tensor(completion)[:, None]
        torch.testing.assert_close(lq, q.gather(-1, target).squeeze(-1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lp, p.gather(-1, target).squeeze(-1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lm, torch.log(0.3 * lp.exp() + 0.7 * lq.exp()), rtol=1e-4, atol=1e-5)


def test_pure_teacher_side_of_the_mixture_is_drawn_as_often_as_its_share():
    # Student and teacher put all their mass on different tokens: the fraction of teacher tokens is `teacher_mix`.
    class Fixed(torch.nn.Module):
        def __init__(self, token):
            super().__init__()
            self.token, self.anchor = token, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, past_key_values=None, **kwargs):
            logits = torch.full((input_ids.shape[0], 1, 5), -30.0)
            logits[..., self.token] = 30.0
            return type("Out", (), {"logits": logits, "past_key_values": None})()

    g = torch.Generator().manual_seed(0)
    samples = sample_mixture(
        Fixed(1), Fixed(2), [[3]] * 400, teacher_mix=0.25, max_new_tokens=5, eos_ids={4}, pad_token_id=0,
        vocab_size=5, generator=g,
    )  # fmt: skip
    drawn = torch.tensor(samples.completions).float()
    share = (drawn == 2).float().mean().item()
    assert share == pytest.approx(0.25, abs=4 * math.sqrt(0.25 * 0.75 / 2000))


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"minillm_teacher_mix": 1.0}, "minillm_teacher_mix"),
        ({"minillm_teacher_mix": -0.1}, "minillm_teacher_mix"),
        ({"minillm_clip": 0.0}, "minillm_clip"),
        ({"minillm_clip": float("inf")}, "minillm_clip"),
        ({"minillm_length_normalize": "yes"}, "minillm_length_normalize"),
        ({"minillm_lm_weight": -1.0}, "minillm_lm_weight"),
        ({"lmbda": 0.5}, "lmbda"),
        ({"seq_kd": True}, "seq_kd"),
        ({"kd_top_k": 8}, "kd_top_k"),
        ({"loss_reduction": "sum"}, "loss_reduction"),
        ({"packing": True}, "packing"),
        ({"feature_weight": 1.0}, "feature_weight"),
        ({"teacher_cache": "/nowhere", "kd_top_k": None}, "teacher_cache"),
    ],
)
def test_config_refuses(tmp_path, settings, field):
    with pytest.raises((ValueError, TypeError), match=f"`{field}"):
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, distill_mode="minillm", **settings)


def test_mode_is_registered_with_its_paper():
    mode = get_mode("minillm")
    assert mode.papers[0]["arxiv"] == "2306.08543" and mode.requires_shared_vocab and mode.requires_teacher
    args = DistillConfig(output_dir="x", use_cpu=True, distill_mode="minillm", minillm_teacher_mix=0.1)
    assert "0.1" in mode.describe(args) and "MiniLLM" in mode.describe(args)
    defaults = DistillConfig(output_dir="x", use_cpu=True, distill_mode="minillm")  # the paper's settings
    assert (defaults.minillm_teacher_mix, defaults.minillm_clip, defaults.minillm_length_normalize) == (0.2, 0.2, True)


def test_different_vocabularies_are_refused(tmp_path, tokenizer, other_tokenizer, make_student,
                                            prompt_completion_dataset):  # fmt: skip
    from trl_distill.demo.tiny import build_tiny_model

    teacher = build_tiny_model(other_tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="vocabular"):
        DistillTrainer(
            model=make_student(), teacher_model=teacher, args=config(tmp_path, distill_mode="minillm"),
            train_dataset=prompt_completion_dataset, processing_class=tokenizer,
            teacher_processing_class=other_tokenizer,
        )  # fmt: skip


# ---------------------------------------------------------------- the trainer


def test_trains_logs_and_writes_a_verifiable_receipt(tmp_path, tokenizer, make_student, make_teacher,
                                                     prompt_completion_dataset, eval_dataset):  # fmt: skip
    from trl_distill.verify import verify_artifact

    student, teacher = make_student(), make_teacher()
    student_before, teacher_before = snapshot(student), snapshot(teacher)
    trainer = DistillTrainer(
        model=student, teacher_model=teacher, train_dataset=prompt_completion_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer,
        args=config(tmp_path, distill_mode="minillm", max_steps=3, max_completion_length=6, minillm_lm_weight=0.5,
                    eval_strategy="no"),
    )  # fmt: skip
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param.detach(), student_before[name]), f"trainable parameter {name} did not change"
    for name, param in trainer.teacher_model.named_parameters():
        assert torch.equal(param.detach(), teacher_before[name]), f"teacher parameter {name} changed"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and all(math.isfinite(log["loss"]) for log in logs)
    for name in ("reward", "pg_loss", "single_step", "importance_weight", "completion_length", "lm_loss"):
        assert all(math.isfinite(log[f"minillm/{name}"]) for log in logs), name
    assert all(0 < log["minillm/completion_length"] <= 6 for log in logs)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_minillm/reverse_kl" in metrics
    trainer.save_model()
    assert verify_artifact(tmp_path / "out").ok
    receipt = (tmp_path / "out" / "distill_receipt.json").read_text()
    assert "minillm_teacher_mix" in receipt and "2306.08543" in receipt
