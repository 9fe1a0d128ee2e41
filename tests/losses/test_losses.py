"""`distillation_loss` and `linear_distillation_loss` against the float64 reference: values and gradients."""

import itertools
import math

import pytest
import torch

from tests.reference import reference_loss
from trl_distill.losses import distillation_loss, linear_distillation_loss


# (objective, beta): every objective, both generalized-JSD endpoints, and an interior beta.
OBJECTIVES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.5),
    ("generalized_jsd", 0.0),
    ("generalized_jsd", 0.3),
    ("generalized_jsd", 1.0),
]
TEMPERATURES = [0.5, 1.0, 2.0, 4.0]
TOP_K = [None, 7]


@pytest.fixture(autouse=True)
def _fixed_torch_seed():
    # Tests that draw from the global generator get the same inputs whatever ran before them.
    torch.manual_seed(0)


def make_inputs(seed=0, B=3, T=7, H_s=12, H_t=20, V=53, pad_s=0, pad_t=0, mask_prob=0.3, bias=False):
    """Odd shapes, random masked positions, one fully masked row."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, H_s, generator=g, dtype=torch.float64).float()
    h_t = torch.randn(B, T, H_t, generator=g).float()
    w_s = (torch.randn(V + pad_s, H_s, generator=g) / H_s**0.5).float()
    w_t = (torch.randn(V + pad_t, H_t, generator=g) * 2 / H_t**0.5).float()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < mask_prob] = -100
    labels[1] = -100  # a fully masked row
    b_s = torch.randn(V + pad_s, generator=g).float() * 0.1 if bias else None
    b_t = torch.randn(V + pad_t, generator=g).float() * 0.1 if bias else None
    return h_s, w_s, h_t, w_t, labels, b_s, b_t


def leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_(True) for t in tensors]


def reference_with_grads(h_s, w_s, b_s, h_t, w_t, b_t, **kwargs):
    hs, ws, bs = leaves(h_s.double(), w_s.double(), None if b_s is None else b_s.double())
    zs = hs @ ws.T + (0 if bs is None else bs)
    zt = h_t.double() @ w_t.double().T + (0 if b_t is None else b_t.double())
    loss = reference_loss(zs, zt, **kwargs)
    loss.backward()
    return loss.detach(), hs.grad, ws.grad, None if bs is None else bs.grad


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_linear_loss_matches_reference(objective, beta, temperature, top_k, alpha):
    # A fixed seed per case (not `hash(...)`, which changes with PYTHONHASHSEED): the same inputs on every run.
    seed = 10 * OBJECTIVES.index((objective, beta)) + TEMPERATURES.index(temperature)
    h_s, w_s, h_t, w_t, labels, b_s, b_t = make_inputs(seed=seed, bias=True)
    kwargs = dict(labels=labels, objective=objective, beta=beta, temperature=temperature, top_k=top_k, alpha=alpha)
    ref, ref_gh, ref_gw, ref_gb = reference_with_grads(h_s, w_s, b_s, h_t, w_t, b_t, **kwargs)

    hs, ws, bs = leaves(h_s, w_s, b_s)
    loss = linear_distillation_loss(hs, ws, h_t, w_t, student_bias=bs, teacher_bias=b_t, chunk_size=4, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(hs.grad.double(), ref_gh, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(ws.grad.double(), ref_gw, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(bs.grad.double(), ref_gb, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_logits_loss_matches_reference(objective, beta, top_k, temperature):
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(2, 9, 31, generator=g) * 3
    zt = torch.randn(2, 9, 31, generator=g) * 3
    mask = torch.rand(2, 9, generator=g) > 0.4
    kwargs = dict(mask=mask, objective=objective, beta=beta, temperature=temperature, top_k=top_k)
    zs_ref = zs.double().requires_grad_(True)
    ref = reference_loss(zs_ref, zt, **kwargs)
    ref.backward()
    z = zs.clone().requires_grad_(True)
    loss = distillation_loss(z, zt, chunk_size=5, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(z.grad.double(), zs_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("top_k", TOP_K)
def test_padded_vocabulary_rows_are_excluded(reduction, top_k):
    # Student and teacher lm_heads have different numbers of padding rows (Qwen2.5-style); the padding rows get large
    # logits so that including them anywhere would change the value.
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(pad_s=5, pad_t=11)
    w_s[53:] *= 50
    w_t[53:] *= 50
    kwargs = dict(labels=labels, objective="jsd", temperature=2.0, top_k=top_k, alpha=0.9, reduction=reduction)
    ref, ref_gh, ref_gw, _ = reference_with_grads(h_s, w_s, None, h_t, w_t, None, vocab_size=53, **kwargs)
    hs, ws = leaves(h_s, w_s)
    loss = linear_distillation_loss(hs, ws, h_t, w_t, vocab_size=53, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(hs.grad.double(), ref_gh, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(ws.grad.double(), ref_gw, rtol=1e-4, atol=2e-6)
    assert torch.all(ws.grad[53:] == 0)
    # Negative control: without vocab_size the widths differ and the call is refused.
    with pytest.raises(ValueError, match="vocab_size"):
        linear_distillation_loss(hs, ws, h_t, w_t, **kwargs)


def test_logits_and_linear_paths_agree():
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(seed=3)
    kwargs = dict(labels=labels, objective="reverse_kl", temperature=2.0, top_k=5, alpha=0.8)
    a = linear_distillation_loss(h_s, w_s, h_t, w_t, chunk_size=3, **kwargs)
    b = distillation_loss(h_s @ w_s.T, h_t @ w_t.T, **kwargs)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", ["logits", "linear"])
@pytest.mark.parametrize("objective,beta", OBJECTIVES)
def test_all_masked_gives_zero_and_finite_gradients(fn, objective, beta):
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs()
    labels[:] = -100
    hs, ws = leaves(h_s, w_s)
    kwargs = dict(labels=labels, objective=objective, beta=beta, temperature=2.0, alpha=0.9, top_k=3)
    if fn == "linear":
        loss = linear_distillation_loss(hs, ws, h_t, w_t, **kwargs)
    else:
        loss = distillation_loss(hs @ ws.T, h_t @ w_t.T, **kwargs)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.all(hs.grad == 0) and torch.all(ws.grad == 0)


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("top_k", TOP_K)
def test_identical_distributions_give_zero(objective, beta, top_k):
    z = torch.randn(4, 6, 40)
    loss = distillation_loss(z, z.clone(), objective=objective, beta=beta, top_k=top_k, temperature=2.0)
    assert abs(loss.item()) < 1e-6


def test_gradient_accumulation_matches_one_big_batch():
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(B=4)
    kwargs = dict(objective="forward_kl", temperature=2.0, alpha=0.9)
    hs_full, ws_full = leaves(h_s, w_s)
    linear_distillation_loss(hs_full, ws_full, h_t, w_t, labels=labels, **kwargs).backward()

    hs, ws = leaves(h_s, w_s)
    total = int((labels != -100).sum())
    for part in (slice(0, 1), slice(1, 4)):  # uneven micro-batches with different token counts
        loss = linear_distillation_loss(
            hs[part], ws, h_t[part], w_t, labels=labels[part], num_items_in_batch=total, **kwargs
        )
        loss.backward()
    torch.testing.assert_close(ws.grad, ws_full.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hs.grad, hs_full.grad, rtol=1e-5, atol=1e-7)


def test_sum_reduction_and_components():
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs()
    out = linear_distillation_loss(
        h_s, w_s, h_t, w_t, labels=labels, alpha=0.75, temperature=2.0, return_components=True
    )
    n = int((labels != -100).sum())
    assert int(out.num_tokens) == n
    torch.testing.assert_close(out.loss, 0.75 * out.kd_loss + 0.25 * out.ce_loss)  # mean reduction: same scale
    total = linear_distillation_loss(h_s, w_s, h_t, w_t, labels=labels, alpha=0.75, temperature=2.0, reduction="sum")
    torch.testing.assert_close(total, out.loss * n)


# --- negative controls: the comparisons above must be able to fail -------------------------------------------------


@pytest.mark.parametrize(
    "wrong",
    [
        dict(objective="reverse_kl"),  # wrong KL direction
        dict(temperature=1.0),  # temperature ignored
        dict(top_k=None),  # top-k bucket ignored
        dict(alpha=1.0),  # CE term dropped
    ],
)
def test_negative_controls_do_not_match(wrong):
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(seed=5)
    right = dict(labels=labels, objective="forward_kl", temperature=2.0, top_k=5, alpha=0.9)
    loss = linear_distillation_loss(h_s, w_s, h_t, w_t, **right)
    ref = reference_loss(h_s @ w_s.T, h_t @ w_t.T, **{**right, **wrong})
    assert not torch.allclose(loss.double(), ref, rtol=1e-3, atol=1e-4)


def test_missing_temperature_squared_would_be_caught():
    z_s, z_t = torch.randn(5, 30), torch.randn(5, 30) * 2
    loss = distillation_loss(z_s, z_t, temperature=4.0)
    ref = reference_loss(z_s, z_t, temperature=4.0)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-6)
    assert not torch.allclose(loss.double(), ref / 16, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_close_to_float32(dtype):
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(seed=7)
    ref = linear_distillation_loss(h_s, w_s, h_t, w_t, labels=labels, alpha=0.9, temperature=2.0)
    hs, ws = leaves(h_s.to(dtype), w_s.to(dtype))
    loss = linear_distillation_loss(hs, ws, h_t.to(dtype), w_t.to(dtype), labels=labels, alpha=0.9, temperature=2.0)
    loss.backward()
    assert loss.dtype == torch.float32 and hs.grad.dtype == dtype and ws.grad.dtype == dtype
    assert torch.isfinite(hs.grad.float()).all() and torch.isfinite(ws.grad.float()).all()
    torch.testing.assert_close(loss, ref, rtol=5e-2, atol=5e-2)


def test_no_grad_skips_gradient_work_and_matches():
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(seed=8)
    with torch.no_grad():
        a = linear_distillation_loss(h_s, w_s, h_t, w_t, labels=labels, alpha=0.9)
    b = linear_distillation_loss(*leaves(h_s, w_s), h_t, w_t, labels=labels, alpha=0.9)
    torch.testing.assert_close(a, b.detach())


def test_frozen_lm_head_gets_no_gradient():
    # LoRA students: the lm_head weight is frozen, only the hidden states need a gradient.
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(seed=9)
    (hs,) = leaves(h_s)
    linear_distillation_loss(hs, w_s, h_t, w_t, labels=labels).backward()
    assert hs.grad is not None and w_s.grad is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(objective="kl"), "objective"),
        (dict(objective="generalized_jsd", beta=1.5), "beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(alpha=1.2), "alpha"),
        (dict(reduction="batchmean"), "reduction"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(alpha=0.5, labels=None), "labels"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    z = torch.randn(3, 10)
    kwargs = {"labels": torch.zeros(3, dtype=torch.long), **kwargs}
    with pytest.raises(ValueError, match=match):
        distillation_loss(z, z, **kwargs)


def test_extreme_logits_stay_finite():
    z_s = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-50.0, 50.0, 0.0, 0.0]]).requires_grad_(True)
    z_t = torch.tensor([[-1e4, 1e4, 0.0, 0.0], [50.0, -50.0, 1.0, 1.0]])
    for objective, top_k in itertools.product(["forward_kl", "reverse_kl", "jsd"], [None, 2]):
        z_s.grad = None
        loss = distillation_loss(z_s, z_t, objective=objective, top_k=top_k, temperature=1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all(), (objective, top_k)


def test_inputs_are_not_modified():
    z_s, z_t = torch.randn(4, 6, 30), torch.randn(4, 6, 30)
    a, b = z_s.clone(), z_t.clone()
    for top_k in (None, 4):
        distillation_loss(z_s.requires_grad_(True), z_t, temperature=2.0, top_k=top_k).backward()
    assert torch.equal(z_s.detach(), a) and torch.equal(z_t, b)


# --- reliability: masked vocabularies, extreme logits, log-space top-k, named errors (issue 13) --------------------

INF = float("inf")


def _masked_logits(seed=0, rows=4, V=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 2, torch.randn(rows, V, generator=g) * 2


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("masked", ["teacher", "both", "student"])
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_masked_vocabulary_matches_reference(objective, beta, masked, top_k, temperature):
    # -inf logits are the usual way to mask a vocabulary; 0 * log 0 = 0, so wherever the float64 reference is finite
    # the loss and its gradient must be too (they were NaN over the full vocabulary).
    b = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}.get(objective, beta)
    if (masked == "teacher" and b == 1.0) or (masked == "student" and b == 0.0):
        pytest.skip("infinite divergence: tested in test_truly_infinite_divergence_is_inf_not_nan")
    z_s, z_t = _masked_logits(V=11)
    if masked in ("teacher", "both"):
        z_t[:, [0, 5]] = -INF
    if masked in ("student", "both"):
        z_s[:, [0, 5]] = -INF
    z_s[1, 3] = z_t[1, 3] = -INF  # one more id masked on both sides, on one row only
    z = z_s.clone().requires_grad_(True)
    ref_z = z_s.double().requires_grad_(True)
    kwargs = dict(objective=objective, beta=beta, temperature=temperature, top_k=top_k)
    ref = reference_loss(ref_z, z_t, **kwargs)
    ref.backward()
    assert torch.isfinite(ref)
    loss = distillation_loss(z, z_t, chunk_size=3, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(z.grad.double(), ref_z.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(z.grad[torch.isneginf(z_s)] == 0)


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("top_k", TOP_K)
def test_masked_bias_in_the_chunked_path(objective, beta, top_k):
    # The hidden-state path: a bias of -inf masks the same ids on both sides (and one id on the teacher's side only).
    h_s, w_s, h_t, w_t, labels, b_s, b_t = make_inputs(seed=11, bias=True)
    b_s[[2, 7]] = -INF
    b_t[[2, 7]] = -INF
    if objective != "reverse_kl" and beta < 1.0:
        b_t[9] = -INF  # masked on the teacher's side only: finite unless the divergence is weighted by q alone
    labels[labels == 2] = 4  # the CE term needs finite targets
    labels[labels == 7] = 4
    kwargs = dict(labels=labels, objective=objective, beta=beta, temperature=2.0, top_k=top_k, alpha=0.8)
    ref, ref_gh, ref_gw, ref_gb = reference_with_grads(h_s, w_s, b_s, h_t, w_t, b_t, **kwargs)
    assert torch.isfinite(ref)
    hs, ws, bs = leaves(h_s, w_s, b_s)
    loss = linear_distillation_loss(hs, ws, h_t, w_t, student_bias=bs, teacher_bias=b_t, chunk_size=4, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(hs.grad.double(), ref_gh, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(ws.grad.double(), ref_gw, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(bs.grad.double(), ref_gb.nan_to_num(), rtol=1e-4, atol=2e-6)
    assert torch.all(ws.grad[[2, 7]] == 0) and torch.all(bs.grad[[2, 7]] == 0)


def test_masked_vocabulary_examples_from_the_issue():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    t[:, 0] = -INF
    for objective in ("forward_kl", "jsd"):
        torch.testing.assert_close(
            distillation_loss(s, t, objective=objective).double(), reference_loss(s, t, objective=objective)
        )
    s[:, 0] = -INF  # both sides masked at the same id
    torch.testing.assert_close(distillation_loss(s, t).double(), reference_loss(s, t))
    s2, t2 = torch.randn(2, 5), torch.randn(2, 5)
    s2[:, 1] = -INF  # reverse KL with the student masked
    torch.testing.assert_close(
        distillation_loss(s2, t2, objective="reverse_kl").double(), reference_loss(s2, t2, objective="reverse_kl")
    )


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl"])
def test_truly_infinite_divergence_is_inf_not_nan(objective):
    # Forward KL with the student masked where the teacher has mass is +inf (and reverse KL the other way round).
    s, t = torch.randn(2, 6), torch.randn(2, 6)
    (s if objective == "forward_kl" else t)[0, 2] = -INF
    assert math.isinf(reference_loss(s, t, objective=objective).item())
    assert distillation_loss(s, t, objective=objective).item() == INF


def test_top_k_works_in_log_space():
    # A logit gap above 87.3 * T used to be clamped at float32's smallest probability, capping the value.
    one = distillation_loss(torch.tensor([[100.0, 0, 0, 0]]), torch.tensor([[0.0, 100, 0, 0]]), top_k=1)
    torch.testing.assert_close(one, torch.tensor(100.0))
    z_s, z_t = torch.zeros(1, 4), torch.tensor([[30.0, 1, 0, -10]])
    kwargs = dict(objective="reverse_kl", temperature=0.25, top_k=2)
    zs = z_s.clone().requires_grad_(True)
    loss = distillation_loss(zs, z_t, **kwargs)
    loss.backward()
    ref_z = z_s.double().requires_grad_(True)
    ref = reference_loss(ref_z, z_t, **kwargs)
    ref.backward()
    assert abs(ref.item() - 5.4975) < 1e-4
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zs.grad.double(), ref_z.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("top_k", TOP_K)
def test_far_gaps_in_the_top_k_bucket(objective, top_k):
    # Random rows whose "other" bucket lies 100-400 nats below the top: values and gradients from float64.
    g = torch.Generator().manual_seed(3)
    z_s = torch.randn(5, 12, generator=g) * 3
    z_t = torch.randn(5, 12, generator=g) * 3
    z_t[:, :7] += 300.0
    z_s[:, 7:] += torch.linspace(-100, 100, 5)[:, None]
    kwargs = dict(objective=objective, temperature=1.5, top_k=7 if top_k else None)
    zs = z_s.clone().requires_grad_(True)
    loss = distillation_loss(zs, z_t, **kwargs)
    loss.backward()
    ref_z = z_s.double().requires_grad_(True)
    ref = reference_loss(ref_z, z_t, **kwargs)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(zs.grad.double(), ref_z.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("top_k", [None, 2])
def test_logits_near_the_float32_limit(objective, temperature, top_k):
    # z / T of a logit near 3e38 overflows: no NaN (and the right value) where the float64 value is representable.
    z_s = torch.tensor([[3e38, -3e38, 0.0, 1.0], [1.0, 2.0, -3e38, 0.5]])
    z_t = torch.tensor([[3e38, 1e38, 1.0, 0.0], [2.0, 1.0, -1e38, 0.0]])
    kwargs = dict(objective=objective, temperature=temperature, top_k=top_k)
    zs = z_s.clone().requires_grad_(True)
    loss = distillation_loss(zs, z_t, **kwargs)
    loss.backward()
    ref = reference_loss(z_s, z_t, **kwargs)
    assert torch.isfinite(ref)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-5)
    assert torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_a_fully_masked_position_is_a_named_error(side, top_k, alpha):
    s, t = torch.randn(3, 9), torch.randn(3, 9)
    (s if side == "student" else t)[1] = -INF
    labels = torch.zeros(3, dtype=torch.long)
    if side == "teacher" and alpha == 0.0:
        distillation_loss(s, t, labels=labels, alpha=alpha, top_k=top_k)  # the teacher is not read: no error
        return
    with pytest.raises(ValueError, match=f"{side} has every logit equal to -inf"):
        distillation_loss(s, t, labels=labels, alpha=alpha, top_k=top_k)
    # Left out of the loss, the same position is fine.
    labels[1] = -100
    assert torch.isfinite(distillation_loss(s, t, labels=labels, alpha=alpha, top_k=top_k))


@pytest.mark.parametrize("top_k", TOP_K)
def test_nan_logits_give_a_nan_loss(top_k):
    # A NaN (or +inf) logit is propagated, so an AMP grad scaler sees it and skips the step; it is never hidden.
    s, t = torch.randn(3, 9), torch.randn(3, 9)
    s[0, 4] = float("nan")
    assert torch.isnan(distillation_loss(s, t, top_k=top_k))
    s[0, 4] = INF
    assert torch.isnan(distillation_loss(s, t, top_k=top_k))


@pytest.mark.parametrize("fn", ["logits", "linear"])
@pytest.mark.parametrize("bad", [-5, 53, 1000])
def test_out_of_range_labels_are_a_named_error(fn, bad):
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(seed=12)
    labels[0, 2] = bad
    call = (
        (lambda: linear_distillation_loss(h_s, w_s, h_t, w_t, labels=labels, alpha=0.5))
        if fn == "linear"
        else (lambda: distillation_loss(h_s @ w_s.T, h_t @ w_t.T, labels=labels, alpha=0.5))
    )
    with pytest.raises(ValueError, match=rf"`labels` must be token ids in \[0, 53\).*got {bad}"):
        call()
    labels[0, 2] = -100  # the ignore index is fine
    call()


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_wrong_length_bias_is_a_named_error(which):
    h_s, w_s, h_t, w_t, labels, b_s, b_t = make_inputs(seed=13, bias=True)
    biases = {"student_bias": b_s, "teacher_bias": b_t, f"{which}_bias": torch.zeros(50)}
    with pytest.raises(ValueError, match=rf"`{which}_bias` must have shape \(53,\).*got \(50,\)"):
        linear_distillation_loss(h_s, w_s, h_t, w_t, labels=labels, **biases)


@pytest.mark.parametrize("num_items", [0, -3, torch.tensor(0), torch.tensor(-1)])
def test_non_positive_num_items_in_batch_is_a_named_error(num_items):
    z_s, z_t = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        distillation_loss(z_s, z_t, num_items_in_batch=num_items)


def test_zero_num_items_with_nothing_in_the_loss_is_zero():
    # A whole accumulated batch without a loss position: 0 items, and a zero loss (not an error, not NaN).
    z_s, z_t = torch.randn(4, 10).requires_grad_(True), torch.randn(4, 10)
    loss = distillation_loss(z_s, z_t, mask=torch.zeros(4, dtype=torch.bool), num_items_in_batch=0)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z_s.grad == 0)


def test_float16_weight_gradient_does_not_overflow_per_chunk():
    # Per chunk, sum_rows dz^T h passes float16's 65504 although the reduced (mean) gradient fits.
    N, H, V = 64, 8, 6
    g = torch.Generator().manual_seed(14)
    h_s = torch.full((N, H), 600.0) + torch.randn(N, H, generator=g)
    w_s = torch.randn(V, H, generator=g) * 0.01
    h_t, w_t = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    _, _, ref_gw, _ = reference_with_grads(h_s, w_s, None, h_t, w_t, None, temperature=4.0)
    ws = w_s.half().requires_grad_(True)
    loss = linear_distillation_loss(h_s.half(), ws, h_t.half(), w_t.half(), temperature=4.0, chunk_size=N)
    loss.backward()
    assert ref_gw.abs().max() < 60000 and (ref_gw.abs() * N).max() > 65504  # the test's premise
    assert torch.isfinite(ws.grad).all()
    torch.testing.assert_close(ws.grad.double(), ref_gw, rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("fn", ["linear", "logits"])
def test_upstream_gradient_scales_the_saved_gradient(fn):
    # backward scales the gradient computed during forward in place: a non-unit upstream gradient (here 3.7 and a
    # second term reusing the loss) must still give the reference's gradient, for both paths.
    h_s, w_s, h_t, w_t, labels, b_s, b_t = make_inputs(seed=11, bias=True)
    kwargs = dict(labels=labels, objective="jsd", temperature=2.0, alpha=0.8)
    ref, ref_gh, ref_gw, _ = reference_with_grads(h_s, w_s, b_s, h_t, w_t, b_t, **kwargs)
    hs, ws = leaves(h_s, w_s)
    if fn == "linear":
        loss = linear_distillation_loss(hs, ws, h_t, w_t, student_bias=b_s, teacher_bias=b_t, chunk_size=4, **kwargs)
    else:
        z_s = hs @ ws.T + b_s
        loss = distillation_loss(z_s, h_t @ w_t.T + b_t, chunk_size=4, **kwargs)
    (3.7 * loss + loss.detach() * loss).backward()
    scale = 3.7 + float(ref)
    torch.testing.assert_close(hs.grad.double(), scale * ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ws.grad.double(), scale * ref_gw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn", ["linear", "logits"])
def test_a_second_backward_is_a_named_error(fn):
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(seed=12)
    hs, ws = leaves(h_s, w_s)
    if fn == "linear":
        loss = linear_distillation_loss(hs, ws, h_t, w_t, labels=labels)
    else:
        loss = distillation_loss(hs @ ws.T, h_t @ w_t.T, labels=labels)
    loss.backward(retain_graph=True)
    first = ws.grad.clone()
    with pytest.raises(RuntimeError, match="backpropagated once only"):
        loss.backward()
    torch.testing.assert_close(ws.grad, first)  # the refused backward accumulated nothing


def _node_named(fn, name):
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            return node
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    raise AssertionError(f"no {name} node in the graph")


@pytest.mark.parametrize("pad_s", [0, 3])
def test_the_weight_gradient_is_adopted_not_copied(pad_s):
    # The lm_head weight's `.grad` is the very buffer the forward pass filled: no second (V, H) tensor at the peak of
    # backward (671 MB at Gemma's V = 262144). A scaled copy (`saved * grad`), or the backward of a `weight[:V]` view
    # for a padded vocabulary, would live in a different storage.
    h_s, w_s, h_t, w_t, labels, _, _ = make_inputs(seed=13, pad_s=pad_s)
    hs, ws = leaves(h_s, w_s)
    loss = linear_distillation_loss(hs, ws, h_t, w_t, labels=labels, vocab_size=53)
    filled = _node_named(loss.grad_fn, "_LinearKD").saved_tensors[1].data_ptr()
    loss.backward()
    assert ws.grad.data_ptr() == filled
    if pad_s:
        assert ws.grad[53:].abs().max() == 0  # the padded rows are not in the vocabulary
