"""Prune, then distill from the original (`trl-distill prune-distill`, trl_distill/scripts/prune_distill.py) and the
single-removal KL layer scores (`trl_distill.pruning.score_layers_by_kl`).

The recipe runs in-process through its `main(argv)` (as `recipes/prune_distill.py` does) on a 4-layer tiny Llama and
the tiny recipe data; one subprocess runs the tiny YAML as a user does. The KL scores are checked against a float64
reference computed from the formula on models actually pruned by one layer.
"""

import copy
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers import tiny_gemma3
from trl_distill.demo.tiny import build_tiny_model
from trl_distill.pruning import calibration_batches, depth_prune, score_layers_by_kl, select_layers


ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "tiny_prune_distill.yaml"


# --------------------------------------------------------------------------------------------- KL layer scores
def _reference_kl_scores(model, batches):
    """KL(full ‖ pruned without layer i), float64, from the formula, on `depth_prune`d copies."""
    full = copy.deepcopy(model).double()
    num_layers = full.config.num_hidden_layers
    scores = []
    for i in range(num_layers):
        pruned = depth_prune(copy.deepcopy(full), [j for j in range(num_layers) if j != i])
        total, count = 0.0, 0
        for batch in batches:
            mask = batch["attention_mask"].bool()
            with torch.no_grad():
                log_p = torch.log_softmax(full(**batch).logits.double(), -1)[mask]
                log_q = torch.log_softmax(pruned(**batch).logits.double(), -1)[mask]
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += int(mask.sum())
        scores.append(total / count)
    return torch.tensor(scores, dtype=torch.float64)


def _sharpen(model, scale=4.0):
    """Random tiny models are near-uniform; scaling the LM head makes the KL values large enough to compare."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kl_scores_match_a_float64_reference_of_each_removal(tokenizer, arch):
    model = (
        build_tiny_model(tokenizer, hidden_size=32, num_layers=4, num_heads=2, seed=3)
        if arch == "llama"
        else tiny_gemma3(vocab_size=1000)
    )
    model = _sharpen(model.eval())
    texts = ["Ada has 3 apples and buys 4 more.", "Bo sells pens.", "How many pears does Cy keep after lunch?"]
    batches = calibration_batches(tokenizer, texts, batch_size=2, max_length=16)  # padded rows in the first batch
    scores = score_layers_by_kl(model, batches)
    reference = _reference_kl_scores(model, batches)
    assert scores.dtype == torch.float64 and scores.shape == (4,)
    assert bool((reference > 1e-4).all())
    torch.testing.assert_close(scores, reference, rtol=2e-3, atol=1e-6)
    assert not torch.allclose(scores, reference.flip(0), rtol=2e-3)  # negative control: the layers differ
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4  # the model is left whole


def test_kl_score_of_an_identity_layer_is_zero(tokenizer):
    """A layer whose residual branches write zero changes nothing: removing it costs exactly 0 nats."""
    model = _sharpen(build_tiny_model(tokenizer, hidden_size=32, num_layers=4, num_heads=2, seed=3).eval())
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = score_layers_by_kl(model, calibration_batches(tokenizer, ["Ada has 3 apples.", "Bo buys 5 pens."]))
    assert float(scores[2]) < 1e-9 < float(scores[[0, 1, 3]].min())
    assert select_layers(scores, 3) == [0, 1, 3]


# ------------------------------------------------------------------------------------------------- the recipe
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny recipe assets plus a 4-layer tiny Llama (the model to prune) sharing their tokenizer."""
    from transformers import AutoTokenizer

    from trl_distill.demo.assets import write_recipe_assets
    from trl_distill.demo.tiny import save_pretrained_pair

    root = tmp_path_factory.mktemp("prune_distill")
    paths = write_recipe_assets(root / "runs/recipes/tiny", train_teacher=False, n_train=48, n_test=8)
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=4, num_heads=2, seed=5)
    save_pretrained_pair(model, tokenizer, root / "four-layers")
    config = yaml.safe_load(CONFIG.read_text())
    del config["prune_num_keep"]  # set on the command line, or `prune_ratio` instead
    (root / "prune.yaml").write_text(yaml.safe_dump(config))
    return root


def _argv(workspace, output, *extra):
    return [
        "--config",
        str(workspace / "prune.yaml"),
        "--model_name_or_path",
        str(workspace / "four-layers"),
        "--dataset_name",
        str(workspace / "runs/recipes/tiny/data"),
        "--output_dir",
        str(workspace / output),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--heldout_max_rows",
        "8",
        "--calibration_rows",
        "8",
        "--disable_tqdm",
        "true",
        *extra,
    ]


