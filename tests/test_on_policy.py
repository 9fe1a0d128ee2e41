"""On-policy distillation (GKD λ-mixing) and `seq_kd`: the coin, the batches built from samples, the trainer wiring."""

import math
import random

import pytest
import torch
from datasets import Dataset

from tests.test_sequence import count_generate, one_thread  # noqa: F401  (one_thread: autouse fixture)
from tests.test_trainer import config, snapshot
from trl_distill import DistillTrainer
from trl_distill.sources import completion_batch, completion_starts, on_policy_coin
from trl_distill.teachers.generation import generate_completion_ids


# ---------------------------------------------------------------- the coin

GOLDEN = [0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 1]  # on_policy_coin(0, step, 0.5), steps 0..15


def test_coin_agrees_across_ranks_whatever_their_rng_state():
    sides = []
    for rank in range(4):  # each "rank" has its own global RNG state, as DDP processes do
        torch.manual_seed(rank)
        random.seed(rank * 7 + 1)
        sides.append([on_policy_coin(42, step, 0.5) for step in range(300)])
    assert all(s == sides[0] for s in sides)
    assert sides[0] != [on_policy_coin(43, step, 0.5) for step in range(300)]  # control: another seed differs


def test_coin_is_a_fixed_function_of_seed_and_step():
    # Golden values: any dependence on the process (hash randomization, global RNG) would break them across runs.
    assert [int(on_policy_coin(0, step, 0.5)) for step in range(16)] == GOLDEN


@pytest.mark.parametrize("lmbda", [0.0, 0.3, 1.0])
def test_coin_frequency(lmbda):
    draws = [on_policy_coin(0, step, lmbda) for step in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(lmbda, abs=3 * math.sqrt(0.25 / 4000))
    if lmbda in (0.0, 1.0):
        assert set(draws) == {bool(lmbda)}


def _coin_worker(rank, world_size, init_file, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(1000 + rank)  # every rank in its own global RNG state
    random.seed(rank)
    mine = [on_policy_coin(7, step, 0.4) for step in range(200)]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        queue.put(all(g == gathered[0] for g in gathered) and 0 < sum(mine) < 200)
    dist.barrier()
    dist.destroy_process_group()


def test_coin_agrees_across_two_gloo_processes(tmp_path):
    # Forked, so the workers need no imports (spawned ones re-import everything: 20 s). The golden-value test above
    # covers what forking shares (hash randomization).
    import torch.multiprocessing as mp

    queue = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_coin_worker, args=(2, str(tmp_path / "init"), queue), nprocs=2, start_method="fork")
    assert queue.get() is True


# ---------------------------------------------------------------- batches from generated completions


class _ScriptedModel(torch.nn.Module):
    """A stand-in with `generate`: records its inputs and appends fixed tokens to every row."""

    def __init__(self, new_tokens):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.new_tokens = torch.tensor(new_tokens)
        self.seen = {}

    def generate(self, input_ids, attention_mask, **kwargs):
        self.seen = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        return torch.cat([input_ids, self.new_tokens], dim=1)


def test_generation_left_pads_and_cuts_after_eos():
    eos, pad = 2, 0
    model = _ScriptedModel([[7, 2, 9, 9], [8, 8, 8, 8], [2, 5, 2, 5]])
    completions, ended = generate_completion_ids(
        model, [[11, 12, 13], [14], [15, 16]], pad_token_id=pad, eos_ids={eos}, generation_kwargs={"max_new_tokens": 4}
    )
    assert model.seen["input_ids"].tolist() == [[11, 12, 13], [0, 0, 14], [0, 15, 16]]
    assert model.seen["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert completions == [[7, 2], [8, 8, 8, 8], [2]] and ended == [True, False, True]

    batch = completion_batch([[11, 12, 13], [14], [15, 16]], completions, pad_token_id=pad)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 7, 2], [14, 8, 8, 8, 8], [15, 16, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 2], [-100, 8, 8, 8, 8], [-100, -100, 2, -100, -100]]


