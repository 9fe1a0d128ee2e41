"""Feature (hidden-state) KD: the loss against its float64 reference, layer maps, projections, and the trainer wiring."""

import dataclasses
import json
import os

import pytest
import torch

from tests import helpers
from tests.reference_features import reference_feature_loss
from trl_distill import DistillConfig, DistillTrainer
from trl_distill.losses import feature_distillation_loss
from trl_distill.terms import (
    FEATURE_PROJECTIONS_NAME,
    FeatureProjector,
    default_layer_map,
    load_feature_projections,
    parse_layer_map,
    resolve_layer_map,
    save_feature_projections,
)


# ------------------------------------------------------------------------------------------------------------ the loss
def make_features(seed=0, B=3, T=7, widths=(5, 13), mask_prob=0.3):
    """Two layer pairs of different widths, random masked positions and one fully masked row."""
    g = torch.Generator().manual_seed(seed)
    students = [torch.randn(B, T, d, generator=g) for d in widths]
    teachers = [torch.randn(B, T, d, generator=g) * 2 + 0.5 for d in widths]
    mask = torch.rand(B, T, generator=g) > mask_prob
    mask[1] = False
    return students, teachers, mask


def ours_and_reference(students, teachers, **kwargs):
    ours_in = [s.clone().requires_grad_(True) for s in students]
    ref_in = [s.double().clone().requires_grad_(True) for s in students]
    teachers_in = [t.clone().requires_grad_(True) for t in teachers]  # must receive no gradient
    ours = feature_distillation_loss(ours_in, teachers_in, **kwargs)
    ref = reference_feature_loss(ref_in, [t.double() for t in teachers], **kwargs)
    ours.backward()
    ref.backward()
    assert all(t.grad is None for t in teachers_in), "the teacher's features received a gradient"
    return ours, ref, [s.grad for s in ours_in], [s.grad for s in ref_in]


@pytest.mark.parametrize("loss", ["mse", "cosine", "relative_mse"])
@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("mean", 37), ("sum", None)])
def test_loss_and_gradients_match_reference(loss, reduction, num_items):
    students, teachers, mask = make_features(seed=len(loss) + (num_items or 0))
    kwargs = dict(mask=mask, loss=loss, reduction=reduction, num_items_in_batch=num_items)
    ours, ref, grads, ref_grads = ours_and_reference(students, teachers, **kwargs)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
        assert torch.all(grad[~mask] == 0), "a masked position received a gradient"

    # Negative controls: the same reference without the mask, and (mse) summed instead of averaged over dimensions.
    unmasked = reference_feature_loss(students, teachers, loss=loss, reduction=reduction, num_items_in_batch=num_items)
    assert not torch.isclose(ours.double(), unmasked, rtol=1e-3)
    if loss == "mse":
        width_summed = sum(
            reference_feature_loss([s], [t], mask=mask, loss=loss, reduction=reduction, num_items_in_batch=num_items)
            * s.shape[-1]
            for s, t in zip(students, teachers)
        ) / len(students)
        assert not torch.isclose(ours.double(), width_summed, rtol=1e-3)


@pytest.mark.parametrize("loss", ["mse", "cosine", "relative_mse"])
def test_zero_when_features_match_and_when_all_masked(loss):
    students, _, mask = make_features()
    same = [s.clone().requires_grad_(True) for s in students]
    value = feature_distillation_loss(same, [s.detach() for s in students], mask=mask, loss=loss)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert all(g.abs().max() < 1e-6 for g in (s.grad for s in same))

    # Nothing selected (and zero features for cosine): an exact zero with finite, zero gradients, never NaN.
    zeros = [torch.zeros_like(s).requires_grad_(True) for s in students]
    value = feature_distillation_loss(zeros, students, mask=torch.zeros_like(mask), loss=loss)
    value.backward()
    assert value.item() == 0.0 and all(torch.equal(z.grad, torch.zeros_like(z)) for z in zeros)


@pytest.mark.parametrize("loss,expected", [("mse", 2.0), ("cosine", 1.0), ("relative_mse", 2.0)])
def test_scale_does_not_depend_on_hidden_size(loss, expected):
    # Independent unit-normal features: E[mse] = 2 and E[1 - cos] = 1 at any width, E[relative_mse] -> 2.
    g = torch.Generator().manual_seed(0)
    for width in (16, 1024):
        s, t = torch.randn(4096, width, generator=g), torch.randn(4096, width, generator=g)
        # relative_mse: E[(|s|^2 + |t|^2 - 2 s.t) / |t|^2] = D / (D - 2) + 1 (inverse chi-square mean), tends to 2
        mean = width / (width - 2) + 1 if loss == "relative_mse" else expected
        assert feature_distillation_loss(s, t, loss=loss).item() == pytest.approx(mean, rel=0.05), width


