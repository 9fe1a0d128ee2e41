"""Prune, then distill from the original: depth-prune a model, distill the pruned copy from it, one receipt.

The entry point of a clone; the recipe is `trl_distill.scripts.prune_distill` (`trl-distill prune-distill`, no clone
needed), whose docstring describes the steps and the `prune_*` / `calibration_*` keys.

    trl-distill recipe-assets    # the tiny config's local models and data
    python recipes/prune_distill.py --config recipes/configs/tiny_prune_distill.yaml
    python recipes/prune_distill.py --config recipes/configs/smollm2-prune-distill.yaml
"""

from trl_distill.scripts import prune_distill


def make_parser():
    """TRL's parser over `PruneDistillScriptArguments`, `ModelConfig` and `DistillConfig`."""
    return prune_distill.make_parser()


def main(argv: list[str] | None = None) -> dict | None:
    """Prune, distill, measure; return the stage record written to `output_dir/stage.json`."""
    return prune_distill.main(argv)


if __name__ == "__main__":
    main()
