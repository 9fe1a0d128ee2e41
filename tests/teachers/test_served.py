"""A served teacher (issue 16, part 1): the offline store filled through vLLM's completions protocol, against a
stand-in server on 127.0.0.1 that wraps a local model (tests/served_teacher_server.py), and its failure modes."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.served_teacher_server import StandInServer
from trl_distill import DistillConfig, TeacherStore, cache_teacher
from trl_distill.demo.tiny import build_tiny_model
from trl_distill.teachers import codec
from trl_distill.teachers import served as served_module
from trl_distill.teachers.served import (
    MissingPromptLogprobsError,
    ServedTeacher,
    ServedTeacherError,
    UnnormalizedLogProbsError,
    cache_teacher_served,
)
from trl_distill.teachers.store import MANIFEST


K = 8
FAST = {"timeout": 5.0, "backoff": 0.01, "max_backoff": 0.05}  # bounded: a failing test ends in seconds


def config(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "bf16": False,
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "kd_top_k": K,
        "kd_temperature": 1.0,
        "activation_checkpointing": False,
        "max_length": 48,
    }
    return DistillConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def teacher(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=2)
    with torch.no_grad():  # peaked, so that the top-k hold most of the mass and "other" is small but not zero
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture
def server(teacher):
    with StandInServer(teacher, lifetime=120) as running:
        yield running


PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 8, 9], [300, 1, 2, 3, 4, 5, 6, 7]]


def reference_targets(teacher, prompt, k, temperature=1.0):
    """Float64, from the formula: top-k of log_softmax(z / T) and log(sum of the probabilities outside them)."""
    with torch.no_grad():
        logits = teacher(torch.tensor([prompt])).logits[0, :-1].double() / temperature
    log_probs = logits.log_softmax(-1)
    values, ids = log_probs.topk(k, dim=-1)
    rest = log_probs.scatter(-1, ids, -torch.inf).logsumexp(-1, keepdim=True)
    return ids, torch.cat([values, rest], dim=-1)


def test_scores_match_the_float64_reference(server, teacher):
    client = ServedTeacher(server.url, top_k=K, prompts_per_request=2, max_concurrency=2, **FAST)
    assert client.model == "stand-in-teacher"
    scored = client.score(PROMPTS)
    # Two requests in flight at once: they may arrive in either order.
    assert sorted(map(str, (r["prompt"] for r in server.requests))) == sorted(map(str, (PROMPTS[:2], PROMPTS[2:])))
    assert all(r["max_tokens"] == 1 and r["prompt_logprobs"] == K for r in server.requests)
    for prompt, targets in zip(PROMPTS, scored):
        ids, log_probs = reference_targets(teacher, prompt, K)
        assert torch.equal(targets.ids, ids)
        torch.testing.assert_close(targets.log_probs.double(), log_probs, atol=2e-5, rtol=1e-5)
    # Not vacuous: the "other" bucket holds real mass, and keeping the prompt's own token (returned outside the top-k)
    # among the entries would change the ids.
    assert all(bool((targets.log_probs[:, -1] > -5).any()) for targets in scored)
    assert any(len(entries) == K + 1 for entries in server.prompt_logprobs(PROMPTS[0], K, 1.0)[1:])


def test_store_through_the_server_equals_the_in_process_store(
    tmp_path, server, teacher, tokenizer, prompt_completion_dataset, eval_dataset
):
    common = {"eval_dataset": eval_dataset, "processing_class": tokenizer, "rows_per_shard": 10, "progress": False}
    local = cache_teacher(
        teacher,
        prompt_completion_dataset,
        args=config(tmp_path, teacher_cache=str(tmp_path / "a")),
        batch_size=4,
        **common,
    )
    remote = cache_teacher_served(
        server.url,
        prompt_completion_dataset,
        args=config(tmp_path, teacher_cache=str(tmp_path / "b")),
        prompts_per_request=3,
        max_concurrency=2,
        **FAST,
        **common,
    )
    assert remote["splits"] == local["splits"]  # same rows (fingerprints), same positions
    assert remote["teacher"]["name_or_path"] == "stand-in-teacher" and remote["teacher"]["weights_sha256"] is None
    served = remote["teacher"]["served"]
    assert served["url"] == server.url and served["model"] == "stand-in-teacher" and served["top_k"] == K
    assert served["temperature"] == 1.0 and not served["server_applies_temperature"]
    assert served["transport"] == {"prompts_per_request": 3, "max_concurrency": 2, "timeout": 5.0, "max_retries": 5}
    vocab = len(tokenizer)
    for a, b in zip(local["shards"], remote["shards"]):
        with safe_open(tmp_path / "a" / a["file"], "pt") as fa, safe_open(tmp_path / "b" / b["file"], "pt") as fb:
            assert torch.equal(fa.get_tensor("keys"), fb.get_tensor("keys"))
            assert torch.equal(fa.get_tensor("offsets"), fb.get_tensor("offsets"))
            ta, tb = codec.decode(fa.get_tensor("entries"), vocab), codec.decode(fb.get_tensor("entries"), vocab)
        assert torch.equal(ta.ids, tb.ids)
        torch.testing.assert_close(ta.log_probs, tb.log_probs, atol=2e-3, rtol=1e-3)  # float noise + 4-byte codec
    # The store opens and serves the same batch targets as live scoring through the server.
    store = TeacherStore(tmp_path / "b", progress=False)
    live = ServedTeacher(server.url, top_k=K, **FAST)
    from trl import SFTTrainer

    sft = SFTTrainer(
        model=teacher, args=config(tmp_path), train_dataset=prompt_completion_dataset, processing_class=tokenizer
    )
    batch = sft.data_collator([sft.train_dataset[i] for i in range(4)])
    stored, scored = store.targets(batch, 4), live.targets(batch, 4)
    assert torch.equal(stored.ids, scored.ids)
    torch.testing.assert_close(stored.log_probs, scored.log_probs, atol=2e-3, rtol=1e-3)


def test_transient_errors_are_retried_with_backoff(teacher):
    with StandInServer(teacher, faults=["timeout", "500", "reset"], delay=1.5) as server:
        client = ServedTeacher(server.url, top_k=K, **{**FAST, "timeout": 0.5})
        scored = client.score(PROMPTS[:1])
    assert len(server.requests) == 4  # three failures, then the answer
    torch.testing.assert_close(
        scored[0].log_probs.double(), reference_targets(teacher, PROMPTS[0], K)[1], atol=2e-5, rtol=1e-5
    )


def test_retries_are_bounded(teacher):
    with StandInServer(teacher, persistent_fault="500") as server:
        client = ServedTeacher(server.url, top_k=K, max_retries=2, **FAST)
        with pytest.raises(ServedTeacherError, match="failed 3 times.*HTTP 500"):
            client.score(PROMPTS[:1])
    assert len(server.requests) == 3


@pytest.mark.parametrize("fault", ["missing", "no_rank"])
def test_a_server_without_prompt_logprobs_is_refused(teacher, fault):
    with StandInServer(teacher, persistent_fault=fault) as server:
        with pytest.raises(MissingPromptLogprobsError, match="prompt_logprobs"):
            ServedTeacher(server.url, top_k=K, **FAST).score(PROMPTS[:1])
        assert len(server.requests) == 1  # not a transient error: no retry


def test_unnormalized_log_probs_are_refused(teacher):
    with (
        StandInServer(teacher, persistent_fault="unnormalized") as server,
        pytest.raises(UnnormalizedLogProbsError, match="sum to .* > 1"),
    ):
        ServedTeacher(server.url, top_k=K, **FAST).score(PROMPTS[:1])


def test_temperature_needs_a_server_that_applies_it(teacher):
    with StandInServer(teacher) as server:
        with pytest.raises(ValueError, match="kd_temperature=2.0"):
            ServedTeacher(server.url, top_k=K, temperature=2.0, **FAST)
        with pytest.raises(ValueError, match="ignores the temperature"):  # the probe: vLLM-like, it ignores it
            ServedTeacher(server.url, top_k=K, temperature=2.0, server_applies_temperature=True, **FAST)
        with pytest.raises(ValueError, match="is not served"):
            ServedTeacher(server.url, top_k=K, model="another", **FAST)
    with StandInServer(teacher, apply_temperature=True) as server:
        client = ServedTeacher(server.url, top_k=K, temperature=2.0, server_applies_temperature=True, **FAST)
        scored = client.score(PROMPTS[:1])[0]
    ids, log_probs = reference_targets(teacher, PROMPTS[0], K, temperature=2.0)
    assert torch.equal(scored.ids, ids)
    torch.testing.assert_close(scored.log_probs.double(), log_probs, atol=2e-5, rtol=1e-5)


def test_interrupted_write_resumes_to_the_same_store(
    tmp_path, server, tokenizer, prompt_completion_dataset, eval_dataset, monkeypatch
):
    def write(directory, **kwargs):
        args = config(tmp_path, teacher_cache=str(tmp_path / directory))
        return cache_teacher_served(
            server.url,
            prompt_completion_dataset,
            eval_dataset=eval_dataset,
            args=args,
            processing_class=tokenizer,
            rows_per_shard=10,
            progress=False,
            **FAST,
            **kwargs,
        )

    reference = write("reference")
    real_write_shard, calls = served_module.write_shard, []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_write_shard(*args, **kwargs)

    monkeypatch.setattr(served_module, "write_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write("resumed", prompts_per_request=2)
    assert not (tmp_path / "resumed" / MANIFEST).exists()
    calls.clear()
    monkeypatch.setattr(served_module, "write_shard", lambda *a, **k: calls.append(a[1]) or real_write_shard(*a, **k))
    resumed = write("resumed", prompts_per_request=5, max_concurrency=1)  # other transport settings are fine
    assert calls == [1, 2, 3]
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert resumed["teacher"]["served"]["transport"]["prompts_per_request"] == 2  # the first run's, recorded
    with pytest.raises(ValueError, match="top_k: 8 -> 4"):
        args = config(tmp_path, teacher_cache=str(tmp_path / "resumed"), kd_top_k=4)
        cache_teacher_served(
            server.url,
            prompt_completion_dataset,
            eval_dataset=eval_dataset,
            args=args,
            processing_class=tokenizer,
            rows_per_shard=10,
            progress=False,
            **FAST,
        )
    assert json.loads((tmp_path / "resumed" / MANIFEST).read_text())["top_k"] == K


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="`teacher_url`"):
        ServedTeacher("localhost:8000", top_k=K)
    with pytest.raises(ValueError, match="`max_concurrency`"):
        ServedTeacher("http://127.0.0.1:9", top_k=K, max_concurrency=0)
    with pytest.raises(ServedTeacherError, match="failed 2 times"):  # nothing listens on the discard port
        ServedTeacher("http://127.0.0.1:9", top_k=K, max_retries=1, **FAST)


def test_cache_teacher_command_line_with_teacher_url(tmp_path, server, tokenizer, prompt_completion_dataset):
    """`trl-distill cache-teacher --config x.yaml --teacher_url URL`, as a user runs it (in-process)."""
    from trl_distill.cli import main

    tokenizer.save_pretrained(tmp_path / "student")
    data = tmp_path / "data.jsonl"
    prompt_completion_dataset.select(range(6)).to_json(data)
    (tmp_path / "cache.yaml").write_text(
        f"tokenizer_name_or_path: {tmp_path / 'student'}\nteacher_cache: {tmp_path / 'store'}\n"
        f"dataset_name: {data}\nkd_top_k: 8\nkd_temperature: 1.0\nmax_length: 48\nuse_cpu: true\nbf16: false\n"
        f"output_dir: {tmp_path / 'out'}\nrows_per_shard: 4\nreport_to: none\ndisable_tqdm: true\n"
        "teacher_prompts_per_request: 2\nteacher_max_concurrency: 2\nteacher_max_retries: 1\n"
    )
    assert main(["cache-teacher", "--config", str(tmp_path / "cache.yaml"), "--teacher_url", server.url]) == 0
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert manifest["splits"]["train"]["rows"] == 6 and len(manifest["shards"]) == 2
    assert manifest["teacher"]["served"]["url"] == server.url
    assert manifest["teacher"]["served"]["transport"]["max_retries"] == 1
    assert len(server.requests) == 3