def test_relative_mse_is_not_dominated_by_a_massive_activation():
    # A real LM's hidden state (SmolLM2: ~25,000 in one dimension at the first position): with "mse" that one position
    # decides the term; "relative_mse" divides each position by the teacher's energy there, so it stays O(1), matches
    # the float64 reference, and does not change when the teacher's features are scaled together with the student's.
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 9, 64, generator=g)
    teacher[:, 0, 5] = 25_000.0
    student = (teacher + 0.3 * torch.randn(2, 9, 64, generator=g)).requires_grad_(True)
    student.data[:, 0, 5] = 24_000.0
    mse = feature_distillation_loss(student, teacher, loss="mse").item()
    value = feature_distillation_loss(student, teacher, loss="relative_mse")
    value.backward()
    ref_in = student.detach().double().requires_grad_(True)
    ref = reference_feature_loss([ref_in], [teacher.double()], loss="relative_mse")
    ref.backward()
    torch.testing.assert_close(value.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(student.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-9)
    assert mse > 1000 and value.item() < 1.0, (mse, value.item())
    scaled = feature_distillation_loss(student.detach() * 7, teacher * 7, loss="relative_mse")
    torch.testing.assert_close(scaled, value.detach(), rtol=1e-5, atol=1e-7)
    # Negative control: normalizing by the width instead of the teacher's energy is the plain "mse" again.
    assert not torch.isclose(value.double(), ref * 0 + mse, rtol=1e-3)


def test_half_precision_inputs_give_float32_loss():
    students, teachers, mask = make_features()
    student = students[0].bfloat16().requires_grad_(True)
    value = feature_distillation_loss(student, teachers[0].bfloat16(), mask=mask)
    value.backward()
    assert value.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert torch.isfinite(student.grad.float()).all()


def test_loss_input_errors():
    s, t, mask = make_features()
    with pytest.raises(ValueError, match="project the student"):
        feature_distillation_loss(s[0], t[1])
    with pytest.raises(ValueError, match="one per layer pair"):
        feature_distillation_loss(s, t[:1])
    with pytest.raises(ValueError, match="`mask` must have shape"):
        feature_distillation_loss(s, t, mask=mask[:, :3])
    with pytest.raises(ValueError, match="`loss`"):
        feature_distillation_loss(s, t, loss="l1")


# ------------------------------------------------------------------------------------------------------- layer maps
@pytest.mark.parametrize(
    "value",
    ["0:1,1:3", " 0 : 1 , 1:3 ", "[[0, 1], [1, 3]]", [[0, 1], (1, 3)], ["0:1", "1:3"], ((0, 1), (1, 3))],
)
def test_layer_map_forms(value):
    assert parse_layer_map(value) == [[0, 1], [1, 3]]


@pytest.mark.parametrize("value", ["0-1", "a:b", "0:1:2", "", [[0, 1, 2]], [[0, True]], 3, [["0", "1"]]])
def test_bad_layer_maps_are_refused(value):
    with pytest.raises(ValueError, match="feature_layer_map"):
        parse_layer_map(value)


def test_default_layer_map_is_evenly_spaced_and_ends_at_the_last_layers():
    assert default_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert default_layer_map(4, 2) == [(1, 0), (3, 1)]
    assert default_layer_map(3, 8) == [(0, 1), (1, 4), (2, 7)]
    assert default_layer_map(1, 5) == [(0, 4)]
    for student_layers, teacher_layers in [(2, 4), (6, 24), (24, 28), (5, 3)]:
        pairs = default_layer_map(student_layers, teacher_layers)
        assert len(pairs) == min(student_layers, teacher_layers)
        assert pairs[-1] == (student_layers - 1, teacher_layers - 1)
        assert all(a < b for a, b in zip(pairs, pairs[1:]))  # strictly increasing on both sides


def test_resolve_layer_map():
    assert resolve_layer_map(None, 2, 4) == ((0, 1), (1, 3))
    assert resolve_layer_map([[0, -1], [-1, 2]], 2, 4) == ((0, 3), (1, 2))
    with pytest.raises(ValueError, match=r"`feature_layer_map` pair 0:4 is out of range.*teacher 4"):
        resolve_layer_map([[0, 4]], 2, 4)
    with pytest.raises(ValueError, match="same pair twice"):
        resolve_layer_map([[1, 3], [-1, -1]], 2, 4)


# -------------------------------------------------------------------------------------------------------- projections
def test_projector_kinds_and_initialization():
    same = FeatureProjector([(0, 0)], 8, 8)
    assert isinstance(same.projections[0], torch.nn.Identity) and not list(same.parameters())

    always = FeatureProjector([(0, 0)], 8, 8, projection="always")
    x = torch.randn(5, 8)
    torch.testing.assert_close(always.projections[0](x), x)  # identity-initialized, but learned

    widen = FeatureProjector([(0, 1), (1, 3)], 8, 32, seed=3)
    assert widen.teacher_hidden_state_indices == [2, 4]
    for projection in widen.projections:
        torch.testing.assert_close(projection(x).norm(dim=-1), x.norm(dim=-1))  # semi-orthogonal: norm-preserving
    again = FeatureProjector([(0, 1), (1, 3)], 8, 32, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(widen.state_dict().values(), again.state_dict().values()))


def test_projection_save_and_load_are_bit_exact(tmp_path):
    trained = FeatureProjector([(0, 1), (1, 3)], 8, 32, seed=1)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    save_feature_projections(trained, tmp_path)
    fresh = FeatureProjector([(0, 1), (1, 3)], 8, 32, seed=2)
    load_feature_projections(fresh, tmp_path / FEATURE_PROJECTIONS_NAME)
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="layer_map"):
        load_feature_projections(FeatureProjector([(1, 3)], 8, 32), tmp_path / FEATURE_PROJECTIONS_NAME)


