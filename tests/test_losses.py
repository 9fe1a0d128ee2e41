"""`distillation_loss` and `linear_distillation_loss` against the float64 reference: values and gradients."""

import itertools

import pytest
import torch

from trl_distill.losses import distillation_loss, linear_distillation_loss
from tests.reference import reference_loss


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
    h_s, w_s, h_t, w_t, labels, b_s, b_t = make_inputs(seed=hash((objective, beta, temperature)) % 1000, bias=True)
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