def test_prompts_are_found_from_the_labels():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100], [-100, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    assert completion_starts(labels, mask) == [2, 1, 3]  # a row with no completion token: its whole length
    with pytest.raises(ValueError, match="no prompt"):
        completion_starts(torch.tensor([[4, 5, -100]]), torch.ones(1, 3))


# ---------------------------------------------------------------- the trainer


def _trainer(tmp_path, tokenizer, student, teacher, dataset, **kwargs):
    kwargs = {"alpha": 1.0, "max_completion_length": 4, "objective": "reverse_kl", "max_steps": 2, **kwargs}
    return DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def _record_loss_inputs(trainer):
    seen, original = [], trainer.distill_mode.compute_loss

    def compute_loss(model, inputs, num_items_in_batch):
        seen.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return original(model, inputs, num_items_in_batch)

    trainer.distill_mode.compute_loss = compute_loss
    return seen


def _record_generations(model):
    outputs, original = [], model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        outputs.append((kwargs["input_ids"], out[:, kwargs["input_ids"].shape[1] :]))
        return out

    model.generate = generate
    return outputs


def test_lmbda_one_trains_on_the_students_samples(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    student, teacher = make_student(), make_teacher()
    trainer = _trainer(tmp_path, tokenizer, student, teacher, prompt_completion_dataset, lmbda=1.0)
    generations, seen = _record_generations(trainer.model), _record_loss_inputs(trainer)
    teacher_calls = count_generate(trainer.teacher_model)
    trainer.train()

    assert len(generations) == len(seen) == 2 and teacher_calls == []
    kwargs = trainer.completion_source.student_kwargs
    assert kwargs["do_sample"] and kwargs["temperature"] == trainer.args.temperature and kwargs["max_new_tokens"] == 4
    for (prompts, new_tokens), inputs in zip(generations, seen):
        for row in range(new_tokens.shape[0]):
            tokens = new_tokens[row].tolist()
            if tokenizer.eos_token_id in tokens:  # everything after the first EOS is out of the loss
                tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
            labels = inputs["labels"][row]
            assert labels[labels != -100].tolist() == tokens
            prompt = prompts[row][prompts[row] != tokenizer.pad_token_id].tolist()  # left padding removed
            assert inputs["input_ids"][row, : len(prompt)].tolist() == prompt
    logged = [log for log in trainer.state.log_history if "on_policy" in log]
    assert [log["on_policy"] for log in logged] == [1.0, 1.0]
    assert all(0 < log["completion_length"] <= 4 for log in logged)


def test_lmbda_zero_never_generates(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    trainer = _trainer(tmp_path, tokenizer, make_student(), make_teacher(), prompt_completion_dataset, lmbda=0.0)
    assert trainer.completion_source is None

    def refuse(*args, **kwargs):
        raise AssertionError("generate called with lmbda=0")

    trainer.model.generate = trainer.teacher_model.generate = refuse
    trainer.train()


def test_seq_kd_calls_the_teachers_generate(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    trainer = _trainer(tmp_path, tokenizer, make_student(), make_teacher(), prompt_completion_dataset, seq_kd=True)
    student_calls, teacher_generations = count_generate(trainer.model), _record_generations(trainer.teacher_model)
    seen = _record_loss_inputs(trainer)
    trainer.train()
    assert student_calls == [] and len(teacher_generations) == 2
    for (_, new_tokens), inputs in zip(teacher_generations, seen):
        labels = inputs["labels"][0]
        assert labels[labels != -100].tolist() == new_tokens[0, : (labels != -100).sum()].tolist()
    assert [log["teacher_generated"] for log in trainer.state.log_history if "teacher_generated" in log] == [1.0, 1.0]


def test_window_token_count_covers_generated_tokens(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    trainer = _trainer(
        tmp_path,
        tokenizer,
        make_student(),
        make_teacher(),
        prompt_completion_dataset,
        lmbda=1.0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in rows]) for rows in ([0, 1], [2, 3])]
    dataset_count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    new_batches, num_items = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert int(num_items) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in new_batches) != dataset_count


def test_lora_student_with_activation_checkpointing(
    tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset
):
    from peft import LoraConfig

    trainer = DistillTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(
            tmp_path, lmbda=1.0, alpha=1.0, max_completion_length=4, activation_checkpointing=True, max_steps=2
        ),
        train_dataset=prompt_completion_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    before = snapshot(trainer.model)
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora" in n for n in changed)
    assert trainer.model.base_model.model.is_activation_checkpointing  # turned back on after each generation


@pytest.mark.parametrize("lmbda", [-0.1, 1.5, float("nan")])
def test_lmbda_outside_unit_interval_is_refused(tmp_path, lmbda):
    with pytest.raises(ValueError, match="`lmbda` must be in \\[0, 1\\]"):
        config(tmp_path, lmbda=lmbda)


def test_on_policy_needs_a_prompt(tmp_path, tokenizer, make_student, make_teacher, prompt_completion_dataset):
    text = Dataset.from_dict(
        {
            "text": [
                p + c
                for p, c in zip(prompt_completion_dataset["prompt"][:4], prompt_completion_dataset["completion"][:4])
            ]
        }
    )
    with pytest.raises(ValueError, match="no `prompt` column"):
        _trainer(tmp_path, tokenizer, make_student(), make_teacher(), text, lmbda=0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lmbda=0.5, packing=True), "packing=False"),
        (dict(seq_kd=True, completion_only_loss=False), "completion_only_loss"),
        (dict(distill_mode="sequence", lmbda=0.5), "distill_mode='sequence'"),
        (dict(temperature=0.0), "`temperature`"),
        (dict(top_p=0.0), "`top_p`"),
        (dict(top_k=0), "`top_k`"),
        (dict(max_completion_length=0), "`max_completion_length`"),
    ],
)
def test_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, alpha=1.0, **kwargs)


def test_cross_entropy_on_own_samples_warns(tmp_path):
    with pytest.warns(UserWarning, match="own samples"):
        config(tmp_path, lmbda=0.5, alpha=0.9)