# ---------------------------------------------------------------------------------------------------------- config
def test_config_fields_parse_from_python_command_line_and_yaml(tmp_path):
    from trl import TrlParser

    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    python = DistillConfig(**base, feature_weight=0.5, feature_layer_map=[(0, 1), (1, 3)])
    assert python.feature_layer_map == [[0, 1], [1, 3]]

    parser = TrlParser((DistillConfig,))
    (cli,) = parser.parse_args_and_config(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "true",
            "--feature_weight",
            "0.5",
            "--feature_layer_map",
            "0:1,1:3",
            "--feature_loss",
            "cosine",
            "--feature_projection",
            "always",
        ]
    )
    assert (cli.feature_weight, cli.feature_layer_map) == (0.5, [[0, 1], [1, 3]])
    assert (cli.feature_loss, cli.feature_projection) == ("cosine", "always")

    for layer_map in ([[0, 1], [1, 3]], "0:1,1:3", ["0:1", "1:3"]):
        yaml_path = tmp_path / "c.yaml"
        yaml_path.write_text(json.dumps({**base, "feature_weight": 1.0, "feature_layer_map": layer_map}))
        (from_yaml,) = TrlParser((DistillConfig,)).parse_args_and_config(["--config", str(yaml_path)])
        assert from_yaml.feature_layer_map == [[0, 1], [1, 3]], layer_map


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(feature_weight=-1.0), "feature_weight"),
        (dict(feature_weight=float("nan")), "feature_weight"),
        (dict(feature_weight=1.0, feature_loss="l1"), "feature_loss"),
        (dict(feature_weight=1.0, feature_projection="never"), "feature_projection"),
        (dict(feature_weight=1.0, feature_layer_map="0:1;1:3"), "feature_layer_map"),
    ],
)
def test_config_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)


def test_config_refuses_other_modes_and_warns_on_an_unused_map(tmp_path):
    with pytest.warns(UserWarning, match="feature_layer_map.*ignored"):
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, feature_layer_map="0:1")
    # A mode without `supports_feature_term` (e.g. ULD, sequence) must not silently drop the feature term.
    for mode in ("uld", "sequence"):
        with pytest.raises(ValueError, match="`feature_weight=1.0` is supported with `distill_mode='token'` only"):
            DistillConfig(output_dir=str(tmp_path), use_cpu=True, distill_mode=mode, feature_weight=1.0)


# --------------------------------------------------------------------------------------------------------- trainer
def args(tmp_path, **kwargs):
    return helpers.config(tmp_path, **{"feature_weight": 1.0, **kwargs})


@pytest.fixture
def wide_teacher(make_teacher):
    """The issue's shape: a 4 x 128 teacher for a 2 x 64 student."""
    return lambda: make_teacher(hidden_size=128, num_layers=4, num_heads=4)