@pytest.fixture(scope="module")
def cosine_run(workspace):
    from trl_distill.scripts import prune_distill

    argv = _argv(workspace, "cosine", "--prune_num_keep", "3", "--prune_keep_first", "1", "--prune_keep_last", "1")
    return prune_distill.main(argv)


def test_recipe_prunes_saves_and_distills_from_the_original(workspace, cosine_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_distill.pruning import score_layers

    results, models = cosine_run["results"], cosine_run["models"]
    pruned_dir = pathlib.Path(models["student"]["initial"])
    assert pruned_dir == workspace / "cosine-pruned"  # the default: a sibling of output_dir, not inside it
    pruning = json.loads((pruned_dir / "pruning.json").read_text())
    assert pruning["num_layers"] == 4 and len(pruning["scores"]) == 4 and pruning["scoring"] == "cosine"
    assert results["kept_layers"] == pruning["kept_layers"] == select_layers(pruning["scores"], 3)
    assert sorted(results["kept_layers"] + results["removed_layers"]) == [0, 1, 2, 3]
    assert 0 in results["kept_layers"] and 3 in results["kept_layers"]  # protected first and last
    # the scores are ShortGPT's on the first calibration rows of the training split
    teacher = AutoModelForCausalLM.from_pretrained(workspace / "four-layers")
    tokenizer = AutoTokenizer.from_pretrained(workspace / "four-layers")
    rows = [json.loads(line) for line in (workspace / "runs/recipes/tiny/data/train.jsonl").read_text().splitlines()]
    texts = [r["prompt"] + r["completion"] for r in rows[:8]]
    expected = score_layers(teacher, calibration_batches(tokenizer, texts, batch_size=8, max_length=64))
    torch.testing.assert_close(torch.tensor(pruning["scores"], dtype=torch.float64), expected)
    # the pruned student on disk is the teacher's kept layers; training changed it; the teacher is untouched
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir)
    student = AutoModelForCausalLM.from_pretrained(workspace / "cosine")
    assert pruned.config.num_hidden_layers == student.config.num_hidden_layers == 3
    for new, old in enumerate(results["kept_layers"]):
        kept, source = pruned.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight
        torch.testing.assert_close(kept, source)
    assert not torch.equal(student.model.layers[1].mlp.up_proj.weight, pruned.model.layers[1].mlp.up_proj.weight)
    assert results["train_steps"] == 3
    for prefix in ("pruned_", "heldout_"):
        assert results[f"{prefix}kl_teacher_student"] >= 0 and results[f"{prefix}num_tokens"] > 0
    assert models["teacher"]["name_or_path"] == str(workspace / "four-layers")


def test_one_receipt_records_the_pruning_then_the_distillation_and_verifies_strictly(workspace, cosine_run):
    from trl_distill.verify import verify_artifact

    output = workspace / "cosine"
    receipt = json.loads((output / "distill_receipt.json").read_text())
    prune_stage, distill_stage = receipt["stages"]
    assert (prune_stage["name"], distill_stage["name"]) == ("prune", "distill")
    assert prune_stage["results"]["kept_layers"] == cosine_run["results"]["kept_layers"]
    assert prune_stage["results"]["removed_layers"] == cosine_run["results"]["removed_layers"]
    assert len(prune_stage["results"]["scores"]) == 4 and "ShortGPT" in prune_stage["method"]
    assert prune_stage["results"]["heldout"]["kl_teacher_student"] == pytest.approx(
        cosine_run["results"]["pruned_kl_teacher_student"]
    )
    assert distill_stage["models"]["student"]["name_or_path"].endswith("cosine-pruned")
    assert distill_stage["models"]["teacher"]["name_or_path"].endswith("four-layers")
    assert "stage.json" in receipt["artifacts"] and "model.safetensors" in receipt["artifacts"]
    assert "prune → distill" in (output / "README.md").read_text()
    for directory in (output, workspace / "cosine-pruned"):
        result = verify_artifact(directory, strict=True)
        assert result.ok, result.report()
    (output / "stage.json").write_text("{}")  # negative control: an edited file fails the check
    assert not verify_artifact(output, strict=True).ok


def test_kl_scoring_and_feature_kd_map_each_student_layer_to_its_source(workspace):
    from trl_distill.scripts import prune_distill

    record = prune_distill.main(
        _argv(
            workspace,
            "kl",
            "--prune_ratio",
            "0.5",
            "--prune_scoring",
            "kl",
            "--prune_keep_first",
            "1",
            "--prune_keep_last",
            "0",
            "--feature_weight",
            "0.5",
            "--max_steps",
            "2",
        )
    )
    keep = record["results"]["kept_layers"]
    assert len(keep) == 2 and keep[0] == 0
    pruning = json.loads((workspace / "kl-pruned/pruning.json").read_text())
    assert pruning["scoring"] == "kl" and keep == select_layers(pruning["scores"], 2, keep_first=1, keep_last=0)
    assert record["settings"]["feature_layer_map"] == [[0, keep[0]], [1, keep[1]]]
    assert record["settings"]["prune_scoring"] == "kl" and record["settings"]["prune_ratio"] == 0.5
    receipt = json.loads((workspace / "kl/distill_receipt.json").read_text())
    assert "KL(full || without layer i)" in receipt["stages"][0]["method"]


