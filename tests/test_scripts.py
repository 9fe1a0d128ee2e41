"""`trl_distill.scripts`: one dataset loader for every command, the concise `--help`, splitting launch flags from the
recipe's, and a `save_to_disk` dataset through `train`. (The recipes' subprocess runs are in `test_recipes.py`.)"""

import json
import pathlib
import sys

import pytest
import yaml


ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "configs"
ROWS = [{"prompt": f"Question {i}?\nAnswer:", "completion": f" answer {i}"} for i in range(6)]


def _args(dataset_name, train="train", test="test", config=None):
    from types import SimpleNamespace

    return SimpleNamespace(
        dataset_name=str(dataset_name),
        dataset_config=config,
        dataset_train_split=train,
        dataset_test_split=test,
        dataset_streaming=False,
    )


# ------------------------------------------------------------------------------------------------------ datasets
@pytest.mark.parametrize("extension", ["json", "jsonl", "csv", "parquet"])
def test_a_local_file_is_the_train_split(tmp_path, extension):
    from datasets import Dataset

    from trl_distill.scripts.data import load_splits

    path = tmp_path / f"rows.{extension}"
    dataset = Dataset.from_list(ROWS)
    {"json": dataset.to_json, "jsonl": dataset.to_json, "csv": dataset.to_csv, "parquet": dataset.to_parquet}[
        extension
    ](str(path))
    train, test = load_splits(_args(path))
    assert test is None and train["completion"] == [r["completion"] for r in ROWS]


def test_save_to_disk_directories_and_a_directory_of_files(tmp_path):
    from datasets import Dataset, DatasetDict

    from trl_distill.scripts.data import load_splits

    DatasetDict({"train": Dataset.from_list(ROWS[:4]), "test": Dataset.from_list(ROWS[4:])}).save_to_disk(
        tmp_path / "dd"
    )
    train, test = load_splits(_args(tmp_path / "dd"))
    assert len(train) == 4 and test["completion"] == [" answer 4", " answer 5"]
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "one")  # a single Dataset: the train split, no test split
    train, test = load_splits(_args(tmp_path / "one"))
    assert len(train) == 6 and test is None
    (tmp_path / "files").mkdir()
    Dataset.from_list(ROWS[:5]).to_json(tmp_path / "files/train.jsonl")
    Dataset.from_list(ROWS[5:]).to_json(tmp_path / "files/test.jsonl")
    train, test = load_splits(_args(tmp_path / "files"))
    assert len(train) == 5 and len(test) == 1


def test_missing_paths_bad_files_and_splits_are_named(tmp_path):
    from datasets import Dataset

    from trl_distill.scripts.data import load_splits

    for name in (tmp_path / "nope", "data/train.jsonl", "runs/recipes/tiny/missing"):
        with pytest.raises(FileNotFoundError, match=r"`dataset_name=.*no such file or directory"):
            load_splits(_args(name))
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=r"cannot read \.txt files"):
        load_splits(_args(tmp_path / "rows.txt"))
    (tmp_path / "files").mkdir()
    Dataset.from_list(ROWS).to_json(tmp_path / "files/train.jsonl")
    Dataset.from_list(ROWS).to_json(tmp_path / "files/test.jsonl")
    with pytest.raises(ValueError, match=r"`dataset_train_split='validation'` is not a split.*\['test', 'train'\]"):
        load_splits(_args(tmp_path / "files", train="validation"))
    with pytest.raises(ValueError, match="`dataset_name` is required"):
        load_splits(_args(""))


def test_train_reads_a_save_to_disk_directory(tmp_path, monkeypatch):
    """The directory `cache-teacher` accepts trains too: `trl_distill.scripts.distill` (what `trl-distill train` runs),
    in this process, on the tiny assets with the data saved by `DatasetDict.save_to_disk`."""
    from datasets import load_dataset

    from trl_distill.demo.assets import write_recipe_assets
    from trl_distill.scripts import distill

    monkeypatch.chdir(tmp_path)
    write_recipe_assets(tmp_path / "runs/recipes/tiny", train_teacher=False, n_train=32, n_test=4)
    data = load_dataset("json", data_dir=str(tmp_path / "runs/recipes/tiny/data"))
    data.save_to_disk(tmp_path / "saved")
    record = distill.main(
        [
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--dataset_name",
            str(tmp_path / "saved"),
            "--max_steps",
            "2",
            "--heldout_max_rows",
            "4",
            "--output_dir",
            "out",
        ]
    )
    assert record["results"]["train_steps"] == 2 and record["results"]["heldout_num_tokens"] > 0
    assert json.loads((tmp_path / "out/stage.json").read_text())["settings"]["dataset_name"] == str(tmp_path / "saved")


