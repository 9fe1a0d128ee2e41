"""The store codec keeps the teacher's "other" bucket in log space (issue 13): no clamp at float32's exp(-88)."""

import math

import pytest
import torch

from trl_distill.losses import TopKTargets, distillation_loss, linear_top_k_distillation_loss, teacher_top_k
from trl_distill.teachers import codec


V = 1000


def round_trip(log_probs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    if ids is None:
        ids = torch.arange(log_probs.shape[-1] - 1).expand(log_probs.shape[0], -1)
    return codec.decode(codec.encode(TopKTargets(ids, log_probs), V), V).log_probs


@pytest.mark.parametrize(
    "neg_log_other,tolerance",
    [
        (0.0, 0.0),
        (0.7, 5e-6),
        (20.0, 5e-6),
        (65.9, 5e-6),  # the fixed-point range: absolute step 5.2e-6
        (66.5, 66.5 * 6e-6),  # the logarithmic range: relative step 1.1e-5
        (87.5, 87.5 * 6e-6),  # was clamped to 88 / stored at 88 before
        (100.0, 100 * 6e-6),
        (1e4, 1e4 * 6e-6),
        (1e20, 1e20 * 6e-6),
    ],
)
def test_other_bucket_round_trips_in_log_space(neg_log_other, tolerance):
    log_probs = torch.tensor([[-0.01, -5.0, -neg_log_other]])
    decoded = round_trip(log_probs)
    assert abs(decoded[0, -1].item() + neg_log_other) <= tolerance
    assert abs(decoded[0, 0].item() + 0.01) < 1e-5


def test_empty_other_bucket_and_masked_top_entries():
    # A masked vocabulary: the bucket can be empty (log p_other = -inf) and top-k entries can be -inf.
    log_probs = torch.tensor([[-0.1, -3.0, float("-inf"), float("-inf")]])
    decoded = round_trip(log_probs)
    assert decoded[0, -1].item() == float("-inf")
    assert decoded[0, 2].item() <= -245.0  # stored at the largest scale: p < 1e-106
    torch.testing.assert_close(decoded[0, :2], log_probs[0, :2], rtol=1e-4, atol=1e-5)


def test_codes_of_the_fixed_point_range_decode_as_before():
    # Stores written before the logarithmic range: every code below 3 * 2**22 (x < 66) decodes exactly as then.
    codes = torch.tensor([0, 1, 12345, 3 * 2**22 - 1])
    expected = codes.double() * (88.0 / (2**24 - 1))
    torch.testing.assert_close(codec._decode_other(codes).double(), expected, rtol=1e-7, atol=0)


def test_store_keeps_a_far_bucket_the_loss_needs():
    # The example: with top_k=1 the teacher's other bucket lies ~99 nats down; stored, the loss stays 100.
    targets = teacher_top_k(torch.tensor([[0.0, 100.0, 0.0, 0.0]]), 1)
    decoded = codec.decode(codec.encode(targets, V), V)
    assert abs(decoded.log_probs[0, -1].item() - (math.log(3.0) - 100.0)) < 1e-3
    assert decoded.log_probs[0, -1].item() < -88.0  # the old fixed point stopped at 88


@pytest.mark.parametrize("objective", ["forward_kl", "jsd"])  # reverse KL is truly infinite here (q_other > 0 = p)
def test_stored_masked_teacher_gives_the_online_loss(objective):
    # A teacher whose vocabulary is masked down to its top-k: the stored "other" bucket is empty (inf), and the loss
    # from the store equals the online top-k loss (it was NaN or a wrong bucket before).
    g = torch.Generator().manual_seed(0)
    h_s, w_s = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g)
    z_t = torch.full((6, 20), float("-inf"))
    z_t[:, [1, 4, 9, 13]] = torch.randn(6, 4, generator=g) * 3
    z_t[:, 13] -= 150.0  # far below the others, but kept in the top-k
    targets = codec.decode(codec.encode(teacher_top_k(z_t.clone(), 4, sorted=True, temperature=2.0), V), V)
    assert torch.isneginf(targets.log_probs[:, -1]).all()
    stored = linear_top_k_distillation_loss(h_s, w_s, *targets, objective=objective, temperature=2.0)
    online = distillation_loss(h_s @ w_s.T, z_t, objective=objective, temperature=2.0, top_k=4)
    assert torch.isfinite(stored)
    torch.testing.assert_close(stored, online, rtol=2e-4, atol=1e-5)
