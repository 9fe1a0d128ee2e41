"""Precompute a teacher's top-k log-probabilities once, then distill from the store without loading the teacher.

The entry point of a clone; the recipe is `trl_distill.scripts.cache_teacher` (`trl-distill cache-teacher`, no clone
needed), whose docstring shows the YAML that serves both steps.

    python recipes/precompute_teacher.py --config distill.yaml
    accelerate launch --num_processes 8 recipes/precompute_teacher.py --config distill.yaml
    # on CPU (use_cpu: true): `--cpu` would start ONE process; DDP on gloo needs the multi-process config
    accelerate launch --config_file recipes/accelerate_configs/ddp_cpu.yaml recipes/precompute_teacher.py --config distill.yaml
"""

import sys

from trl_distill.scripts import cache_teacher


def make_parser():
    """TRL's parser over `ScriptArguments` (dataset), `CacheTeacherArguments` and `DistillConfig`."""
    return cache_teacher.make_parser()


def main(argv: list[str] | None = None) -> int:
    """Write the store; return the exit code."""
    return cache_teacher.main(argv)


if __name__ == "__main__":
    sys.exit(main())
