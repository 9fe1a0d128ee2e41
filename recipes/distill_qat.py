"""Quantization-aware recovery: the full-precision model teaches its quantized copy with `DistillTrainer`.

The entry point of a clone; the recipe is `trl_distill.scripts.qat` (`trl-distill qat`, no clone needed), whose
docstring describes both paths (`quantization: qlora`, bitsandbytes 4-bit + LoRA; `quantization: qat`, torchao).

    python recipes/distill_qat.py --config recipes/configs/tiny_qlora.yaml     # needs bitsandbytes
    python recipes/distill_qat.py --config recipes/configs/tiny_qat.yaml       # needs torchao
    accelerate launch recipes/distill_qat.py --config recipes/configs/qwen2.5-0.5b-qlora-recovery.yaml
"""

from trl_distill.scripts import qat


def make_parser():
    """TRL's parser over `QATScriptArguments`, `ModelConfig` and `DistillConfig`."""
    return qat.make_parser()


def main(argv: list[str] | None = None) -> dict | None:
    """Quantize, recover by distillation, measure; return the stage record written to `output_dir/stage.json`."""
    return qat.main(argv)


if __name__ == "__main__":
    main()
