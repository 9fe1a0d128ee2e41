"""MiniLLM (Gu et al. 2024): the sequence-level reverse KL `KL(q_theta || p)` over student samples, as a policy gradient.

[MiniLLM: Knowledge Distillation of Large Language Models](https://huggingface.co/papers/2306.08543). Every training
batch's prompts get fresh completions drawn from the teacher-mixed policy `alpha p + (1 - alpha) q_theta`
([`~trl_distill.sources.mixture.sample_mixture`]); the loss is the surrogate of
[`~trl_distill.losses.minillm`] on those tokens (exact single-step reverse KL + importance-weighted, length-normalized
long-term policy gradient), plus optionally `minillm_lm_weight` times the cross-entropy on the dataset's own
completions (the paper's language-modeling term).
"""

from __future__ import annotations

import math

import torch

from ..losses import linear_distillation_loss
from ..losses.minillm import linear_minillm_loss, minillm_coefficients
from ..sources.completions import completion_batch, completion_starts
from ..sources.mixture import sample_mixture
from ..teachers.generation import eos_token_ids
from ..teachers.live import call_with_lm_heads, check_plain_lm_head, lm_head_and_backbone
from .base import DistillMode, register_mode


@register_mode("minillm")
class MiniLLMMode(DistillMode):
    """Reverse KL at the sequence level, optimized by policy gradient on teacher-mixed samples (MiniLLM).

    Per training batch:

    1. the batch's prompts (everything before the first label) are completed token by token from
       `p~ = minillm_teacher_mix * p + (1 - minillm_teacher_mix) * q` (`max_completion_length`; sampling
       `temperature`, `top_k`, `top_p` apply to the mixture: anything but `1.0`/`None`/`1.0` makes the samples differ
       from `q` in a way the single-step importance weight corrects only approximately);
    2. for each drawn token: reward `r_t = log p(y_t) - log q(y_t)`, future reward `R_{t+1}` (mean of the later
       rewards with `minillm_length_normalize`, else their sum), importance weight `w_t = q(y_t) / p~(y_t)`;
    3. loss `sum_t [w_t KL(q_t || p_t) + c_t (-log q_theta(y_t))] / N` over the N sampled tokens, with
       `c_t = w_t R_{t+1}` (zeroed where the PPO-style clip `minillm_clip` binds): the first term's gradient is the
       exact single-step part, the second the long-term policy gradient. Computed chunk by chunk from hidden states
       (no `(B, T, V)` logits); gradients flow into the student only;
    4. with `minillm_lm_weight > 0`, `+ minillm_lm_weight * CE` on the dataset's completions (same forward pass).

    One optimizer update per sampled batch (no PPO inner epochs), so the policy ratio is 1 and the rewards come from
    the sampling pass. Under gradient accumulation each micro-batch's mean is weighted by its share of the window's
    dataset tokens (`num_items_in_batch`). Evaluation batches report the exact token-level reverse KL on the dataset's
    completions (`eval_loss`), no sampling. `kd_temperature`, `alpha`, `objective`, `beta` are not read.
    """

    label = "MiniLLM: sequence-level reverse KL by policy gradient"
    papers = ({"arxiv": "2306.08543", "title": "MiniLLM: Knowledge Distillation of Large Language Models"},)

    def __init__(self, context):
        super().__init__(context)
        check_plain_lm_head(context.student, "student")
        check_plain_lm_head(context.teacher, "teacher")
        tokenizer = context.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(context.student, tokenizer)

    @classmethod
    def describe(cls, args) -> str:
        return f"{cls.label} (teacher mix {args.minillm_teacher_mix})"

    @classmethod
    def validate_config(cls, args) -> None:
        mix = args.minillm_teacher_mix
        if isinstance(mix, bool) or not (isinstance(mix, (int, float)) and 0.0 <= mix < 1.0):
            raise ValueError(
                f"`minillm_teacher_mix` must be in [0, 1) (the teacher's share of the sampling policy; the paper uses "
                f"0.2; 1 would never sample the student), got {mix!r}."
            )
        clip = args.minillm_clip
        if clip is not None and (
            isinstance(clip, bool) or not (isinstance(clip, (int, float)) and 0 < clip < math.inf)
        ):
            raise ValueError(f"`minillm_clip` must be None (no clipping) or a finite number > 0, got {clip!r}.")
        if not isinstance(args.minillm_length_normalize, bool):
            raise TypeError(
                f"`minillm_length_normalize` must be True or False, got {args.minillm_length_normalize!r}."
            )
        weight = args.minillm_lm_weight
        if isinstance(weight, bool) or not (
            isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0
        ):
            raise ValueError(f"`minillm_lm_weight` must be a finite number >= 0 (0 = off), got {weight!r}.")
        if args.lmbda > 0 or args.seq_kd:
            raise ValueError(
                f"`distill_mode='minillm'` samples its own completions (from the teacher-mixed policy) at every step, "
                f"so `lmbda={args.lmbda}` / `seq_kd={args.seq_kd}` would replace them. Set `lmbda=0` and "
                "`seq_kd=False` (`minillm_teacher_mix` sets how much the teacher takes part in sampling)."
            )
        if args.kd_top_k is not None:
            raise ValueError(
                f"`kd_top_k={args.kd_top_k}`: MiniLLM's single-step term is the exact reverse KL over the whole "
                "vocabulary. Set `kd_top_k=None`."
            )
        if args.loss_reduction != "mean":
            raise ValueError(
                f"`loss_reduction={args.loss_reduction!r}`: MiniLLM averages its surrogate over the sampled tokens. "
                "Set `loss_reduction='mean'`."
            )
        for name in ("packing", "padding_free"):
            if getattr(args, name):
                raise ValueError(
                    f"`{name}=True` merges rows, so MiniLLM cannot find each prompt to sample from. Set `{name}=False`."
                )
        if args.completion_only_loss is False:
            raise ValueError(
                "`completion_only_loss=False` puts the prompt in the labels, so MiniLLM cannot tell where the prompt "
                "ends: leave `completion_only_loss` at None or True."
            )
        super().validate_config(args)  # feature KD and `teacher_cache` are refused there

    def compute_loss(self, model, inputs, num_items_in_batch):
        if "attention_mask" not in inputs:
            raise ValueError("MiniLLM needs padded batches: set `packing=False` and `padding_free=False`.")
        if not model.training:
            return self._evaluation_loss(model, inputs, num_items_in_batch)
        context, args = self.context, self.args
        labels = inputs["labels"]
        starts = completion_starts(labels, inputs["attention_mask"])
        prompts = [inputs["input_ids"][row, :start].tolist() for row, start in enumerate(starts)]
        samples = sample_mixture(
            context.student, context.teacher, prompts, teacher_mix=float(args.minillm_teacher_mix),
            max_new_tokens=args.max_completion_length, eos_ids=self.eos_ids, pad_token_id=self.pad_id,
            vocab_size=context.vocab_size, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        )  # fmt: skip
        sampled = completion_batch(prompts, samples.completions, pad_token_id=self.pad_id, device=labels.device)
        coefficients, per_token = self._coefficients(samples, prompts, sampled)

        # One student forward over the sampled rows and (for the LM term) the dataset rows: DDP allows one forward.
        lm_weight = float(args.minillm_lm_weight)
        rows = [sampled] + ([{k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}] if lm_weight else [])
        joint = _stack_right_padded(rows, self.pad_id)
        outputs = model(
            input_ids=joint["input_ids"], attention_mask=joint["attention_mask"], use_cache=False,
            output_hidden_states=True, logits_to_keep=1,
        )  # fmt: skip
        hidden = outputs.hidden_states[-1][:, :-1]
        batch_rows = sampled["input_ids"].shape[0]
        student_head, _ = lm_head_and_backbone(model)
        teacher_head, teacher_backbone = lm_head_and_backbone(context.teacher)
        with torch.no_grad():
            teacher_hidden = teacher_backbone(
                input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"], use_cache=False
            ).last_hidden_state[:, :-1]
        width = sampled["input_ids"].shape[1] - 1

        def loss_of(student_hidden):  # reads the heads' weights when called (`call_with_lm_heads`, ZeRO-3)
            result = linear_minillm_loss(
                student_hidden[:batch_rows, :width], student_head.weight, teacher_hidden.to(student_hidden.device),
                teacher_head.weight.to(student_hidden.device), tokens=sampled["input_ids"][:, 1:],
                kl_weight=coefficients.kl_weight, pg_weight=coefficients.pg_weight, mask=per_token["mask"],
                student_bias=getattr(student_head, "bias", None), teacher_bias=getattr(teacher_head, "bias", None),
                vocab_size=context.vocab_size, chunk_size=args.kd_chunk_size,
            )  # fmt: skip
            lm = None
            if lm_weight:
                lm = linear_distillation_loss(
                    student_hidden[batch_rows:], student_head.weight, student_hidden[batch_rows:].detach(),
                    student_head.weight.detach(), labels=joint["labels"][batch_rows:, 1:], alpha=0.0,
                    vocab_size=context.vocab_size, num_items_in_batch=num_items_in_batch,
                    chunk_size=args.kd_chunk_size, return_components=True,
                )  # fmt: skip
            return result, lm

        result, lm = call_with_lm_heads(loss_of, hidden, student_head, teacher_head)
        count = result.num_tokens.clamp(min=1)
        loss = result.surrogate_sum / count
        if num_items_in_batch is not None:
            # This micro-batch's share of the accumulation window (and of every rank), counted on the dataset's tokens.
            local = (labels[:, 1:] != -100).sum()
            loss = loss * local / torch.as_tensor(num_items_in_batch, device=loss.device).clamp(min=1)
        metrics = self._metrics(samples, coefficients, per_token, result, count)
        if lm is not None:
            loss = loss + lm_weight * lm.loss
            metrics["minillm/lm_loss"] = lm.ce_loss
        return loss, metrics

    def _coefficients(self, samples, prompts, sampled):
        """The surrogate's constants in the layout of the sampled batch's shifted positions `(B, W - 1)`."""
        args = self.args
        mask = torch.zeros(len(prompts), max(len(c) for c in samples.completions), dtype=torch.bool)
        for row, completion in enumerate(samples.completions):
            mask[row, : len(completion)] = True
        logq, logp, logm = (samples.padded(name, mask.shape[1]) for name in
                            ("student_logprobs", "teacher_logprobs", "sample_logprobs"))  # fmt: skip
        compact = minillm_coefficients(
            logq, logp, logm, mask, length_normalize=args.minillm_length_normalize, clip=args.minillm_clip
        )
        device = sampled["input_ids"].device
        width = sampled["input_ids"].shape[1] - 1
        placed = {
            name: torch.zeros(len(prompts), width, dtype=value.dtype) for name, value in compact._asdict().items()
        }
        placed["mask"] = torch.zeros(len(prompts), width, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            n, start = len(samples.completions[row]), len(prompt) - 1  # position start + k predicts token k
            for name, value in compact._asdict().items():
                placed[name][row, start : start + n] = value[row, :n]
            placed["mask"][row, start : start + n] = True
        placed = {name: value.to(device) for name, value in placed.items()}
        rewards = ((logp - logq) * mask).sum(-1)
        if args.minillm_length_normalize:
            rewards = rewards / mask.sum(-1).clamp(min=1)
        placed["reward"] = rewards
        return type(compact)(*(placed[name] for name in compact._fields)), placed

    def _metrics(self, samples, coefficients, per_token, result, count) -> dict[str, torch.Tensor]:
        mask = per_token["mask"]
        ended = torch.tensor([float(e) for e in samples.ended])
        return {
            "minillm/reward": per_token["reward"].mean(),
            "minillm/single_step": result.single_step_sum / count,
            "minillm/pg_loss": result.pg_sum / count,
            "minillm/importance_weight": coefficients.kl_weight[mask].mean(),
            "minillm/clipped_fraction": coefficients.clipped[mask].float().mean(),
            "minillm/completion_length": mask.sum(-1).float().mean(),
            "minillm/ended_with_eos": ended.mean(),
        }

    def _evaluation_loss(self, model, inputs, num_items_in_batch):
        """Exact token-level reverse KL on the dataset's completions (no sampling at evaluation)."""
        context = self.context
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
            output_hidden_states=True, logits_to_keep=1,
        )  # fmt: skip
        student_head, _ = lm_head_and_backbone(model)
        teacher_head, teacher_backbone = lm_head_and_backbone(context.teacher)
        with torch.no_grad():
            teacher_hidden = teacher_backbone(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            ).last_hidden_state
        result = linear_distillation_loss(
            outputs.hidden_states[-1][:, :-1], student_head.weight, teacher_hidden[:, :-1],
            teacher_head.weight, labels=inputs["labels"][:, 1:], objective="reverse_kl", temperature=1.0, alpha=1.0,
            vocab_size=context.vocab_size, num_items_in_batch=num_items_in_batch, chunk_size=self.args.kd_chunk_size,
            return_components=True,
        )  # fmt: skip
        return result.loss, {"minillm/reverse_kl": result.kd_loss}


def _stack_right_padded(batches: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of several right-padded batches in one batch (`input_ids`, `attention_mask`, `labels`), padded to the
    widest."""
    width = max(batch["input_ids"].shape[1] for batch in batches)
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    out = {}
    for key, fill in fills.items():
        parts = [
            torch.nn.functional.pad(batch[key], (0, width - batch[key].shape[1]), value=fill) for batch in batches
        ]
        out[key] = torch.cat(parts, dim=0)
    return out
