"""Distill a teacher into a student from a YAML config: `DistillTrainer` driven by TRL's parser.

The entry point of a clone; the recipe itself is `trl_distill.scripts.distill`, installed with the package, which
`trl-distill train` runs (no clone needed). Every key of the YAML is a field of TRL's `ScriptArguments` /
`ModelConfig` or of `DistillConfig`; flags after the config override it; an unknown key is an error that names it.

    # one process (CPU or one GPU)
    python recipes/distill.py --config recipes/configs/qwen2.5-1.5b-to-0.5b-full.yaml
    # several GPUs (DDP), or DeepSpeed ZeRO-3 / FSDP2 with a config from recipes/accelerate_configs/
    accelerate launch --num_processes 8 recipes/distill.py --config recipes/configs/qwen2.5-14b-to-3b-lora.yaml
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml recipes/distill.py --config <config>.yaml
    # the tiny offline config (CPU, about a minute): write its local models and data first
    trl-distill recipe-assets && python recipes/distill.py --config recipes/configs/tiny.yaml
    # two CPU processes (DDP on gloo; `--cpu` would start only one)
    accelerate launch --config_file recipes/accelerate_configs/ddp_cpu.yaml recipes/distill.py \\
        --config recipes/configs/tiny.yaml --output_dir runs/recipes/tiny-ddp
    # the same without a clone
    trl-distill train --config x.yaml [--num_processes 8] [--accelerate_config zero3]
"""

from trl_distill.scripts import distill


def make_parser():
    """TRL's parser over `DistillScriptArguments`, `ModelConfig` and `DistillConfig`."""
    return distill.make_parser()


def main(argv: list[str] | None = None) -> dict | None:
    """Train, save, measure held-out KL; return the stage record written to `output_dir/stage.json`."""
    return distill.main(argv)


if __name__ == "__main__":
    main()