# ----------------------------------------------------------------------------------------------------------- help
def _flags(text):
    return [token for token in text.replace("/", " ").split() if token.startswith("--")]


@pytest.mark.parametrize("name", ["train", "qat", "dpo", "grpo", "pipeline", "cache-teacher"])
def test_help_is_short_lists_config_and_an_example_and_only_real_flags(name, capsys):
    import importlib

    from trl_distill.cli import main
    from trl_distill.scripts import COMMANDS

    assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 30, text
    assert "--config CONFIG.yaml" in text and f"trl-distill {name} --config" in text and "--help-all" in text
    options = importlib.import_module(COMMANDS[name].module).make_parser()._option_string_actions
    for flag, _ in COMMANDS[name].flags:
        for token in _flags(flag):
            assert token in options, f"`trl-distill {name} --help` names {token}, which the recipe does not have"


def test_help_all_lists_every_field_and_recipe_files_share_the_short_help(capsys):
    from trl_distill.cli import main
    from trl_distill.scripts import distill

    assert main(["train", "--help-all"]) == 0
    full = capsys.readouterr().out
    assert "--lr_scheduler_type" in full and "--kd_top_k" in full and len(full.splitlines()) > 200
    assert distill.main(["--help"]) is None  # `python recipes/distill.py --help`: the same concise help
    short = capsys.readouterr().out
    assert "--config CONFIG.yaml" in short and len(short.splitlines()) <= 30


# --------------------------------------------------------------------------------------------------- launching
def test_launch_flags_are_split_from_the_recipes_and_typos_are_named():
    from trl_distill.scripts.distill import make_parser
    from trl_distill.scripts.launch import resolve_accelerate_config, split_launch_args

    parser = make_parser()
    argv = [
        "--config",
        "x.yaml",
        "--num_processes",
        "2",
        "--max_steps",
        "3",
        "--multi_gpu",
        "--learning_rate",
        "-1e-3",
        "--debug",
        "--main_process_port=29501",
        "--accelerate_config",
        "zero3",
    ]
    recipe, launch = split_launch_args(argv, parser)
    assert recipe == ["--config", "x.yaml", "--max_steps", "3", "--learning_rate", "-1e-3", "--debug"]
    assert launch == [
        "--num_processes",
        "2",
        "--multi_gpu",
        "--main_process_port=29501",
        "--accelerate_config",
        "zero3",
    ]
    resolved = resolve_accelerate_config(launch)
    assert (
        resolved[0] == "--config_file" and resolved[1].endswith("zero3.yaml") and pathlib.Path(resolved[1]).is_file()
    )
    with pytest.raises(ValueError, match=r"unknown flag `--kd_temprature`.*Did you mean `--kd_temperature`"):
        split_launch_args(["--config", "x.yaml", "--kd_temprature", "2"], parser)
    with pytest.raises(ValueError, match=r"`--accelerate_config zero9`: no such file.*zero3"):
        resolve_accelerate_config(["--accelerate_config", "zero9"])


def test_the_console_command_fails_on_a_bad_key_before_launching(tmp_path, monkeypatch, capsys):
    """`trl-distill train --config bad.yaml` (no argv: the console form) parses in the parent and prints one line."""
    from trl_distill.cli import main

    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["lerning_rate"] = 0.1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    for name in ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["trl-distill", "train", "--config", str(tmp_path / "bad.yaml")])
    assert main() == 2
    error = capsys.readouterr().err
    assert "trl-distill train: error:" in error and "unknown key `lerning_rate`" in error
    monkeypatch.setattr(sys, "argv", ["trl-distill", "train", "--config", str(tmp_path / "missing.yaml")])
    assert main() == 2
    assert "`--config" in capsys.readouterr().err
