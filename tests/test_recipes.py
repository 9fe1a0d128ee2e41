"""Recipes: each runs as a subprocess on the tiny configs, as a user runs it; strict parsing; the helpers they use.

The subprocess runs are started together (one fixture) on local tiny models and a few steps each, and every test
waits for its own: `trl-distill train` (the console command, through `accelerate launch`), `recipes/distill.py` under
2 processes (and DeepSpeed ZeRO-3 when deepspeed is installed: the token mode, the offline store and on-policy), QLoRA
recovery, GRPO, and the pipeline distill -> qat -> dpo. The recipes' code is `trl_distill.scripts`; `recipes/*.py`
are its thin entry points.
"""

import copy
import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import yaml


ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"
TIMEOUT = 400
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _recipe_module(name):
    """The installed recipe module behind `recipes/<name>.py` (or `trl_distill.scripts.<name>` itself)."""
    import importlib

    from trl_distill.scripts import COMMANDS

    modules = {pathlib.Path(c.recipe).stem: c.module for c in COMMANDS.values()}
    return importlib.import_module(modules.get(name, f"trl_distill.scripts.{name}"))


def _console():
    """The `trl-distill` console script as a user runs it (next to this Python; `-m trl_distill` if not installed)."""
    script = shutil.which("trl-distill", path=str(pathlib.Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "trl_distill"]


def _env():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(
        os.environ,
        PYTHONPATH=path,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION"):  # not inside a launcher
        env.pop(name, None)
    return env


def _tiny_pipeline(path):
    """The tiny pipeline config with test-sized steps."""
    config = yaml.safe_load((CONFIGS / "tiny_pipeline.yaml").read_text())
    config["distill"]["max_steps"] = 3
    config["qat"]["max_steps"] = 2
    config["dpo"].update(max_steps=2, max_prompts=8, per_device_train_batch_size=4)
    config["common"]["heldout_max_rows"] = 8
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every recipe subprocess at once in a workspace holding the tiny assets; return their handles."""
    from trl_distill.demo.assets import write_recipe_assets

    workspace = tmp_path_factory.mktemp("recipes")
    write_recipe_assets(workspace / "runs/recipes/tiny", train_teacher=False, n_train=64, n_test=8)
    short = ["--max_steps", "2", "--heldout_max_rows", "8"]
    init = ["--model_name_or_path", "runs/recipes/tiny/student-init"]
    python = [sys.executable]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(RECIPES / "accelerate_configs/ddp_cpu.yaml"),
        "--main_process_port",
        "29517",
    ]
    commands = {
        "distill": _console() + ["train", "--config", str(CONFIGS / "tiny.yaml"), *short],
        "ddp": launch
        + [
            str(RECIPES / "distill.py"),
            "--config",
            str(CONFIGS / "tiny.yaml"),
            *short,
            "--output_dir",
            "runs/ddp",
            "--per_device_train_batch_size",
            "4",
        ],
        "grpo": python
        + [
            str(RECIPES / "distill_grpo.py"),
            "--config",
            str(CONFIGS / "tiny_grpo.yaml"),
            *short,
            *init,
            "--max_prompts",
            "8",
            "--per_device_train_batch_size",
            "4",
        ],
        "pipeline": python + [str(RECIPES / "pipeline.py"), "--config", str(_tiny_pipeline(workspace / "p.yaml"))],
    }
    if HAS_DEEPSPEED:  # the same run as "ddp", with every parameter partitioned across the two processes
        commands["zero3"] = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(RECIPES / "accelerate_configs/zero3.yaml"),
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--main_process_port",
            "29518",
            str(RECIPES / "distill.py"),
            "--config",
            str(CONFIGS / "tiny.yaml"),
            *short,
            "--output_dir",
            "runs/zero3",
            "--per_device_train_batch_size",
            "4",
        ]
        # The offline store (written here first) under ZeRO-3 and, for comparison, under DDP; and on-policy steps
        # (the student generates with its parameters partitioned).
        store = _write_teacher_store(workspace)
        zero3 = commands["zero3"][: commands["zero3"].index("--main_process_port")]
        distill = [
            str(RECIPES / "distill.py"),
            "--config",
            str(CONFIGS / "tiny.yaml"),
            *short,
            "--per_device_train_batch_size",
            "4",
        ]
        from_store = ["--teacher_cache", str(store), "--kd_top_k", "8"]
        commands["zero3_store"] = [
            *zero3,
            "--main_process_port",
            "29519",
            *distill,
            *from_store,
            "--output_dir",
            "runs/zero3-store",
        ]
        commands["ddp_store"] = [*launch[:-1], "29520", *distill, *from_store, "--output_dir", "runs/ddp-store"]
        commands["zero3_on_policy"] = [
            *zero3,
            "--main_process_port",
            "29521",
            *distill,
            "--lmbda",
            "1.0",
            "--max_completion_length",
            "8",
            "--output_dir",
            "runs/zero3-on-policy",
        ]
    if HAS_BNB:
        commands["qlora"] = python + [
            str(RECIPES / "distill_qat.py"),
            "--config",
            str(CONFIGS / "tiny_qlora.yaml"),
            *short,
            *init,
            "--per_device_train_batch_size",
            "4",
        ]
    handles = {}
    for name, command in commands.items():
        log = open(workspace / f"{name}.log", "w")
        handles[name] = (
            subprocess.Popen(command, cwd=workspace, env=_env(), stdout=log, stderr=subprocess.STDOUT),
            workspace / f"{name}.log",
        )
    yield workspace, handles
    for process, _ in handles.values():
        if process.poll() is None:
            process.kill()


def _write_teacher_store(workspace):
    """The tiny recipe's teacher top-8 store, as `trl-distill cache-teacher` writes it (in-process: TRL is loaded)."""
    from trl_distill.scripts.cache_teacher import run_cache_teacher

    tiny = workspace / "runs/recipes/tiny"
    (workspace / "cache.yaml").write_text(
        yaml.safe_dump(
            {
                "dataset_name": str(tiny / "data"),
                "tokenizer_name_or_path": str(tiny / "student-init"),
                "teacher_model_name_or_path": str(tiny / "teacher-quick"),
                "teacher_cache": str(workspace / "runs/store"),
                "kd_top_k": 8,
                "kd_temperature": 1.0,
                "max_length": 64,
                "use_cpu": True,
                "bf16": False,
                "output_dir": str(workspace / "runs/cache"),
                "report_to": "none",
                "disable_tqdm": True,
            }
        )
    )
    assert run_cache_teacher(argv=["--config", str(workspace / "cache.yaml")]) == 0
    return workspace / "runs/store"


def _finished(runs, name):
    workspace, handles = runs
    process, log = handles[name]
    try:
        returncode = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{name} did not finish in {TIMEOUT} s:\n{log.read_text()[-3000:]}")
    output = log.read_text()
    assert returncode == 0, f"{name} failed:\n{output[-5000:]}"
    return workspace, output


def _stage(directory):
    return json.loads((directory / "stage.json").read_text())


def test_trl_distill_train_command_trains_saves_and_measures(runs):
    """`trl-distill train --config recipes/configs/tiny.yaml` in a shell: launched through `accelerate launch`."""
    workspace, output = _finished(runs, "distill")
    assert "accelerate launch" in output  # accelerate's note on the defaults it used: the command went through it
    out = workspace / "runs/recipes/tiny/distill"
    record = _stage(out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert record["name"] == "distill" and record["results"]["train_steps"] == 2
    assert (
        math.isfinite(record["results"]["heldout_kl_teacher_student"]) and record["results"]["heldout_num_tokens"] > 0
    )
    # the command-line override won over the YAML, and the settings record it
    assert record["settings"]["max_steps"] == 2 and record["settings"]["kd_temperature"] == 1.0
    assert record["models"]["teacher"] == {"name_or_path": "runs/recipes/tiny/teacher-quick"}
    # the receipt and card carry the held-out figures of stage.json, and the whole directory verifies strictly
    from trl_distill.receipt import load_receipt
    from trl_distill.verify import verify_artifact

    heldout = load_receipt(out)["stages"][0]["results"]["heldout"]
    assert heldout["kl_teacher_student"] == pytest.approx(record["results"]["heldout_kl_teacher_student"], rel=1e-9)
    assert "Not measured" not in (out / "README.md").read_text()
    result = verify_artifact(out, strict=True)
    assert result.ok, result.report()


def test_ddp_two_processes_end_with_identical_weights_and_one_output(runs):
    workspace, output = _finished(runs, "ddp")
    record = _stage(workspace / "runs/ddp")
    digests = record["results"]["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert output.count("[distill] ") == 1  # only the main process writes and prints the stage
    assert sorted(p.name for p in (workspace / "runs/ddp").glob("*.safetensors")) == ["model.safetensors"]
    # and the weights changed from the initial student
    from safetensors.torch import load_file

    before = load_file(workspace / "runs/recipes/tiny/student-init/model.safetensors")
    after = load_file(workspace / "runs/ddp/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_zero3_two_processes_train_like_ddp_and_measure_heldout_kl(runs):
    """ZeRO-3 partitions `lm_head.weight`, which the loss reads whole: its gradient must reach the shards. The same
    batches under DDP must give the same weights (the lm_head's too, and it moved) and the same held-out KL."""
    from safetensors.torch import load_file

    workspace, _ = _finished(runs, "zero3")
    _finished(runs, "ddp")
    zero3, ddp = _stage(workspace / "runs/zero3")["results"], _stage(workspace / "runs/ddp")["results"]
    assert zero3["train_steps"] == 2
    assert zero3["heldout_kl_teacher_student"] == pytest.approx(ddp["heldout_kl_teacher_student"], rel=1e-4)
    before = load_file(workspace / "runs/recipes/tiny/student-init/model.safetensors")
    after = load_file(workspace / "runs/zero3/model.safetensors")
    reference = load_file(workspace / "runs/ddp/model.safetensors")
    assert set(after) == set(before)
    assert not torch.allclose(after["lm_head.weight"], before["lm_head.weight"], rtol=0, atol=1e-4)
    for name in before:
        torch.testing.assert_close(after[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_zero3_two_processes_train_from_the_offline_store_like_ddp(runs):
    """The store's top-k loss reads the partitioned student `lm_head` whole too: ZeRO-3 and DDP, same batches, same
    weights."""
    from safetensors.torch import load_file

    workspace, _ = _finished(runs, "zero3_store")
    _finished(runs, "ddp_store")
    record = _stage(workspace / "runs/zero3-store")
    assert record["results"]["train_steps"] == 2 and record["settings"]["teacher_cache"].endswith("runs/store")
    before = load_file(workspace / "runs/recipes/tiny/student-init/model.safetensors")
    after = load_file(workspace / "runs/zero3-store/model.safetensors")
    reference = load_file(workspace / "runs/ddp-store/model.safetensors")
    assert not torch.allclose(after["lm_head.weight"], before["lm_head.weight"], rtol=0, atol=1e-4)
    for name in before:
        torch.testing.assert_close(after[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_zero3_two_processes_train_on_policy(runs):
    """Every step on-policy (`lmbda=1`): the student samples with its parameters partitioned, the teacher scores."""
    from safetensors.torch import load_file

    workspace, output = _finished(runs, "zero3_on_policy")
    results = _stage(workspace / "runs/zero3-on-policy")["results"]
    assert results["train_steps"] == 2 and math.isfinite(results["train_loss"])
    assert "'on_policy': '1'" in output  # the logged fraction of on-policy steps
    assert math.isfinite(results["heldout_kl_teacher_student"]) and results["heldout_num_tokens"] > 0
    before = load_file(workspace / "runs/recipes/tiny/student-init/model.safetensors")
    after = load_file(workspace / "runs/zero3-on-policy/model.safetensors")
    assert set(after) == set(before) and all(torch.isfinite(tensor).all() for tensor in after.values())
    assert all(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install trl_distill[quant])")
def test_qlora_recovery_reports_kl_before_after_quantization_and_after_recovery(runs):
    workspace, _ = _finished(runs, "qlora")
    out = workspace / "runs/recipes/tiny/qlora"
    results = _stage(out)["results"]
    for key in (
        "before_quant_kl_to_reference",
        "after_quant_kl_to_fp",
        "after_quant_kl_to_reference",
        "after_recovery_kl_to_fp",
        "after_recovery_kl_to_reference",
    ):
        assert math.isfinite(results[key]) and results[key] >= 0, key
    assert results["after_quant_kl_to_fp"] > 0  # 4-bit changed the model
    assert (out / "adapter_config.json").is_file()


def test_grpo_recipe_with_the_reward_from_the_config(runs):
    workspace, output = _finished(runs, "grpo")
    record = _stage(workspace / "runs/recipes/tiny/grpo")
    assert record["results"]["train_steps"] == 2
    assert "rewards/is_correct/mean" in output  # the config's reward, under its function's name
    assert {"before_kl_teacher_student", "after_kl_teacher_student"} <= set(record["results"])


@pytest.mark.skipif(not HAS_TORCHAO, reason="the tiny pipeline's qat stage needs torchao (the `test` extra)")
def test_pipeline_hands_each_stage_the_previous_model(runs):
    workspace, _ = _finished(runs, "pipeline")
    root = workspace / "runs/recipes/tiny/pipeline"
    summary = json.loads((root / "pipeline.json").read_text())
    distill, qat, dpo = summary["stages"]
    assert [s["name"] for s in summary["stages"]] == ["distill", "qat", "dpo"]
    assert distill["models"]["student"]["name_or_path"] == "runs/recipes/tiny/pipeline/0-distill"
    assert qat["settings"]["model_name_or_path"] == distill["models"]["student"]["name_or_path"]
    assert dpo["settings"]["model_name_or_path"] == qat["models"]["student"]["name_or_path"]
    assert dpo["models"]["teacher"] == distill["models"]["teacher"]  # ranked by the distillation's teacher
    assert qat["models"]["reference_teacher"] == distill["models"]["teacher"]
    assert json.loads((root / "1-qat/quantization.json").read_text())["scheme"] == "int8_dynact_int4_weight"
    assert dpo["results"]["pairs_pairs"] > 0 and "after_kl_teacher_student" in dpo["results"]
    for record in summary["stages"]:
        assert record == _stage(workspace / record["models"]["student"]["name_or_path"])


@pytest.mark.skipif(not HAS_TORCHAO, reason="the tiny pipeline's qat stage needs torchao (the `test` extra)")
def test_pipeline_writes_one_receipt_listing_every_stage(runs):
    workspace, _ = _finished(runs, "pipeline")
    summary = json.loads((workspace / "runs/recipes/tiny/pipeline/pipeline.json").read_text())
    receipt = json.loads((workspace / summary["receipt"]).read_text())
    names = [s["name"] for s in receipt["stages"]]
    assert names[-3:] == ["distill", "qat", "dpo"] and names.count("qat") == 1


# ------------------------------------------------------------------------------------------------- strict parsing
def test_unknown_yaml_key_fails_with_its_name_and_a_suggestion(tmp_path):
    distill = _recipe_module("distill")
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["lerning_rate"] = 0.1
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"unknown key `lerning_rate` \(value 0.1\)\. Did you mean `learning_rate`\?"):
        distill.main(["--config", str(path)])


def test_unknown_command_line_flag_fails_with_its_name(tmp_path):
    distill = _recipe_module("distill")
    with pytest.raises(ValueError, match=r"command line: unknown key `kd_temprature`.*`kd_temperature`"):
        distill.main(["--config", str(CONFIGS / "tiny.yaml"), "--kd_temprature", "2"])


def test_every_config_parses():
    """Tiny and realistic configs (ULD, on-policy, LoRA, pipeline...) parse with their recipe, every key known."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# "), f"{path.name} must start with the command that runs it"
        command = text.splitlines()[0]
        name = command.split("recipes/")[1].split(".py")[0]
        module = _recipe_module(name)
        if name == "pipeline":
            module.load_plan(str(path))
            continue
        # realistic configs train in bf16 on GPUs; parsing them here (CPU) needs bf16 off
        module.make_parser().parse_args_and_config(["--config", str(path), "--bf16", "false"])


def test_pipeline_rejects_unknown_keys_and_stages(tmp_path):
    pipeline = _recipe_module("pipeline")
    config = yaml.safe_load((CONFIGS / "tiny_pipeline.yaml").read_text())
    for change, message in (
        ({"stages": ["distill", "quantize"]}, "unknown stage 'quantize'"),
        ({"grpo": {"max_steps": 1}}, r"unknown key `grpo` \(add 'grpo' to `stages`"),
        ({"common": {"lerning_rate": 1.0}}, r"unknown key `lerning_rate`.*`learning_rate`"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**copy.deepcopy(config), **change}))
        with pytest.raises(ValueError, match=message):
            pipeline.load_plan(str(path))
    config["dpo"]["num_sample"] = 2  # a typo inside a stage's section
    path.write_text(yaml.safe_dump(config))
    mapping = pipeline.stage_mapping("dpo", 2, "out", config["common"], config["dpo"], [])
    with pytest.raises(ValueError, match=r"unknown key `num_sample`.*`num_samples`"):
        _recipe_module("stage").parse_mapping(pipeline.STAGES["dpo"].make_parser(), mapping, "dpo")


# --------------------------------------------------------------------------------------------------- the helpers
def test_reward_loader_adapts_per_row_functions_and_rejects_bad_paths():
    grpo = _recipe_module("distill_grpo")
    reward = grpo.load_reward("trl_distill.demo:is_correct")
    from trl_distill.demo import correct_answers, make_task_dataset

    prompt = make_task_dataset(1, seed=0, split="test")["prompt"][0]

    right = " " + correct_answers(prompt)[0]
    assert reward([prompt, prompt], [right, " banana"]) == [1.0, 0.0]
    assert reward.__name__ == "is_correct"
    with pytest.raises(ValueError, match="cannot import 'trl_distill.demo:nope'"):
        grpo.load_reward("trl_distill.demo:nope")
    with pytest.raises(ValueError, match="import paths like"):
        grpo.load_reward("is_correct")


def _reference_mean_logprob(model, tokenizer, prompt, completion):
    """float64 mean log p(completion token | prefix) over the completion tokens (EOS included), one row at a time."""
    from trl_distill.evaluation import tokenize_prompt_completion

    ids, mask = tokenize_prompt_completion(tokenizer, prompt, completion)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits.log_softmax(-1)
    values = [logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t]]
    return sum(values) / len(values)


def test_teacher_scores_match_a_float64_reference_and_pairs_follow_the_rule(tokenizer, make_student, make_teacher):
    from trl_distill import teacher_ranked_pairs
    from trl_distill.preference import teacher_scores

    student, teacher = make_student().eval(), make_teacher().eval()
    prompts = ["Question: Mia has 2 apples. How many?\nAnswer:", "Question: What day is it tomorrow?\nAnswer:"]
    completions = [" 2", " Tuesday is the day"]
    scores = teacher_scores(teacher, tokenizer, prompts, completions)
    expected = [_reference_mean_logprob(teacher, tokenizer, p, c) for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(expected, rel=1e-5)
    # negative control: the summed (not length-normalized) log-probability is a different number
    assert scores[1] != pytest.approx(expected[1] * 5, rel=1e-3)

    pairs, stats = teacher_ranked_pairs(
        student, teacher, tokenizer, prompts, num_samples=4, max_new_tokens=4, seed=0, progress=False
    )
    assert stats["prompts"] == 2 and stats["pairs"] == len(pairs) > 0
    for row in pairs:
        assert row["chosen_score"] > row["rejected_score"] and row["chosen"] != row["rejected"]
        assert row["chosen_score"] == pytest.approx(
            _reference_mean_logprob(teacher, tokenizer, row["prompt"], row["chosen"]), rel=1e-5
        )
    with pytest.raises(ValueError, match="`num_samples` must be an int >= 2"):
        teacher_ranked_pairs(student, teacher, tokenizer, prompts, num_samples=1)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install trl_distill[quant])")
def test_qat_convert_equals_the_fake_quantized_model_and_keeps_the_lm_head(tokenizer, make_student):
    from trl_distill import qat_convert, qat_prepare, unwrap_fake_quantized

    model = make_student(hidden_size=64, num_heads=4).eval()
    inputs = tokenizer(["Question: Mia has 2 apples.\nAnswer: 2"], return_tensors="pt")
    full = model(**inputs).logits
    prepared = qat_prepare(copy.deepcopy(model), group_size=32)
    fake = prepared(**inputs).logits
    assert not torch.allclose(fake, full)  # the fake quantizers change the output
    assert type(prepared.lm_head) is torch.nn.Linear
    assert torch.equal(qat_convert(copy.deepcopy(prepared), group_size=32)(**inputs).logits, fake)
    # the saved form: plain layers with the same weights, which `qat_convert` quantizes to the same model
    plain = unwrap_fake_quantized(copy.deepcopy(prepared))
    assert torch.equal(plain(**inputs).logits, full)
    assert torch.equal(qat_convert(plain, group_size=32)(**inputs).logits, fake)
    with pytest.raises(ValueError, match="`qat_group_size=48` does not divide"):
        qat_prepare(copy.deepcopy(model), group_size=48)
    with pytest.raises(ValueError, match="`qat_scheme` must be one of"):
        qat_prepare(copy.deepcopy(model), scheme="int3")


def test_disable_bnb_cpu_repack_is_a_no_op_without_4bit_layers(make_student):
    from trl_distill import disable_bnb_cpu_repack

    assert disable_bnb_cpu_repack(make_student()) == 0


def test_recipe_assets_cli_writes_what_the_tiny_configs_name(tmp_path, monkeypatch):
    from trl_distill.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["recipe-assets", "--untrained-teacher"]) == 0
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    for key in ("model_name_or_path", "teacher_model_name_or_path"):
        assert (tmp_path / config[key] / "config.json").is_file()
    assert (tmp_path / config["dataset_name"] / "test.jsonl").is_file()
    shutil.rmtree(tmp_path / "runs")
