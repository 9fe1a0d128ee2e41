"""A served teacher scoring training batches live (`teacher_url`, issue 16 part 1): against the stand-in vLLM server
(tests/served_teacher_server.py), training gives the losses of the loaded teacher with the same top-k."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import config
from tests.served_teacher_server import StandInServer
from trl_distill import DistillConfig, DistillTrainer
from trl_distill.demo.tiny import build_tiny_model
from trl_distill.modes import resolve_mode
from trl_distill.modes.token_served import ServedTokenMode
from trl_distill.receipt import load_receipt


K = 8
SERVED = {"kd_top_k": K, "kd_temperature": 1.0, "teacher_request_timeout": 5.0, "teacher_max_retries": 1}


@pytest.fixture(scope="module")
def teacher(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=2)
    with torch.no_grad():  # peaked, so the top-k hold most of the mass while "other" is not empty
        model.lm_head.weight.mul_(4.0)
    return model.eval()


@pytest.fixture
def server(teacher):
    with StandInServer(teacher, lifetime=300) as running:
        yield running


def losses(trainer, key: str = "loss") -> list[float]:
    return [log[key] for log in trainer.state.log_history if key in log]


def test_live_scoring_through_the_server_trains_as_the_loaded_teacher(
    tmp_path, server, teacher, tokenizer, prompt_completion_dataset
):
    common = dict(max_steps=3, max_length=48, **{k: SERVED[k] for k in ("kd_top_k", "kd_temperature")})
    loaded = DistillTrainer(
        model=build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1),
        teacher_model=teacher,
        args=config(tmp_path / "loaded", **common),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,
    )
    loaded.train()
    served = DistillTrainer(
        model=build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1),
        args=config(tmp_path / "served", teacher_url=server.url, **{**SERVED, **common}),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    assert type(served.distill_mode) is ServedTokenMode and served.teacher_model is None
    served.train()
    assert len(server.requests) >= 3 and all(r["prompt_logprobs"] == K for r in server.requests)
    assert len(losses(served)) == 3
    for key in ("loss", "kd_loss"):
        torch.testing.assert_close(
            torch.tensor(losses(served, key)), torch.tensor(losses(loaded, key)), rtol=1e-4, atol=1e-6
        )
    served.save_model()
    stage = load_receipt(tmp_path / "served" / "out")["stages"][0]
    teacher_record = stage["models"]["teacher"]
    assert teacher_record["name_or_path"] == "stand-in-teacher" and teacher_record["served"]["url"] == server.url
    assert "scored live by a served teacher" in stage["method"]


def test_another_served_teacher_gives_other_losses(tmp_path, tokenizer, prompt_completion_dataset):
    results = []
    for seed in (2, 3):
        other = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=seed).eval()
        with torch.no_grad():
            other.lm_head.weight.mul_(4.0)
        with StandInServer(other, lifetime=120) as running:
            trainer = DistillTrainer(
                model=build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1),
                args=config(tmp_path / str(seed), teacher_url=running.url, max_steps=1, max_length=48, **SERVED),
                train_dataset=prompt_completion_dataset,
                processing_class=tokenizer,
            )
            trainer.train()
        results.append(losses(trainer, "kd_loss")[0])
    assert abs(results[0] - results[1]) > 0.05 * results[0], results  # the tolerance above is far tighter


def test_on_policy_samples_are_scored_by_the_server(tmp_path, server, tokenizer, prompt_completion_dataset):
    trainer = DistillTrainer(
        model=build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1),
        args=config(
            tmp_path,
            teacher_url=server.url,
            max_steps=1,
            max_length=48,
            lmbda=1.0,
            alpha=1.0,
            max_completion_length=4,
            **SERVED,
        ),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert torch.isfinite(torch.tensor(losses(trainer))).all()
    assert any(log.get("on_policy") == 1.0 for log in trainer.state.log_history)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kd_top_k=None), "`teacher_url` gives the teacher's top-k log-probabilities only: set `kd_top_k`"),
        (dict(kd_temperature=2.0), r"`kd_temperature=2.0` with `teacher_url`"),
        (dict(teacher_url="localhost:8000"), "`teacher_url` must be an http"),
        (dict(distill_mode="uld"), "`distill_mode='uld'` needs a teacher of its own"),
        (dict(packing=True), "`packing=True` cannot be used with `teacher_url`"),
        (dict(seq_kd=True), r"`seq_kd=True` \(teacher generations\) need a loaded teacher"),
        (dict(teacher_max_concurrency=0), "`teacher_max_concurrency` must be a positive integer"),
    ],
)
def test_served_settings_are_checked_when_the_config_is_made(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(
            **{
                "output_dir": str(tmp_path),
                "use_cpu": True,
                "report_to": "none",
                "teacher_url": "http://127.0.0.1:9",
                **SERVED,
                **kwargs,
            }
        )


def test_a_store_takes_precedence_and_a_loaded_teacher_is_refused(
    tmp_path, server, teacher, tokenizer, prompt_completion_dataset
):
    from trl_distill.modes import OfflineTokenMode

    args = DistillConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        teacher_url=server.url,
        teacher_cache=str(tmp_path / "store"),
        **SERVED,
    )
    assert resolve_mode(args) is OfflineTokenMode  # the store `cache-teacher --teacher_url` filled
    with pytest.raises(ValueError, match="`teacher_model` must not be given"):
        DistillTrainer(
            model=build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1),
            teacher_model=teacher,
            args=config(tmp_path, teacher_url=server.url, **SERVED),
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
        )


def test_a_teacher_of_another_vocabulary_is_refused(tmp_path, other_tokenizer, tokenizer, prompt_completion_dataset):
    big = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=4).eval()
    small_student = build_tiny_model(other_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    with StandInServer(big, lifetime=120) as running:
        args = config(tmp_path, teacher_url=running.url, max_steps=1, max_length=512, **SERVED)
        trainer = DistillTrainer(
            model=small_student, args=args, train_dataset=prompt_completion_dataset, processing_class=other_tokenizer
        )
        with pytest.raises(ValueError, match=r"outside the student's vocabulary of \d+"):
            trainer.train()
