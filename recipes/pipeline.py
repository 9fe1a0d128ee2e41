"""Run several recipes in order, each continuing from the previous one's model, with one receipt for all stages.

The entry point of a clone; the recipe is `trl_distill.scripts.pipeline` (`trl-distill pipeline`, no clone needed),
whose docstring describes the YAML (`output_dir`, `stages`, `common`, one section per stage) and the hand-off.

    python recipes/pipeline.py --config recipes/configs/tiny_pipeline.yaml
    accelerate launch recipes/pipeline.py --config recipes/configs/qwen2.5-0.5b-pipeline.yaml
"""

from trl_distill.scripts import pipeline


def make_parser():
    """`--config` (the pipeline YAML) and `--output_dir`."""
    return pipeline.make_parser()


def main(argv: list[str] | None = None) -> dict | None:
    """Run every stage; return `{"stages": [records], "receipt": path or None}` (also `output_dir/pipeline.json`)."""
    return pipeline.main(argv)


if __name__ == "__main__":
    main()
