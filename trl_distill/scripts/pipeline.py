"""Run several recipes in order, each continuing from the previous one's model, with one receipt for all stages.

    trl-distill pipeline --config recipes/configs/tiny_pipeline.yaml
    trl-distill pipeline --config recipes/configs/qwen2.5-0.5b-pipeline.yaml --num_processes 8
    accelerate launch -m trl_distill.scripts.pipeline --config <pipeline>.yaml     # the same, explicitly
    accelerate launch recipes/pipeline.py --config <pipeline>.yaml                 # a clone's entry point

The YAML has `output_dir`, `stages` (in order, from `distill`, `qat`, `dpo`, `grpo`), an optional `common` section
applied to every stage that has those fields, and one section per stage with that recipe's own keys (the keys of
`trl-distill train`, `qat`, `dpo`, `grpo`; unknown keys are errors). Hand-off, for
what a stage's section leaves unset:

- `model_name_or_path`: the previous stage's output (`models.student` of its record);
- `output_dir`: `<output_dir>/<index>-<stage>`;
- the teacher: `dpo` and `grpo` rank / measure against the `distill` stage's teacher; `qat` distills from the
  full-precision model it quantizes and also reports KL to the `distill` stage's teacher (`reference_teacher`).

Each stage writes its record to `<its output_dir>/stage.json`; the pipeline writes them all, in order, to
`<output_dir>/pipeline.json`, and chains them into one receipt with `trl_distill.append_stage` (the last
stage's `distill_receipt.json` lists every stage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from . import distill, dpo, grpo, qat, stage


STAGES = {"distill": distill, "qat": qat, "dpo": dpo, "grpo": grpo}
PIPELINE_KEYS = ("output_dir", "stages", "common")


def load_plan(path: str, output_dir: str | None = None) -> tuple[str, list[str], dict, dict]:
    """Read and check a pipeline YAML: `(output_dir, stages, common, sections)`; every error names the key."""
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    stages = config.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{path}: `stages` must be a non-empty list drawn from {sorted(STAGES)}, got {stages!r}.")
    for name in stages:
        if name not in STAGES:
            raise ValueError(f"{path}: unknown stage {name!r} in `stages`; available: {sorted(STAGES)}.")
    if len(set(stages)) != len(stages):
        raise ValueError(f"{path}: `stages` lists a stage twice ({stages}); each stage has one section.")
    for key in config:
        if key not in PIPELINE_KEYS and key not in stages:
            hint = f" (add {key!r} to `stages` to run it)" if key in STAGES else ""
            raise ValueError(
                f"{path}: unknown key `{key}`{hint}; a pipeline has {list(PIPELINE_KEYS)} and one section per stage."
            )
    output_dir = output_dir or config.get("output_dir")
    if not output_dir:
        raise ValueError(f"{path}: `output_dir` is required (each stage writes into `<output_dir>/<index>-<stage>`).")
    common = config.get("common") or {}
    known = set()
    for name in stages:
        known.update(stage.known_keys(STAGES[name].make_parser()))
    for key, value in common.items():
        if key not in known:
            raise stage.unknown_key_error(key, value, sorted(known), f"{path} (common)", ())
    return output_dir, stages, common, {name: config.get(name) or {} for name in stages}


def stage_mapping(name: str, index: int, output_dir: str, common: dict, section: dict, records: list[dict]) -> dict:
    """One stage's keys: `common` (where the stage has the field), then the hand-off defaults, then its section."""
    known = set(stage.known_keys(STAGES[name].make_parser()))
    mapping = {key: value for key, value in common.items() if key in known}
    mapping["output_dir"] = os.path.join(output_dir, f"{index}-{name}")
    if records:
        mapping["model_name_or_path"] = records[-1]["models"]["student"]["name_or_path"]
    first_teacher = next(
        (
            r["models"]["teacher"]["name_or_path"]
            for r in records
            if r["name"] == "distill" and "teacher" in r["models"]
        ),
        None,
    )
    if first_teacher and name in ("dpo", "grpo"):
        mapping["teacher_model_name_or_path"] = first_teacher
    if first_teacher and name == "qat":
        mapping["reference_teacher"] = first_teacher
    mapping.update(section)
    return mapping


def _append_to_receipt(output_dir: str, record: dict, previous: str | None) -> bool:
    """Append `record` to `output_dir`'s receipt, after the stages of `previous` (the previous stage's directory)."""
    try:
        from trl_distill.artifact import append_stage
    except ImportError:
        stage.logger.warning("trl_distill.artifact is not available: the combined receipt is not written.")
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        append_stage(output_dir, record, previous=previous)
    return True


def run_pipeline(config_path: str, output_dir: str | None = None) -> dict:
    """Run the stages of `config_path` in order; return `{"stages": [records], "receipt": path or None}`."""
    output_dir, stages, common, sections = load_plan(config_path, output_dir)
    records, previous, chained = [], None, False
    for index, name in enumerate(stages):
        mapping = stage_mapping(name, index, output_dir, common, sections[name], records)
        args = stage.parse_mapping(STAGES[name].make_parser(), mapping, f"{config_path} ({name})")
        records.append(STAGES[name].run(*args))
        chained = _append_to_receipt(mapping["output_dir"], records[-1], previous)
        previous = mapping["output_dir"]
    summary = {"stages": records, "receipt": os.path.join(previous, "distill_receipt.json") if chained else None}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(output_dir, "pipeline.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, sort_keys=True, default=str)
    return summary


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """`--config` (the pipeline YAML) and `--output_dir`; the stages' keys live in the YAML."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="The pipeline YAML.")
    parser.add_argument("--output_dir", default=None, help="Overrides the YAML's `output_dir`.")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `argv` and check the plan it names (stages, sections, keys) without running anything."""
    args = make_parser().parse_args(argv)
    stage.read_config_path(["--config", args.config])
    load_plan(args.config, args.output_dir)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Parse `argv` (default: `sys.argv[1:]`), run every stage, return the summary (`None` after `--help`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if stage.print_help("pipeline", make_parser(), argv):
        return None
    args = parse_args(argv)
    try:
        return run_pipeline(args.config, args.output_dir)
    finally:
        stage.finish_distributed()


if __name__ == "__main__":
    main()