def params(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def trainer_for(tmp_path, tokenizer, student, teacher, dataset, **kwargs):
    return DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args(tmp_path, **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def test_trains_student_and_projections_across_widths_and_depths(
    tmp_path, tokenizer, make_student, wide_teacher, prompt_completion_dataset
):
    student, teacher = make_student(hidden_size=64), wide_teacher()
    seen = []
    teacher.model.register_forward_pre_hook(
        lambda module, a, kw: seen.append(kw.get("output_hidden_states")), with_kwargs=True
    )
    trainer = trainer_for(tmp_path, tokenizer, student, teacher, prompt_completion_dataset, feature_loss="cosine")
    projector = trainer.feature_projector
    assert projector.layer_map == ((0, 1), (1, 3))  # the default map
    assert [tuple(p.weight.shape) for p in projector.projections] == [(128, 64), (128, 64)]
    before_s, before_t, before_p = params(trainer.model), params(teacher), params(projector)
    trainer.train()

    for name, p in trainer.model.named_parameters():
        assert not torch.equal(p.detach(), before_s[name]), f"student parameter {name} did not change"
    for name, p in projector.named_parameters():
        assert not torch.equal(p.detach(), before_p[name]), f"projection {name} did not change"
    for name, p in teacher.named_parameters():
        assert torch.equal(p.detach(), before_t[name]) and p.grad is None, f"teacher parameter {name}"
    assert all(p.grad is None for p in projector.parameters())  # zeroed after each step, like the model's
    assert seen and all(s in ([2, 4], True) for s in seen)  # only the mapped teacher layers are kept
    logged = [log for log in trainer.state.log_history if "feature_kd_loss" in log]
    assert logged and all(0 < log["feature_kd_loss"] <= 2 for log in logged)


def test_feature_term_reaches_the_student_and_is_off_by_default(
    tmp_path, tokenizer, make_student, wide_teacher, prompt_completion_dataset
):
    trainer = trainer_for(tmp_path, tokenizer, make_student(hidden_size=64), wide_teacher(), prompt_completion_dataset)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()

    def first_layer_grad():
        trainer.model.zero_grad()
        loss, metrics = trainer.distill_mode.compute_loss(trainer.model, batch, None)
        loss.backward()
        return trainer.model.model.layers[0].mlp.down_proj.weight.grad.clone(), metrics

    with_features, metrics = first_layer_grad()
    assert "feature_kd_loss" in metrics
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.feature_projector.parameters())
    # The same batch through a token mode built without the feature term.
    trainer.distill_mode = type(trainer.distill_mode)(dataclasses.replace(trainer.mode_context, feature_term=None))
    without, metrics = first_layer_grad()
    assert "feature_kd_loss" not in metrics and not torch.allclose(with_features, without)

    # feature_weight == 0 (the default): no projector, no hidden states asked of the teacher, nothing saved.
    teacher, seen = wide_teacher(), []
    teacher.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    off = trainer_for(
        tmp_path / "off",
        tokenizer,
        make_student(hidden_size=64),
        teacher,
        prompt_completion_dataset,
        feature_weight=0.0,
        max_steps=1,
    )
    off.train()
    off.save_model()
    assert off.feature_projector is None and seen and all("output_hidden_states" not in kw for kw in seen)
    assert not os.path.exists(tmp_path / "off" / "out" / FEATURE_PROJECTIONS_NAME)


def test_out_of_range_layer_map_fails_at_trainer_start(
    tmp_path, tokenizer, make_student, wide_teacher, prompt_completion_dataset
):
    with pytest.raises(ValueError, match=r"`feature_layer_map` pair 1:4 is out of range"):
        trainer_for(
            tmp_path, tokenizer, make_student(), wide_teacher(), prompt_completion_dataset, feature_layer_map="0:0,1:4"
        )


def test_checkpoint_resume_and_export(tmp_path, tokenizer, make_student, wide_teacher, prompt_completion_dataset):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    full = trainer_for(
        tmp_path, tokenizer, make_student(hidden_size=64), wide_teacher(), prompt_completion_dataset, **settings
    )
    full.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / FEATURE_PROJECTIONS_NAME).exists()

    resumed = trainer_for(
        tmp_path, tokenizer, make_student(hidden_size=64), wide_teacher(), prompt_completion_dataset, **settings
    )
    resumed._load_from_checkpoint(str(checkpoint))
    with safe_open(str(checkpoint / FEATURE_PROJECTIONS_NAME), framework="pt") as f:
        for name, p in resumed.feature_projector.state_dict().items():
            assert torch.equal(p, f.get_tensor(name)), f"{name} not restored bit for bit"
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(
        full.feature_projector.state_dict().items(), resumed.feature_projector.state_dict().values()
    ):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)  # optimizer state restored too

    def losses(trainer):
        return [log["loss"] for log in trainer.state.log_history if "loss" in log and log["step"] in (3, 4)]

    assert len(losses(resumed)) == 2 and losses(resumed) == pytest.approx(losses(full), rel=1e-5)

    # The exported student loads cleanly; the projections sit beside it and are picked up when training continues.
    export = tmp_path / "export"
    full.save_model(str(export))
    model, info = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        assert not any("projection" in key for key in f.keys())
    again = DistillTrainer(
        model=str(export),
        teacher_model=wide_teacher(),
        args=args(tmp_path / "again"),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    for (name, a), b in zip(
        full.feature_projector.state_dict().items(), again.feature_projector.state_dict().values()
    ):
        assert torch.equal(a, b), name


def test_gradient_accumulation_matches_one_big_batch(
    tmp_path, tokenizer, make_student, wide_teacher, prompt_completion_dataset
):
    def one_step(path, **kwargs):
        trainer = trainer_for(
            path,
            tokenizer,
            make_student(hidden_size=64),
            wide_teacher(),
            prompt_completion_dataset,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            **kwargs,
        )
        trainer.train()
        return {**params(trainer.model), **{f"proj.{k}": v for k, v in params(trainer.feature_projector).items()}}

    big = one_step(tmp_path / "big", per_device_train_batch_size=4)
    accumulated = one_step(tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_student_keeps_projections_trainable(
    tmp_path, tokenizer, make_student, wide_teacher, prompt_completion_dataset
):
    from peft import LoraConfig

    trainer = DistillTrainer(
        model=make_student(hidden_size=64),
        teacher_model=wide_teacher(),
        args=args(tmp_path, activation_checkpointing=True),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    before = params(trainer.feature_projector)
    trainer.train()
    assert all("lora" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    for name, p in trainer.feature_projector.named_parameters():
        assert p.requires_grad and not torch.equal(p.detach(), before[name]), name
    trainer.save_model()
    assert (tmp_path / "out" / FEATURE_PROJECTIONS_NAME).exists() and (
        tmp_path / "out" / "adapter_model.safetensors"
    ).exists()


def test_mixed_precision_and_packing(tmp_path, tokenizer, make_student, wide_teacher, prompt_completion_dataset):
    trainer = trainer_for(
        tmp_path,
        tokenizer,
        make_student(hidden_size=64),
        wide_teacher(),
        prompt_completion_dataset,
        bf16=True,
        max_steps=2,
        packing=True,
        max_length=64,
        per_device_train_batch_size=2,
    )
    assert trainer.accelerator.mixed_precision == "bf16"
    assert "position_ids" in trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    before = params(trainer.feature_projector)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in trainer.feature_projector.parameters())
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.feature_projector.named_parameters())


def test_ddp_step_matches_one_process(tmp_path):
    # Two gloo processes x 2 rows give the step of one process x 4 rows: the projections' gradients are averaged
    # across ranks like DDP averages the student's (they live outside the DDP wrapper).
    import signal
    import subprocess
    import sys

    from tests.feature_ddp_script import one_step

    out = tmp_path / "ddp.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    # Its own process group, so that a hang kills the workers too, not only the launcher.
    process = subprocess.Popen(
        [*torchrun, "tests/feature_ddp_script.py", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    assert process.returncode == 0, output[-3000:]
    single = one_step(str(tmp_path / "single"), world_size=1)
    ddp = torch.load(out)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_without_projections_is_refused(
    tmp_path, tokenizer, make_student, wide_teacher, prompt_completion_dataset
):
    settings = dict(max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    trainer_for(
        tmp_path, tokenizer, make_student(hidden_size=64), wide_teacher(), prompt_completion_dataset, **settings
    ).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    (checkpoint / FEATURE_PROJECTIONS_NAME).unlink()
    resumed = trainer_for(
        tmp_path,
        tokenizer,
        make_student(hidden_size=64),
        wide_teacher(),
        prompt_completion_dataset,
        **{**settings, "max_steps": 4},
    )
    with pytest.raises(ValueError, match=f"has no {FEATURE_PROJECTIONS_NAME}.*optimizer state"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
