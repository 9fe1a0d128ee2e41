"""A sampled teacher store (issue 16, Sparse Logit Sampling): the estimator, its unbiasedness, the store, training."""

import itertools
import json

import pytest
import torch

from tests import helpers
from tests.reference import divergence
from trl_distill import DistillConfig, DistillTrainer, TeacherStore, cache_teacher
from trl_distill.demo.tiny import build_tiny_model
from trl_distill.losses import (
    SampledObjectiveError,
    linear_sampled_distillation_loss,
    linear_top_k_distillation_loss,
    teacher_sampled_targets,
    teacher_top_k_targets,
)
from trl_distill.teachers import codec
from trl_distill.teachers.store import MANIFEST


# --------------------------------------------------------------------------------------------------------------------
# Float64 reference, written from the formula: KL_hat = -sum_i w_i log softmax(z / T)_{id_i} - H(p).


def reference_sampled_loss(
    student_logits, ids, weights, entropy, labels, *, temperature, alpha, reduction="mean", local_normalizer=False
):
    """`alpha T^2 KL_hat + (1 - alpha) CE`, reduced over positions with a label; float64, autograd-connected.

    `local_normalizer=True` is a classic mistake (a softmax over the sampled ids only), for negative controls.
    """
    keep = labels != -100
    z, i, w, y = student_logits.double()[keep], ids[keep], weights.double()[keep], labels[keep]
    h = entropy.double()[keep]
    T = temperature
    if local_normalizer:
        log_q = torch.log_softmax((z / T).gather(-1, i), dim=-1)
    else:
        log_q = torch.log_softmax(z / T, dim=-1).gather(-1, i)
    kl_hat = -(w * log_q).sum(-1) - h
    loss = alpha * T * T * kl_hat
    if alpha < 1.0:
        loss = loss - (1.0 - alpha) * torch.log_softmax(z, dim=-1).gather(-1, y[:, None]).squeeze(-1)
    return loss.sum() if reduction == "sum" else loss.sum() / max(int(keep.sum()), 1)


def random_draws(g, shape, K, V):
    """Distinct ids with counts summing to K (then unused slots), as a store holds them."""
    n = int(torch.tensor(shape).prod())
    draws = torch.randint(0, V, (n, K), generator=g)
    ordered = draws.sort(-1).values
    ids, counts = torch.zeros_like(ordered), torch.zeros_like(ordered)
    for r in range(n):
        values, c = ordered[r].unique(return_counts=True)
        ids[r, : len(values)], counts[r, : len(values)] = values, c
    entropy = torch.rand(n, generator=g) * 3
    return ids.reshape(*shape, K), (counts.float() / K).reshape(*shape, K), entropy.reshape(shape)


@pytest.mark.parametrize(
    "temperature,alpha,pad,reduction,chunk",
    [(1.0, 1.0, 0, "mean", 5), (2.0, 0.6, 5, "mean", 3), (4.0, 1.0, 0, "sum", 100), (1.0, 0.3, 2, "sum", 1)],
)
def test_sampled_loss_matches_reference(temperature, alpha, pad, reduction, chunk):
    g = torch.Generator().manual_seed(0)
    B, T, H, V, K = 3, 7, 12, 53, 6
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V + pad, H, generator=g) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[1] = -100  # a fully masked row
    ids, weights, entropy = random_draws(g, (B, T), K, V)
    settings = dict(temperature=temperature, alpha=alpha)

    loss = linear_sampled_distillation_loss(
        hidden,
        weight,
        ids,
        weights,
        entropy,
        labels=labels,
        vocab_size=V,
        chunk_size=chunk,
        reduction=reduction,
        **settings,
    )
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = reference_sampled_loss(
        (h64 @ w64.T)[..., :V], ids, weights, entropy, labels, reduction=reduction, **settings
    )
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(weight.grad[V:] == 0)  # padding rows are outside the student's distribution

    # Negative control: normalizing the student over the sampled ids only must not match.
    wrong = reference_sampled_loss(
        (h64 @ w64.T)[..., :V], ids, weights, entropy, labels, reduction=reduction, local_normalizer=True, **settings
    )
    assert not torch.allclose(loss.double(), wrong, rtol=1e-3)