# ---------------------------------------------------------------------------------------------- named errors
def _write(tmp_path, **changes):
    config = yaml.safe_load(CONFIG.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prune_ratio": 1.5, "prune_num_keep": None}, r"`prune_ratio` must be .* strictly between 0 and 1, got 1.5"),
        ({"prune_ratio": 0.0, "prune_num_keep": None}, r"`prune_ratio` must be .*got 0.0"),
        ({"prune_ratio": 0.5}, r"exactly one of `prune_num_keep` .* and `prune_ratio`"),
        ({"prune_num_keep": None}, r"exactly one of `prune_num_keep`"),
        ({"prune_num_keep": 0}, r"`prune_num_keep` must be an int >= 1 \(layers to keep\), got 0"),
        ({"prune_scoring": "magnitude"}, r"`prune_scoring` must be one of \('cosine', 'kl'\), got 'magnitude'"),
        ({"prune_keep_first": -1}, r"`prune_keep_first` must be an int >= 0, got -1"),
        ({"calibration_rows": 0}, r"`calibration_rows` must be an int >= 1, got 0"),
        ({"prune_rato": 0.5}, r"unknown key `prune_rato`.*Did you mean `prune_ratio`"),
    ],
)
def test_bad_settings_fail_before_loading_anything(tmp_path, changes, message):
    from trl_distill.scripts import prune_distill

    with pytest.raises(ValueError, match=message):
        prune_distill.main(["--config", str(_write(tmp_path, **changes))])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prune_num_keep", "4"], r"`prune_num_keep=4`: the model has 4 decoder layers; keep between 1 and 3"),
        (
            ["--prune_num_keep", "1", "--prune_keep_first", "1", "--prune_keep_last", "1"],
            r"fewer than the protected layers \(`prune_keep_first=1` \+ `prune_keep_last=1`\)",
        ),
        (["--prune_num_keep", "2", "--prune_ratio", "0.9"], r"exactly one of"),
        (
            ["--prune_num_keep", "2", "--teacher_model_name_or_path", "/elsewhere"],
            r"`teacher_model_name_or_path='/elsewhere'`: prune-distill distills the pruned model from the model",
        ),
    ],
)
def test_settings_that_cannot_work_with_the_model_are_refused(workspace, extra, message):
    from trl_distill.scripts import prune_distill

    with pytest.raises(ValueError, match=message):
        prune_distill.main([*_argv(workspace, "refused"), *extra])
    assert not (workspace / "refused-pruned").exists()  # nothing was written


def test_prune_ratio_that_rounds_to_no_layer_is_refused(workspace):
    from trl_distill.scripts import prune_distill

    with pytest.raises(ValueError, match=r"`prune_ratio=0.95` \(0 of 4 layers kept\)"):
        prune_distill.main([*_argv(workspace, "refused"), "--prune_ratio", "0.95"])


# ------------------------------------------------------------------------------------------- as a user runs it
def test_the_tiny_config_runs_as_a_user_runs_it(workspace):
    """`python recipes/prune_distill.py --config recipes/configs/tiny_prune_distill.yaml` in the assets' directory."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    command = [
        sys.executable,
        str(ROOT / "recipes/prune_distill.py"),
        "--config",
        str(CONFIG),
        "--max_steps",
        "2",
        "--heldout_max_rows",
        "8",
    ]
    done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[prune] depth pruning: 1 of 2 decoder layers kept" in done.stdout
    output = workspace / "runs/recipes/tiny/prune-distill"
    stages = json.loads((output / "distill_receipt.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["prune", "distill"]
    assert (workspace / "runs/recipes/tiny/prune-distill-pruned/pruning.json").is_file()


def test_console_help_is_short_and_names_only_real_flags(capsys):
    from trl_distill.cli import main
    from trl_distill.scripts import COMMANDS, prune_distill

    assert main(["prune-distill", "--help"]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 30, text
    assert "trl-distill prune-distill --config" in text and "--prune_scoring" in text
    options = prune_distill.make_parser()._option_string_actions
    for flag, _ in COMMANDS["prune-distill"].flags:
        for token in flag.replace("/", " ").split():
            assert not token.startswith("--") or token in options, token
