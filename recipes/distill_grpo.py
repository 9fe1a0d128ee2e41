"""GRPO after distillation: TRL's `GRPOTrainer` on the distilled student, with reward functions named in the config.

The entry point of a clone; the recipe is `trl_distill.scripts.grpo` (`trl-distill grpo`, no clone needed), whose
docstring explains `reward_funcs`. `beta` here is GRPO's KL coefficient (TRL's `GRPOConfig.beta`).

    python recipes/distill_grpo.py --config recipes/configs/tiny_grpo.yaml   # after recipes/configs/tiny.yaml
    accelerate launch recipes/distill_grpo.py --config <config>.yaml
"""

from trl_distill.scripts import grpo


def make_parser():
    """TRL's parser over `RewardScriptArguments`, `ModelConfig` and `GRPOConfig`."""
    return grpo.make_parser()


def main(argv: list[str] | None = None) -> dict | None:
    """Train GRPO, measure; return the stage record written to `output_dir/stage.json`."""
    return grpo.main(argv)


if __name__ == "__main__":
    main()