def test_all_masked_gives_zero_and_bad_inputs_are_refused():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(10, 4)
    ids, weights, entropy = torch.zeros(2, 3, 2, dtype=torch.long), torch.full((2, 3, 2), 0.5), torch.zeros(2, 3)
    loss = linear_sampled_distillation_loss(hidden, weight, ids, weights, entropy, labels=torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)
    with pytest.raises(SampledObjectiveError, match=r"`objective='reverse_kl'`.*forward_kl"):
        linear_sampled_distillation_loss(hidden, weight, ids, weights, entropy, objective="reverse_kl")
    with pytest.raises(SampledObjectiveError, match=r"jsd"):
        linear_sampled_distillation_loss(hidden, weight, ids, weights, entropy, objective="jsd")
    with pytest.raises(ValueError, match=r"token ids in \[0, 10\)"):
        linear_sampled_distillation_loss(hidden, weight, ids + 10, weights, entropy)
    with pytest.raises(ValueError, match=r"`teacher_entropy` \(2, 3\)"):
        linear_sampled_distillation_loss(hidden, weight, ids, weights, entropy[:, :2])
    with pytest.raises(ValueError, match=r">= 0"):
        linear_sampled_distillation_loss(hidden, weight, ids, -weights, entropy)


# --------------------------------------------------------------------------------------------------------------------
# Unbiasedness: the expected loss and gradient over the draws are the full-vocabulary forward KL's.


