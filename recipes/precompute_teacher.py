"""Precompute a teacher's top-k log-probabilities once, then distill from the store without loading the teacher.

One YAML serves both steps (a `DistillConfig` plus the dataset and caching keys):

```yaml
# distill.yaml
teacher_model_name_or_path: Qwen/Qwen2.5-7B-Instruct
teacher_model_init_kwargs: {dtype: bfloat16}
teacher_cache: runs/qwen7b-top64          # the store directory
kd_top_k: 64                              # stored entries per position (260 bytes); training may use fewer
kd_temperature: 2.0                       # the store is exact at this temperature only
max_length: 1024
dataset_name: data/train.jsonl
tokenizer_name_or_path: Qwen/Qwen2.5-0.5B-Instruct   # the student's tokenizer (same vocabulary)
teacher_batch_size: 16
rows_per_shard: 1024
output_dir: runs/student
```

```bash
# 1. the store: one process, or one per GPU writing disjoint shards (re-run the same command to resume)
python recipes/precompute_teacher.py --config distill.yaml
accelerate launch --num_processes 8 recipes/precompute_teacher.py --config distill.yaml
# on CPU (use_cpu: true): `--cpu` would start ONE process; DDP on gloo needs the multi-process config
accelerate launch --config_file recipes/accelerate_configs/ddp_cpu.yaml recipes/precompute_teacher.py --config distill.yaml
trl-distill cache-teacher --config distill.yaml          # the same, as a console script

# 2. training reads the store (teacher_model_name_or_path is then not loaded):
#    DistillTrainer(model=student, args=DistillConfig(teacher_cache="runs/qwen7b-top64", kd_top_k=64, ...), ...)
```
"""

import sys

from trl_distill import cache_teacher_parser, run_cache_teacher


def make_parser():
    """TRL's parser over `ScriptArguments` (dataset), `CacheTeacherArguments` and `DistillConfig`."""
    return cache_teacher_parser()


def main(argv=None) -> int:
    return run_cache_teacher(make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
