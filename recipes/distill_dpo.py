"""DPO after distillation: the student's own samples, ranked by the teacher, as preference pairs for TRL's `DPOTrainer`.

The entry point of a clone; the recipe is `trl_distill.scripts.dpo` (`trl-distill dpo`, no clone needed), whose
docstring gives the pair rule. `beta` here is DPO's (TRL's `DPOConfig.beta`).

    python recipes/distill_dpo.py --config recipes/configs/tiny_dpo.yaml     # after recipes/configs/tiny.yaml
    accelerate launch recipes/distill_dpo.py --config <config>.yaml
"""

from trl_distill.scripts import dpo


def make_parser():
    """TRL's parser over `PairScriptArguments`, `ModelConfig` and `DPOConfig`."""
    return dpo.make_parser()


def main(argv: list[str] | None = None) -> dict | None:
    """Build teacher-ranked pairs, train DPO, measure; return the stage record written to `output_dir/stage.json`."""
    return dpo.main(argv)


if __name__ == "__main__":
    main()