def teacher_and_student(V, N, H=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_t, w_t = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    h_s = (h_t + 0.7 * torch.randn(N, H, generator=g, dtype=torch.float64)).requires_grad_()
    w_s = (w_t + 0.7 * torch.randn(V, H, generator=g, dtype=torch.float64)).requires_grad_()
    return h_s, w_s, h_t, w_t


def full_forward_kl(h_s, w_s, h_t, w_t, T):
    """Float64 reference: mean over rows of T^2 KL(p_T || q_T) over the whole vocabulary, with its gradients."""
    h_s, w_s = h_s.detach().clone().requires_grad_(), w_s.detach().clone().requires_grad_()
    p, q = torch.softmax(h_t @ w_t.T / T, -1), torch.softmax(h_s @ w_s.T / T, -1)
    loss = (T * T * divergence(p, q, "forward_kl", 0.0)).mean()
    loss.backward()
    return loss.detach(), h_s.grad, w_s.grad


def test_expected_loss_and_gradient_equal_the_full_forward_kl_exactly():
    """Enumerate every sequence of K draws (V**K of them) with its probability: the expectation is exact."""
    V, K, N, T = 5, 3, 3, 2.0
    h_s, w_s, h_t, w_t = teacher_and_student(V, N)
    p = torch.softmax(h_t @ w_t.T / T, -1)
    entropy = -(p * p.log()).sum(-1)
    expected_loss, grad_h, grad_w = 0.0, torch.zeros_like(h_s), torch.zeros_like(w_s)
    for row in range(N):
        for draws in itertools.product(range(V), repeat=K):
            prob = float(torch.prod(p[row, list(draws)]))
            values, counts = torch.tensor(draws).unique(return_counts=True)
            ids = torch.zeros(1, K, dtype=torch.long)
            weights = torch.zeros(1, K, dtype=torch.float64)
            ids[0, : len(values)], weights[0, : len(values)] = values, counts.double() / K
            h, w = h_s.detach()[row : row + 1].clone().requires_grad_(), w_s.detach().clone().requires_grad_()
            loss = linear_sampled_distillation_loss(h, w, ids, weights, entropy[row : row + 1], temperature=T)
            loss.backward()
            expected_loss += prob * loss.item() / N
            grad_h[row] += prob * h.grad[0] / N
            grad_w += prob * w.grad / N
    loss, full_h, full_w = full_forward_kl(h_s, w_s, h_t, w_t, T)
    assert abs(expected_loss - loss.item()) < 1e-5 * loss.item()
    torch.testing.assert_close(grad_h, full_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_w, full_w, rtol=1e-5, atol=1e-7)

    # Negative control: top-k at the same bytes per position (k = K) is exact for its own loss, but its gradient is
    # not the full vocabulary's.
    t_ids, t_lp = teacher_top_k_targets(h_t, w_t, top_k=K, temperature=T)
    h = h_s.detach().clone().requires_grad_()
    linear_top_k_distillation_loss(h, w_s.detach(), t_ids, t_lp, temperature=T).backward()
    assert (h.grad - full_h).abs().max() > 20 * (grad_h - full_h).abs().max() + 1e-4


def test_sampler_is_unbiased_statistically_and_top_k_is_not():
    """Many independent stores from the sampler (S seeds): the mean gradient is the full one within 5 standard
    errors, and the top-k gradient at the same bytes per position is outside them."""
    V, K, N, S, T = 40, 4, 4, 3000, 1.0
    h_s, w_s, h_t, w_t = teacher_and_student(V, N, seed=1)
    uniforms = torch.rand(S * N, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids, counts, entropy = teacher_sampled_targets(h_t.repeat(S, 1), w_t, uniforms, temperature=T)
    assert torch.all(counts.sum(-1) == K)
    # The draws' frequencies are the teacher's probabilities (the sampler itself is exact).
    p = torch.softmax(h_t @ w_t.T / T, -1)
    freq = torch.zeros(S, N, V, dtype=torch.float64).view(S * N, V).scatter_add_(-1, ids, counts.double() / K)
    freq = freq.view(S, N, V)
    stderr = (p * (1 - p) / (K * S)).sqrt()
    assert torch.all((freq.mean(0) - p).abs() <= 5 * stderr + 1e-9)
    torch.testing.assert_close(entropy.view(S, N)[0], -(p * p.log()).sum(-1).float(), rtol=1e-5, atol=1e-6)

    h = h_s.detach().unsqueeze(0).expand(S, N, -1).clone().requires_grad_()
    loss = linear_sampled_distillation_loss(
        h,
        w_s.detach(),
        ids.view(S, N, K),
        counts.view(S, N, K).double() / K,
        entropy.view(S, N).double(),
        temperature=T,
        reduction="sum",
    )
    loss.backward()
    per_seed = h.grad  # (S, N, H): each seed's gradient with respect to the row's hidden state
    mean, err = per_seed.mean(0), per_seed.std(0) / S**0.5
    _, full_h, _ = full_forward_kl(h_s, w_s, h_t, w_t, T)
    full_h = full_h * N  # `full_forward_kl` averages over rows; here each row's gradient is summed
    assert torch.all((mean - full_h).abs() <= 5 * err + 1e-6)
    assert abs(loss.item() / S - full_forward_kl(h_s, w_s, h_t, w_t, T)[0].item() * N) < 0.05 * N

    t_ids, t_lp = teacher_top_k_targets(h_t, w_t, top_k=K, temperature=T)
    h_top = h_s.detach().clone().requires_grad_()
    linear_top_k_distillation_loss(h_top, w_s.detach(), t_ids, t_lp, temperature=T, reduction="sum").backward()
    assert ((h_top.grad - full_h).abs() > 5 * err).any()


def test_codec_round_trip_and_limits():
    g = torch.Generator().manual_seed(0)
    for V in (1000, 49152, 262144):
        ids, weights, entropy = random_draws(g, (20,), 12, V)
        counts = (weights * 12).round().long()
        words = codec.encode_sampled(ids, counts, entropy, V)
        assert words.dtype == torch.int32 and words.shape == (20, 13)
        back = codec.decode_sampled(words, V)
        assert torch.equal(back.ids, ids) and torch.equal(back.weights, counts.float() / 12)
        assert torch.equal(back.entropy, entropy.float())
    assert codec.max_num_samples(262144) == 2**14 - 1
    with pytest.raises(ValueError, match="teacher_cache_num_samples=16384"):
        codec.encode_sampled(
            torch.zeros(1, 16384, dtype=torch.long), torch.zeros(1, 16384, dtype=torch.long), torch.zeros(1), 262144
        )


# --------------------------------------------------------------------------------------------------------------------
# The store: writing, reading, verifying, training from it.

NUM_SAMPLES, TEMPERATURE = 12, 2.0


def config(tmp_path, **kwargs):
    settings = dict(max_steps=2, disable_tqdm=True, kd_temperature=TEMPERATURE, max_length=48)
    sampled = dict(teacher_cache_kind="sampled", teacher_cache_num_samples=NUM_SAMPLES, teacher_cache_seed=7)
    return helpers.config(tmp_path, **{**settings, **sampled, **kwargs})


@pytest.fixture(scope="module")
def teacher(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=2)
    with torch.no_grad():  # a peaked teacher, so that the KD term is far from zero
        model.lm_head.weight.mul_(20.0)
    return model


def write(teacher, tokenizer, dataset, directory, eval_dataset=None, **kwargs):
    settings = {"rows_per_shard": 10, "batch_size": 4}
    settings.update({k: kwargs.pop(k) for k in list(kwargs) if k in settings})
    args = config(directory, teacher_cache=str(directory / "store"), **kwargs)
    return cache_teacher(
        teacher, dataset, eval_dataset=eval_dataset, args=args, processing_class=tokenizer, progress=False, **settings
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher, tokenizer, prompt_completion_dataset, eval_dataset):
    root = tmp_path_factory.mktemp("sampled")
    manifest = write(teacher, tokenizer, prompt_completion_dataset, root, eval_dataset=eval_dataset)
    assert manifest is not None
    return root / "store"


def shard_words(path):
    reader = TeacherStore(path, progress=False)
    return {key: reader.read(key).clone() for key in reader.index}


def test_manifest_and_receipt_record_the_sampling(store):
    manifest = json.loads((store / MANIFEST).read_text())
    assert (manifest["store_kind"], manifest["num_samples"], manifest["sample_seed"]) == ("sampled", NUM_SAMPLES, 7)
    assert manifest["top_k"] is None and manifest["encoding"]["bytes_per_position"] == 4 * (NUM_SAMPLES + 1)
    reader = TeacherStore(store, progress=False)  # the digest check passes
    record = reader.teacher_record["store"]
    assert (record["kind"], record["num_samples"], record["sample_seed"]) == ("sampled", NUM_SAMPLES, 7)
    for words in shard_words(store).values():
        counts = (words[:, :-1].long() & 0xFFFFFFFF) >> codec.id_bits(reader.vocab_size)
        assert torch.all(counts.sum(-1) == NUM_SAMPLES)
    # An edited sampling setting is refused by the manifest digest.
    edited = json.loads((store / MANIFEST).read_text())
    edited["num_samples"] = 64
    copy = store.parent / "edited"
    import shutil

    shutil.copytree(store, copy)
    (copy / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"edited.*`num_samples` 12 -> 64"):
        TeacherStore(copy, progress=False)


def test_draws_do_not_depend_on_batching_and_the_seed_changes_them(
    tmp_path, store, teacher, tokenizer, prompt_completion_dataset, eval_dataset
):
    again = write(teacher, tokenizer, prompt_completion_dataset, tmp_path / "a", eval_dataset=eval_dataset)
    assert [s["sha256"] for s in again["shards"]] == [
        s["sha256"] for s in json.loads((store / MANIFEST).read_text())["shards"]
    ]  # a re-run (or a resumed run) writes byte-identical shards
    other_layout = write(
        teacher,
        tokenizer,
        prompt_completion_dataset,
        tmp_path / "b",
        eval_dataset=eval_dataset,
        rows_per_shard=7,
        batch_size=3,
    )
    assert other_layout is not None
    reference, relaid = shard_words(store), shard_words(tmp_path / "b" / "store")
    assert set(relaid) == set(reference)
    # Another batch size pads the teacher's batches differently, which moves its logits by float noise: the entropy
    # words may differ in their last bits, and a draw whose uniform falls within that noise of a CDF boundary may
    # move to the neighbouring token; every other draw is the same.
    draws = torch.cat([relaid[k][:, :-1] for k in reference]), torch.cat([reference[k][:, :-1] for k in reference])
    assert (draws[0] != draws[1]).float().mean() < 1e-3
    entropy = [torch.cat([words[k][:, -1] for k in reference]).view(torch.float32) for words in (relaid, reference)]
    torch.testing.assert_close(entropy[0], entropy[1], rtol=1e-5, atol=1e-6)
    reseeded = write(teacher, tokenizer, prompt_completion_dataset, tmp_path / "c", teacher_cache_seed=8)
    assert reseeded["sample_seed"] == 8
    changed = shard_words(tmp_path / "c" / "store")
    assert any(not torch.equal(changed[k], reference[k]) for k in changed)


def test_store_loss_is_the_sampled_loss_of_the_live_teacher(
    tmp_path, store, teacher, tokenizer, make_student, prompt_completion_dataset
):
    """The loss from the store equals the sampled loss recomputed from the live teacher with the same uniforms."""
    from trl_distill.batch import model_inputs
    from trl_distill.teachers.cache import row_uniforms
    from trl_distill.teachers.store import batch_row_keys

    trainer = DistillTrainer(
        model=make_student(),
        args=config(tmp_path, teacher_cache=str(store), alpha=1.0),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    assert type(trainer.distill_mode).__name__ == "SampledOfflineTokenMode" and trainer.teacher_model is None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grad = trainer.model.lm_head.weight.grad.clone()

    in_loss = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        t_hidden = teacher.model(**model_inputs(batch)).last_hidden_state[:, :-1][in_loss]
        uniforms = torch.cat(
            [
                row_uniforms(key, 7, int(n), NUM_SAMPLES)
                for key, n in zip(batch_row_keys(batch), in_loss.sum(-1).tolist())
            ]
        )
        ids, counts, entropy = teacher_sampled_targets(
            t_hidden, teacher.lm_head.weight, uniforms, temperature=TEMPERATURE, vocab_size=len(tokenizer)
        )
    student = make_student()
    s_hidden = student(**model_inputs(batch), output_hidden_states=True).hidden_states[-1][:, :-1][in_loss]
    direct = linear_sampled_distillation_loss(
        s_hidden,
        student.lm_head.weight,
        ids,
        counts.float() / NUM_SAMPLES,
        entropy,
        temperature=TEMPERATURE,
        vocab_size=len(tokenizer),
    )
    direct.backward()
    assert loss.item() > 0.05
    assert abs(loss.item() / direct.item() - 1) < 1e-5
    torch.testing.assert_close(grad, student.lm_head.weight.grad, rtol=1e-4, atol=1e-6)

    # Negative control: the rows matched to another row's draws give another loss.
    shuffled = {k: v.roll(1, dims=0) for k, v in batch.items()}
    other = trainer.distill_mode.store.sampled_targets(shuffled)
    assert not torch.equal(other.ids[0], trainer.distill_mode.store.sampled_targets(batch).ids[0])


def test_trains_from_a_sampled_store(
    tmp_path, store, tokenizer, make_student, prompt_completion_dataset, eval_dataset
):
    trainer = DistillTrainer(
        model=make_student(),
        args=config(tmp_path, teacher_cache=str(store), max_steps=3, alpha=0.9, eval_strategy="steps", eval_steps=3),
        train_dataset=prompt_completion_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param.detach(), before[name]), name
    logs = trainer.state.log_history
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs if "loss" in log)
    assert any("eval_loss" in log for log in logs)
    from trl_distill.provenance import applicable_settings

    settings = applicable_settings(trainer.args.to_dict())
    assert (settings["teacher_cache_kind"], settings["teacher_cache_num_samples"]) == ("sampled", NUM_SAMPLES)


@pytest.mark.parametrize(
    "settings,error,match",
    [
        (dict(objective="reverse_kl"), SampledObjectiveError, r"`objective='reverse_kl'` cannot be trained from a"),
        (dict(objective="generalized_jsd", beta=0.5), SampledObjectiveError, r"`beta=0.5`"),
        (dict(kd_top_k=12), ValueError, r"`kd_top_k=12` with `teacher_cache_kind='sampled'`"),
        (dict(teacher_cache_kind="random"), ValueError, r"`teacher_cache_kind` must be 'topk' or 'sampled'"),
        (dict(teacher_cache_num_samples=0), ValueError, r"`teacher_cache_num_samples` must be a positive integer"),
    ],
)
def test_config_refuses_what_a_sampled_store_cannot_estimate(tmp_path, settings, error, match):
    with pytest.raises(error, match=match):
        config(tmp_path, teacher_cache=str(tmp_path), **settings)
    config(tmp_path, teacher_cache=str(tmp_path), objective="generalized_jsd", beta=0.0)  # = forward KL


def test_store_kind_defaults_to_sampled_without_kd_top_k(tmp_path):
    """`teacher_cache_kind=None` resolves from `kd_top_k` (top-k stores keep working unchanged)."""
    defaults = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, teacher_cache=str(tmp_path))
    assert DistillConfig(**defaults).teacher_cache_kind == "sampled"
    assert DistillConfig(**defaults, kd_top_k=8).teacher_cache_kind == "topk"
    assert DistillConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).teacher_cache_kind is None
    with pytest.raises(SampledObjectiveError):  # the sampled default still refuses what it cannot estimate
        DistillConfig(**defaults, objective="reverse_kl")


def test_kind_mismatch_and_served_teacher_are_refused(
    tmp_path, store, tokenizer, make_student, prompt_completion_dataset
):
    with pytest.raises(ValueError, match=r"`teacher_cache_kind='topk'` but .* is a 'sampled' store.*`kd_top_k=None`"):
        DistillTrainer(
            model=make_student(),
            args=config(tmp_path, teacher_cache=str(store), teacher_cache_kind="topk", kd_top_k=4),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
        )
    from trl_distill.teachers.served import SampledStoreUnsupportedError, cache_teacher_served

    with pytest.raises(SampledStoreUnsupportedError, match=r"needs its full softmax"):
        cache_teacher_served(
            "http://127.0.0.1:9",
            prompt_completion_dataset,
            args=config(tmp_path, teacher_cache=str(tmp_path / "s")),
            processing_class=tokenizer,
        )
