"""Our losses equal TRL's on the same inputs, values and gradients (the agreement check of
`benchmarks/loss_memory.py --check`, in CI).

- `GKDTrainer.generalized_jsd_loss` (`trl.experimental.gkd`), on full logits;
- `_chunked_divergence_loss` (`trl.trainer.distillation_trainer`), what `DistillationTrainer` runs from hidden states.

Both use TRL's `beta` (0 forward KL, 1 reverse KL, else generalized JSD) and return the divergence `D`; ours returns
`T^2 * D` (Hinton et al.), so ours is divided by `T^2` before comparing.
"""

import os
import warnings

import pytest
import torch


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer
from trl.trainer.distillation_trainer import _chunked_divergence_loss

from trl_distill.losses import distillation_loss, linear_distillation_loss


N, H, V = 96, 16, 300
# (our objective, our beta, TRL's beta)
CASES = [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.5, 0.5), ("generalized_jsd", 0.3, 0.3)]


def inputs(seed=0):
    """Hidden states `(1, N, H)` and `lm_head` weights `(V, H)` (logits of std ~2); 75% of positions in the loss."""
    g = torch.Generator().manual_seed(seed)
    h_s, h_t = torch.randn(1, N, H, generator=g), torch.randn(1, N, H, generator=g)
    w_s = torch.randn(V, H, generator=g) * 2 / H**0.5
    w_t = torch.randn(V, H, generator=g) * 2 / H**0.5
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, torch.randperm(N, generator=g)[: 3 * N // 4]] = True
    return h_s, w_s, h_t, w_t, mask


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("objective,beta,trl_beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logits_loss_equals_gkd_generalized_jsd(objective, beta, trl_beta, temperature):
    h_s, w_s, h_t, w_t, mask = inputs()
    z_s, z_t = h_s @ w_s.T, h_t @ w_t.T
    labels = torch.where(mask, 0, -100)  # GKD selects positions by labels != -100

    (theirs_z,) = leaves(z_s)
    theirs = GKDTrainer.generalized_jsd_loss(theirs_z, z_t, labels=labels, beta=trl_beta, temperature=temperature)
    theirs.backward()
    (ours_z,) = leaves(z_s)
    ours = distillation_loss(ours_z, z_t, mask=mask, objective=objective, beta=beta, temperature=temperature)
    (ours / temperature**2).backward()

    torch.testing.assert_close(ours / temperature**2, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_z.grad, theirs_z.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("objective,beta,trl_beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_linear_loss_equals_distillation_trainer_chunked_path(objective, beta, trl_beta, temperature):
    h_s, w_s, h_t, w_t, mask = inputs(seed=1)
    theirs_h, theirs_w = leaves(h_s, w_s)
    theirs, _entropy, _count = _chunked_divergence_loss(
        theirs_h, h_t, theirs_w, w_t, mask, trl_beta, temperature=temperature
    )
    theirs.backward()
    ours_h, ours_w = leaves(h_s, w_s)
    ours = linear_distillation_loss(
        ours_h, ours_w, h_t, w_t, mask=mask, objective=objective, beta=beta, temperature=temperature, chunk_size=32
    )
    (ours / temperature**2).backward()

    torch.testing.assert_close(ours / temperature**2, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_h.grad, theirs_h.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours_w.grad, theirs_w.grad, rtol=1e-4, atol=1e-7)


def test_parity_check_can_fail():
    # Negative control: with the KL direction swapped the two do not agree.
    h_s, w_s, h_t, w_t, mask = inputs()
    z_s, z_t = h_s @ w_s.T, h_t @ w_t.T
    theirs = GKDTrainer.generalized_jsd_loss(z_s, z_t, labels=torch.where(mask, 0, -100), beta=0.0)
    ours = distillation_loss(z_s, z_t, mask=mask, objective="reverse_kl")
    assert not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4)
