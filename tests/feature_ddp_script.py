"""Run by tests/test_features.py under `torchrun --nproc_per_node 2` (DDP on gloo): one SGD step with feature KD.

Usage: `torchrun --nproc_per_node 2 tests/feature_ddp_script.py OUT.pt`. Rank 0 saves the student's first MLP weight
and the projections after the step, and every rank checks its projections equal rank 0's.
"""

import os
import sys

import torch
import torch.distributed as dist


def one_step(output_dir: str, world_size: int):
    from trl_distill import DistillConfig, DistillTrainer
    from trl_distill.demo.task import make_task_dataset, task_corpus
    from trl_distill.demo.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer(task_corpus(seed=0, n=1500), vocab_size=1000)
    args = DistillConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=1,
        per_device_train_batch_size=4 // world_size,
        learning_rate=1.0,
        optim="sgd",
        save_strategy="no",
        report_to="none",
        seed=0,
        feature_weight=1.0,
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    trainer = DistillTrainer(
        model=build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1),
        teacher_model=build_tiny_model(tokenizer, hidden_size=64, num_layers=4, num_heads=4, seed=2),
        args=args,
        train_dataset=make_task_dataset(16, seed=0, split="train"),
        processing_class=tokenizer,
    )
    trainer.train()
    state = {f"projector.{k}": v for k, v in trainer.feature_projector.state_dict().items()}
    state["student.layers.0.mlp.down_proj.weight"] = trainer.model.model.layers[0].mlp.down_proj.weight.detach()
    return state


if __name__ == "__main__":
    torch.set_num_threads(1)
    state = one_step(os.path.dirname(sys.argv[1]), int(os.environ["WORLD_SIZE"]))
    for name, value in state.items():
        gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, value.contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name} differs across ranks"
    if dist.get_rank() == 0:
        torch.save(state, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
