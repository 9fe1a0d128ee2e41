"""`DistillConfig`: TRL's `SFTConfig` plus the distillation knobs, validated in one place (no I/O here)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from .field_types import check_field_types, positive_int
from .gate import check_gate_settings
from .losses import FEATURE_LOSSES, OBJECTIVES, REDUCTIONS, ULD_DISTANCES, check_sampled_objective
from .modes import available_modes, get_mode
from .terms.layer_map import FEATURE_PROJECTION_MODES, parse_layer_map


def _default_bf16(config) -> bool:
    """TRL defaults `bf16=True`, which `TrainingArguments` refuses on a machine without a bf16-capable accelerator
    unless `use_cpu=True`. `DistillConfig` resolves an unset `bf16` to True only where bf16 mixed precision runs (an
    accelerator with bf16 support, not `use_cpu`, not `fp16`); elsewhere training runs in float32."""
    if config.fp16 or config.use_cpu:
        return False
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return bool(is_torch_bf16_gpu_available() or is_torch_xla_available())


@dataclass
class DistillConfig(SFTConfig):
    r"""
    Configuration for [`DistillTrainer`]: every [`~trl.SFTConfig`] field plus the distillation settings below.

    One default differs from `SFTConfig`: `bf16` left unset becomes `True` only when a bf16-capable accelerator is
    present (and neither `use_cpu` nor `fp16` is set), else `False` (float32), so a config runs as written on a CPU
    machine. Set `bf16` explicitly to override.

    The token-level loss at each response position is `alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE`, with
    `T = kd_temperature` and `D` chosen by `objective`; it is reduced per `loss_reduction`.

    Parameters that control the teacher:
        teacher_model_name_or_path (`str`, *optional*):
            Teacher model id or local path, used when the trainer's `teacher_model` argument is not given (e.g. from a
            YAML recipe).
        teacher_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the teacher is given as a string.

    Parameters that control what is matched:
        distill_mode (`str`, *optional*, defaults to `"token"`):
            `"token"`: token-level (logit) KD on the dataset's response tokens; needs a shared vocabulary.
            `"uld"`: cross-tokenizer distillation (Universal Logit Distillation): the teacher reads the same text with
            its own tokenizer, tokens are paired by character offsets and compared by sorted top-k probabilities.
            `"sequence"`: sequence-level KD: plain cross-entropy on the teacher's generated completions (any two
            tokenizers).
            `"context"`: context distillation: the teacher reads each prompt with `teacher_context` in front of it,
            the student without it; token-level KD on the response tokens.
            Any name registered with [`~trl_distill.register_mode`] (before the config is created) is accepted; the
            mode's own `validate_config` then checks the settings it depends on.

    Parameters that control how the gap is measured:
        objective (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"` = KL(teacher || student) (mode-covering), `"reverse_kl"` = KL(student || teacher)
            (mode-seeking), `"jsd"` (beta = 0.5) or `"generalized_jsd"` (uses `beta`).
        beta (`float`, *optional*, defaults to `0.5`):
            Generalized-JSD interpolation with TRL's meaning (0 = forward KL, 1 = reverse KL). Only used with
            `objective="generalized_jsd"`.
        kd_temperature (`float`, *optional*, defaults to `2.0`):
            Temperature of both softmaxes in the KD term; the term is scaled by `kd_temperature**2`. Not the sampling
            temperature.
        alpha (`float`, *optional*, defaults to `0.9`):
            Weight of the KD term; `1 - alpha` weighs the cross-entropy on the dataset's target tokens.
        kd_top_k (`int`, *optional*):
            Keep the teacher's top-k tokens and fold the rest of the vocabulary into one "other" bucket on both sides.
            `None` uses the full vocabulary.
        loss_reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` over response tokens (of the whole accumulated batch) or `"sum"`.
        kd_chunk_size (`int`, *optional*):
            Positions projected through the `lm_head`s at once. `None`: 256 (fewer for vocabularies above ~185k
            tokens, so one float32 block stays near 128 MiB).

    Parameters that control held-out measurement and the receipt:
        heldout_eval (`bool`, *optional*, defaults to `True`):
            With a teacher and an `eval_dataset`, measure held-out KL / perplexity of the student against the teacher
            at every evaluation and at the end of training ([`~trl_distill.callbacks.HeldOutKLCallback`]).
        heldout_max_rows (`int`, *optional*):
            Measure only the first rows of the eval set; `None` measures all of them.
        heldout_plateau_patience (`int`, *optional*, defaults to `3`):
            Warn once when held-out KL has not improved for this many evaluations while the training loss falls;
            `0` disables the warning.
        receipt_signing_key (`str`, *optional*):
            Path to an Ed25519 private key (PEM); `save_model` then signs `distill_receipt.json` into
            `distill_receipt.sig` (needs `pip install trl_distill[sign]`).
    Parameters of cross-tokenizer distillation (`distill_mode="uld"`):
        uld_top_k (`int`, *optional*, defaults to `64`):
            Sorted probabilities kept per side at each paired position; `None` = the whole vocabulary.
        uld_distance (`str`, *optional*, defaults to `"wasserstein"`):
            `"wasserstein"`: sum of absolute differences of the sorted probabilities (the ULD paper's closed form);
            `"kl"`: KL(teacher || student) of the two sorted top-k vectors, each renormalized to sum to one.
        uld_exact_match (`bool`, *optional*, defaults to `False`):
            Compare tokens whose surface string is in both vocabularies by identity (with `objective`, plus one
            bucket for the rest of the mass) and only the others by sorted matching. Helps when the vocabularies
            overlap a lot (related tokenizers, an extended vocabulary): identity keeps which token gets the mass.
    Parameters of the offline teacher:
        teacher_cache (`str`, *optional*):
            Directory of a teacher store written by `trl-distill cache-teacher` / [`cache_teacher`]: train from the
            teacher's stored targets instead of a live teacher (which is then not loaded). Needs the store's
            `kd_temperature`; `packing` and `padding_free` are refused.
        teacher_cache_kind (`str`, *optional*):
            What the store holds: `"topk"`, the teacher's top-k log-probabilities (exact for the `kd_top_k` loss,
            biased for the full-vocabulary one; needs `kd_top_k`, at most the store's k); `"sampled"`,
            `teacher_cache_num_samples` tokens drawn from the teacher at `kd_temperature` (Sparse Logit Sampling,
            https://arxiv.org/abs/2503.16870): the forward-KL loss against them is unbiased in value and gradient
            (needs `objective="forward_kl"` and `kd_top_k=None`). `None` (default, with `teacher_cache`): `"topk"`
            when `kd_top_k` is set, else `"sampled"` (at equal bytes it trained closer to the full-vocabulary
            teacher, README "Offline teacher store"). Read by the caching run and checked against the store.
        teacher_cache_num_samples (`int`, *optional*, defaults to `12`):
            Draws per position in a sampled store (`4 * (n + 1)` bytes per position, the size of a top-`n` store).
        teacher_cache_seed (`int`, *optional*, defaults to `0`):
            Seed of a sampled store's draws (combined with each row's content, so the draws do not depend on batching,
            sharding or resumption).
    Parameters that control feature (hidden-state) KD, added to the token mode's loss:
        feature_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the feature term: the loss becomes `L + feature_weight * L_feat`. `0` turns feature KD off (the
            teacher's hidden states are then never requested).
        feature_layer_map (`list[list[int]]` or `str`, *optional*):
            `(student layer, teacher layer)` pairs, 0-based decoder-layer indices (negative from the end), e.g.
            `"0:1,1:3"` or `[[0, 1], [1, 3]]`. `None`: `min(L_s, L_t)` evenly spaced pairs ending at both last layers.
        feature_loss (`str`, *optional*, defaults to `"relative_mse"`):
            Per position: `"relative_mse"` (`||s - t||^2 / ||t||^2`, independent of the hidden states' scale, so the
            massive activations of real LMs do not swamp the KD term), `"mse"` (squared error averaged over the hidden
            dimensions) or `"cosine"` (`1 - cos`).
        feature_projection (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: a learned linear map per pair when the widths differ, the identity when they match; `"always"`:
            a learned map for every pair (identity-initialized when the widths match).
    Parameters that control where the completions come from (sequence-level KD and on-policy distillation, GKD):
        lmbda (`float`, *optional*, defaults to `0.0`):
            Fraction of optimizer steps that are on-policy: the student samples a completion for each prompt of the
            batch and the loss (e.g. token-level KD) is taken on those tokens. 0 = always the dataset's completions,
            1 = always the student's samples. The same steps on every rank.
        seq_kd (`bool`, *optional*, defaults to `False`):
            On the steps that are not on-policy, train on completions the teacher generates for the batch's prompts
            (fresh at every step) instead of the dataset's.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of generated completions (the student's on-policy samples; the teacher's with
            `teacher_do_sample=True`). Not `kd_temperature`, which softens the distributions inside the loss.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus-sampling threshold for generated completions.
        top_k (`int`, *optional*):
            Sample among the `top_k` most likely tokens; `None` = no limit. Not `kd_top_k`, which prunes the loss.
        max_completion_length (`int`, *optional*, defaults to `128`):
            Maximum number of tokens generated per completion (student samples and teacher generations).
        teacher_do_sample (`bool`, *optional*, defaults to `False`):
            Teacher generations sample (with `temperature`/`top_p`/`top_k`) instead of greedy/beam search.
        teacher_num_beams (`int`, *optional*, defaults to `1`):
            Beam width of teacher generations (1 = greedy).
        teacher_completion_column (`str`, *optional*, defaults to `"teacher_completion"`):
            `distill_mode="sequence"`: the dataset column that holds the teacher's completions. When the training
            dataset has it, it is trained on and no teacher is needed; otherwise the teacher fills it.
        teacher_generation_cache_dir (`str`, *optional*):
            Where `distill_mode="sequence"` stores the teacher's completions (a subdirectory per fingerprint of
            teacher, prompts and settings); defaults to `~/.cache/trl_distill/teacher_generations` (never inside `output_dir`).
        teacher_generation_batch_size (`int`, *optional*, defaults to `32`):
            Prompts per teacher `generate` call when building that cache.
    Parameters of context distillation (`distill_mode="context"`, see [`~trl_distill.modes.ContextDistillMode`]):
        teacher_context (`str` or `list[dict]`, *optional*):
            What only the teacher sees: text put in front of each prompt (plain-text rows: `context + prompt`, token by
            token; conversational rows: the system message, merged with the row's own), or a list of
            `{"role", "content"}` messages (few-shot turns) put in front of conversational prompts. Required by that
            mode.
        self_distillation (`bool`, *optional*, defaults to `False`):
            The teacher is the student itself, as it was when training started: for a PEFT (LoRA) student, its base
            model with the adapters disabled (no second copy of the weights); otherwise a frozen copy. `teacher_model`
            and `teacher_model_name_or_path` must then be unset.
        teacher_update_steps (`int`, *optional*):
            With `self_distillation=True` and a full-weight student: copy the student's weights into the teacher
            every `teacher_update_steps` optimizer steps (the teacher becomes the improved student, still with the
            context). Refused for a PEFT student (its teacher is the base model; see the mode's docstring).
    Parameters of a served teacher (issue 16, `trl_distill.teachers.served`):
        teacher_url (`str`, *optional*):
            A vLLM server (`vllm serve`, OpenAI-compatible completions with `prompt_logprobs`) serving the teacher.
            Without `teacher_cache`, `distill_mode="token"` scores every training batch through it (no teacher is
            loaded here; the loss is the offline store's, from the top-`kd_top_k` log-probabilities); with
            `teacher_cache`, `trl-distill cache-teacher` fills that store through it and training reads the store.
            Needs `kd_top_k` and `kd_temperature=1.0` (vLLM's prompt log-probabilities are at temperature 1).
        teacher_served_model (`str`, *optional*):
            The served model name; defaults to the first one the server reports.
        teacher_prompts_per_request, teacher_max_concurrency, teacher_request_timeout, teacher_max_retries:
            Rows per request (default 8), requests in flight (4), seconds per request before a retry (120), retries
            with exponential backoff after timeouts, resets and HTTP 5xx/429 (5).
    Parameters of the release gate (issue 16, see `trl_distill/gate.py`): what a student must meet to be pushed:
        release_gate (`list[str]`, `str` or `dict`, *optional*):
            Thresholds on the held-out figures, by the names the held-out callback logs: `"name<=value"` /
            `"name>=value"` strings (a list, or one comma-separated string on the command line), or a mapping
            `{name: "<=value"}`, e.g. `["heldout_kl_teacher_student<=0.5", "heldout_top1_agreement>=0.6"]`. Evaluated
            at the end of training (after the held-out measurement); needs a teacher and an `eval_dataset`.
        release_gate_check (`str`, *optional*):
            A check of the student's greedy answers to the held-out prompts, by import path (`"module:function"`):
            `function(prompts, completions[, references])` returning one bool/score per answer (or a pass fraction),
            or `function(prompt, completion) -> bool` called per answer. Answers are up to `max_completion_length`
            tokens.
        release_gate_min_pass (`float`, *optional*, defaults to `1.0`):
            Fraction of the answers `release_gate_check` must pass.
        release_gate_override (`str`, *optional*):
            Push a student that failed its gate anyway, for this reason (recorded in the receipt and the card). The
            same as `push_to_hub(override_release_gate=reason)`.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    # Teacher
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher model id or local path, used when the trainer is not given `teacher_model`."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the teacher is given as a string "
            '(e.g. \'{"dtype": "bfloat16", "revision": "main"}\').'
        },
    )

    # What is matched
    distill_mode: str = field(
        default="token",
        metadata={
            "help": "What is matched. 'token': token-level (logit) KD; needs a shared vocabulary. 'uld': "
            "cross-tokenizer KD (character-offset alignment, sorted top-k matching). 'sequence': cross-entropy on the "
            "teacher's generated completions (any tokenizers); or a mode registered with `register_mode`."
        },
    )

    # How the gap is measured
    objective: str = field(
        default="forward_kl",
        metadata={
            "help": "Divergence: 'forward_kl' = KL(teacher||student), 'reverse_kl' = KL(student||teacher), 'jsd' "
            "(beta=0.5), 'generalized_jsd' (uses `beta`).",
            "choices": OBJECTIVES,
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "Generalized-JSD interpolation (TRL's meaning: 0 forward KL, 1 reverse KL). Only read with objective='generalized_jsd'."
        },
    )
    kd_temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T of the KD term (scaled by T^2). Not the sampling temperature."},
    )
    alpha: float = field(
        default=0.9,
        metadata={"help": "Weight of the KD term; (1 - alpha) weighs the cross-entropy on the target tokens."},
    )
    kd_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Keep the teacher's top-k tokens plus one 'other' bucket on both sides; None = full vocabulary."
        },
    )
    loss_reduction: str = field(
        default="mean",
        metadata={
            "help": "'mean' over response tokens of the whole accumulated batch, or 'sum'.",
            "choices": REDUCTIONS,
        },
    )
    kd_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Positions projected through the lm_heads at once; None picks one from the vocabulary size."
        },
    )

    # Held-out measurement and receipt (issue 7)
    heldout_eval: bool = field(
        default=True,
        metadata={
            "help": "Measure held-out KL/perplexity vs the teacher at each eval and at the end (needs an eval set)."
        },
    )
    heldout_max_rows: int | None = field(
        default=None, metadata={"help": "Measure only the first rows of the eval set; None measures all."}
    )
    heldout_plateau_patience: int = field(
        default=3,
        metadata={"help": "Warn when held-out KL stalls this many evals while the train loss falls; 0 disables."},
    )
    receipt_signing_key: str | None = field(
        default=None,
        metadata={"help": "Ed25519 private key (PEM) signing distill_receipt.json on save (needs the `sign` extra)."},
    )
    # Cross-tokenizer distillation (distill_mode="uld", issue 4)
    uld_top_k: int | None = field(
        default=64,
        metadata={"help": "ULD: sorted probabilities kept per side at each paired position; None = whole vocabulary."},
    )
    uld_distance: str = field(
        default="wasserstein",
        metadata={
            "help": "ULD: 'wasserstein' (sum of |sorted p - sorted q|) or 'kl' (KL of the renormalized sorted top-k).",
            "choices": ULD_DISTANCES,
        },
    )
    uld_exact_match: bool = field(
        default=False,
        metadata={
            "help": "ULD: match tokens whose surface string is in both vocabularies by identity, the rest sorted."
        },
    )
    # Offline teacher (issue 6)
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Directory of a teacher store (`trl-distill cache-teacher`): train from the teacher's stored top-k "
            "instead of a live teacher. Needs `kd_top_k` <= the store's k and the store's `kd_temperature`."
        },
    )
    teacher_cache_kind: str | None = field(
        default=None,
        metadata={
            "help": "What the teacher store holds: 'topk' (the teacher's top-k; needs kd_top_k) or 'sampled' "
            "(teacher_cache_num_samples draws from the teacher per position: an unbiased forward-KL target; needs "
            "objective='forward_kl' and kd_top_k=None). None: 'topk' if kd_top_k is set, else 'sampled'."
        },
    )
    teacher_cache_num_samples: int = field(
        default=12, metadata={"help": "Draws per position in a sampled teacher store (teacher_cache_kind='sampled')."}
    )
    teacher_cache_seed: int = field(
        default=0, metadata={"help": "Seed of a sampled teacher store's draws (combined with each row's content)."}
    )
    # Feature (hidden-state) KD, issue 5 (see trl_distill/features.py)
    feature_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the hidden-state (feature) KD term added to the token loss; 0 = off."},
    )
    feature_layer_map: list[list[int]] | str | None = field(
        default=None,
        metadata={
            "help": "(student layer, teacher layer) pairs, 0-based, e.g. '0:1,1:3' or [[0, 1], [1, 3]]; default: "
            "evenly spaced pairs ending at the last layers."
        },
    )
    feature_loss: str = field(
        default="relative_mse",
        metadata={
            "help": "'relative_mse' (|s - t|^2 / |t|^2: scale-free, so massive activations do not dominate), "
            "'mse' (mean over hidden dims) or 'cosine' (1 - cos), per position.",
            "choices": FEATURE_LOSSES,
        },
    )
    feature_projection: str = field(
        default="auto",
        metadata={
            "help": "'auto': learned linear map when widths differ, identity otherwise; 'always': learned map per pair.",
            "choices": FEATURE_PROJECTION_MODES,
        },
    )
    # Where the completions come from: sequence-level KD and on-policy distillation (GKD), issue 3
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of optimizer steps on which the student samples the completions (on-policy, GKD); "
            "0 = dataset completions only, 1 = student samples only."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Steps that are not on-policy train on fresh teacher generations for the batch's prompts "
            "instead of the dataset's completions."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of generated completions (student samples; teacher with "
            "teacher_do_sample). Not kd_temperature, which softens the loss."
        },
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus-sampling threshold of generated completions."})
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "Sample among the top_k most likely tokens (None = all). Not kd_top_k, which prunes the loss."
        },
    )
    max_completion_length: int = field(
        default=128, metadata={"help": "Maximum tokens generated per completion (student samples, teacher text)."}
    )
    teacher_do_sample: bool = field(
        default=False, metadata={"help": "Teacher generations sample instead of greedy/beam search."}
    )
    teacher_num_beams: int = field(default=1, metadata={"help": "Beam width of teacher generations (1 = greedy)."})
    teacher_completion_column: str = field(
        default="teacher_completion",
        metadata={
            "help": "distill_mode='sequence': dataset column with the teacher's completions; used when present "
            "(no teacher needed), filled by the teacher otherwise."
        },
    )
    teacher_generation_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where teacher completions are cached; defaults to ~/.cache/trl_distill/teacher_generations (never inside output_dir)."
        },
    )
    teacher_generation_batch_size: int = field(
        default=32, metadata={"help": "Prompts per teacher generate call when caching teacher completions."}
    )
    # Context distillation (distill_mode="context", issue 15): the teacher sees a context the student does not
    teacher_context: list[dict[str, str]] | str | None = field(
        default=None,
        metadata={
            "help": "distill_mode='context': text, or a list of {'role', 'content'} messages, put in front of "
            "each prompt on the teacher's side only (system message / leading turns for conversational rows)."
        },
    )
    self_distillation: bool = field(
        default=False,
        metadata={
            "help": "distill_mode='context': the teacher is the student itself (a frozen copy; for a PEFT "
            "student, its base model with the adapters disabled); no teacher model is given."
        },
    )
    teacher_update_steps: int | None = field(
        default=None,
        metadata={
            "help": "With self_distillation on a full-weight student: copy the student's weights into the "
            "teacher every N optimizer steps; None = the teacher stays the initial student."
        },
    )
    # A served teacher (issue 16, trl_distill/teachers/served.py): a vLLM server scores the teacher's side
    teacher_url: str | None = field(
        default=None,
        metadata={
            "help": "A vLLM (OpenAI-compatible) server serving the teacher, e.g. http://host:8000: scores each "
            "batch live (token mode), or fills `teacher_cache` in `trl-distill cache-teacher`. Needs "
            "`kd_top_k` and `kd_temperature: 1.0`."
        },
    )
    teacher_served_model: str | None = field(
        default=None, metadata={"help": "The served model name; default the first one the server reports."}
    )
    teacher_prompts_per_request: int = field(default=8, metadata={"help": "Rows per request to the teacher server."})
    teacher_max_concurrency: int = field(default=4, metadata={"help": "Requests to the teacher server in flight."})
    teacher_request_timeout: float = field(default=120.0, metadata={"help": "Seconds per request before a retry."})
    teacher_max_retries: int = field(
        default=5, metadata={"help": "Retries (exponential backoff) after timeouts, resets and HTTP 5xx/429."}
    )
    # Release gate (issue 16, trl_distill/gate.py): thresholds a student must meet before `push_to_hub` publishes it
    release_gate: list[str] | str | dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Thresholds on held-out figures, e.g. 'heldout_kl_teacher_student<=0.5,"
            "heldout_top1_agreement>=0.6'; a student that fails is saved but not pushed."
        },
    )
    release_gate_check: str | None = field(
        default=None,
        metadata={
            "help": "Check of the student's greedy held-out answers, 'module:function' (prompts, completions) "
            "-> one bool per answer."
        },
    )
    release_gate_min_pass: float = field(
        default=1.0, metadata={"help": "Fraction of answers `release_gate_check` must pass (in [0, 1])."}
    )
    release_gate_override: str | None = field(
        default=None,
        metadata={"help": "Push a student that failed its release gate anyway, for this reason (recorded)."},
    )
    # MiniLLM (distill_mode="minillm", issue 15): reverse KL over student samples by policy gradient; checked by
    # `MiniLLMMode.validate_config`. Samples also use `max_completion_length`, `temperature`, `top_k`, `top_p`.
    minillm_teacher_mix: float = field(
        default=0.2,
        metadata={
            "help": "MiniLLM: teacher's share alpha of the sampling policy alpha*p + (1-alpha)*q, in [0, 1) "
            "(the paper's 0.2; 0 = pure student samples)."
        },
    )
    minillm_clip: float | None = field(
        default=0.2,
        metadata={"help": "MiniLLM: PPO-style clip range of the long-term term's importance weight; None = no clip."},
    )
    minillm_length_normalize: bool = field(
        default=True,
        metadata={"help": "MiniLLM: the future reward R_{t+1} is the mean of the later rewards, not their sum."},
    )
    minillm_lm_weight: float = field(
        default=0.0,
        metadata={"help": "MiniLLM: weight of the cross-entropy on the dataset's completions added to the loss."},
    )

    def __post_init__(self):
        check_field_types(self, SFTConfig)  # before any comparison: `kd_temperature="2"` must name the field
        if self.bf16 is None:
            self.bf16 = _default_bf16(self)
        super().__post_init__()
        if self.distill_mode not in available_modes():  # the registry is the only place modes are known
            raise ValueError(
                f"`distill_mode` must be one of the registered modes {available_modes()}, got {self.distill_mode!r}. "
                "A mode of your own must be registered (`@trl_distill.register_mode(name)`) before the config is "
                "created."
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}. (Use 'generalized_jsd' with `beta` "
                "for an interpolation between forward and reverse KL.)"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"`beta` must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta}.")
        self._warn_ignored_beta()
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise ValueError(f"`kd_temperature` must be a finite number > 0, got {self.kd_temperature}.")
        if self.kd_temperature < 1.0:
            warnings.warn(
                f"`kd_temperature={self.kd_temperature}` < 1 sharpens both distributions: the student then learns "
                "little about the teacher's non-top tokens (the 'dark knowledge'). Values in [1, 4] are usual; the "
                "default is 2.0.",
                UserWarning,
                stacklevel=3,
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1] (1 = pure KD, 0 = plain SFT), got {self.alpha}.")
        if self.kd_top_k is not None and not positive_int(self.kd_top_k):
            raise ValueError(f"`kd_top_k` must be None (full vocabulary) or an integer >= 1, got {self.kd_top_k!r}.")
        if self.loss_reduction not in REDUCTIONS:
            raise ValueError(f"`loss_reduction` must be one of {REDUCTIONS}, got {self.loss_reduction!r}.")
        if self.kd_chunk_size is not None and not positive_int(self.kd_chunk_size):
            raise ValueError(f"`kd_chunk_size` must be None or a positive integer, got {self.kd_chunk_size!r}.")
        # Offline teacher (issue 6): the store holds top-k targets of padded, unpacked rows.
        self._check_teacher_cache_kind()
        if self.teacher_cache is not None:
            if self.kd_top_k is None and self.teacher_cache_kind == "topk":
                raise ValueError(
                    "`teacher_cache` holds the teacher's top-k only: set `kd_top_k` (at most the store's k), got None."
                )
            for name in ("packing", "padding_free"):
                if getattr(self, name):
                    raise ValueError(
                        f"`{name}=True` cannot be used with `teacher_cache`: stored rows are matched to batch rows by "
                        f"their tokens, which packed or padding-free batches merge. Set `{name}=False`."
                    )
        if self.loss_type != "nll":
            raise ValueError(
                f"`loss_type={self.loss_type!r}` changes SFT's cross-entropy, which `DistillTrainer` replaces with the "
                "distillation loss; leave `loss_type='nll'`."
            )
        # Held-out measurement and receipt (issue 7)
        if self.heldout_max_rows is not None and not positive_int(self.heldout_max_rows):
            raise ValueError(
                f"`heldout_max_rows` must be None (all rows) or a positive integer, got {self.heldout_max_rows!r}."
            )
        if not (isinstance(self.heldout_plateau_patience, int) and self.heldout_plateau_patience >= 0):
            raise ValueError(
                f"`heldout_plateau_patience` must be an integer >= 0 (0 disables the warning), got "
                f"{self.heldout_plateau_patience!r}."
            )
        # Cross-tokenizer distillation (issue 4).
        if self.uld_top_k is not None and not positive_int(self.uld_top_k):
            raise ValueError(
                f"`uld_top_k` must be None (whole vocabulary) or an integer >= 1, got {self.uld_top_k!r}."
            )
        if self.uld_distance not in ULD_DISTANCES:
            raise ValueError(f"`uld_distance` must be one of {ULD_DISTANCES}, got {self.uld_distance!r}.")
        # Feature (hidden-state) KD (issue 5).
        if isinstance(self.feature_weight, bool) or not (
            isinstance(self.feature_weight, (int, float))
            and math.isfinite(self.feature_weight)
            and self.feature_weight >= 0
        ):
            raise ValueError(f"`feature_weight` must be a finite number >= 0 (0 = off), got {self.feature_weight!r}.")
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"`feature_loss` must be one of {FEATURE_LOSSES}, got {self.feature_loss!r}.")
        if self.feature_projection not in FEATURE_PROJECTION_MODES:
            raise ValueError(
                f"`feature_projection` must be one of {FEATURE_PROJECTION_MODES}, got {self.feature_projection!r}."
            )
        self.feature_layer_map = parse_layer_map(self.feature_layer_map)
        if self.feature_weight > 0 and self.teacher_cache is not None:
            raise ValueError(
                f"`feature_weight={self.feature_weight}` needs the teacher's hidden states, which `teacher_cache` does not "
                "store (only its top-k log-probabilities). Set `feature_weight=0` or train with a live teacher."
            )
        if self.feature_weight == 0 and self.feature_layer_map is not None:
            warnings.warn(
                f"`feature_layer_map={self.feature_layer_map}` is ignored because `feature_weight=0`; set "
                "`feature_weight` > 0 to turn feature KD on.",
                UserWarning,
                stacklevel=3,
            )

        # Where the completions come from (issue 3).
        self._check_completion_sources()
        self._check_context_distillation()
        self._check_served_teacher()  # issue 16: live scoring through a vLLM server
        check_gate_settings(self)  # issue 16: a bad threshold or check path fails now, not after training
        # What the mode itself needs (feature term, generated completions, teacher store, its own fields): the mode
        # class owns those checks, so a mode registered by the user validates its settings too.
        get_mode(self.distill_mode).validate_config(self)

    def _check_teacher_cache_kind(self) -> None:
        """A sampled teacher store (issue 16): forward KL over the full vocabulary, estimated from the draws."""
        if self.teacher_cache_kind is None and self.teacher_cache is not None:
            self.teacher_cache_kind = "topk" if self.kd_top_k is not None else "sampled"
        if self.teacher_cache_kind not in (None, "topk", "sampled"):
            raise ValueError(f"`teacher_cache_kind` must be 'topk' or 'sampled', got {self.teacher_cache_kind!r}.")
        if not positive_int(self.teacher_cache_num_samples):
            raise ValueError(
                f"`teacher_cache_num_samples` must be a positive integer, got {self.teacher_cache_num_samples!r}."
            )
        if isinstance(self.teacher_cache_seed, bool) or not isinstance(self.teacher_cache_seed, int):
            raise TypeError(f"`teacher_cache_seed` must be an integer, got {self.teacher_cache_seed!r}.")
        if self.teacher_cache_kind != "sampled" or self.teacher_cache is None:
            return
        if self.kd_top_k is not None:
            raise ValueError(
                f"`kd_top_k={self.kd_top_k}` with `teacher_cache_kind='sampled'`: a sampled store estimates the "
                "full-vocabulary loss, it holds no top-k. Set `kd_top_k=None` (or use `teacher_cache_kind='topk'`)."
            )
        check_sampled_objective(self.objective, self.beta)

    def _check_context_distillation(self) -> None:
        """Context distillation's fields (issue 15) are read by `distill_mode='context'` only; that mode checks their
        values and how they combine with the rest (`ContextDistillMode.validate_config`)."""
        if self.distill_mode == "context":
            return
        for name, unset in (("teacher_context", None), ("self_distillation", False), ("teacher_update_steps", None)):
            if getattr(self, name) != unset:
                raise ValueError(
                    f"`{name}={getattr(self, name)!r}` is read by context distillation only, got `distill_mode="
                    f"{self.distill_mode!r}`. Set `distill_mode='context'` or unset `{name}`."
                )

    def _warn_ignored_beta(self) -> None:
        default = next(f.default for f in dataclasses.fields(self) if f.name == "beta")
        if self.objective != "generalized_jsd" and self.beta != default:
            fixed = " (`jsd` is the generalized JSD at beta = 0.5)" if self.objective == "jsd" else ""
            warnings.warn(
                f"`beta={self.beta}` is ignored with `objective={self.objective!r}`{fixed}: only "
                "`objective='generalized_jsd'` reads it. Set `objective='generalized_jsd'` to use it, or drop `beta`.",
                UserWarning,
                stacklevel=4,
            )

    def _check_served_teacher(self) -> None:
        for name in ("teacher_prompts_per_request", "teacher_max_concurrency"):
            if not positive_int(getattr(self, name)):
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if isinstance(self.teacher_max_retries, bool) or not (
            isinstance(self.teacher_max_retries, int) and self.teacher_max_retries >= 0
        ):
            raise ValueError(f"`teacher_max_retries` must be an integer >= 0, got {self.teacher_max_retries!r}.")
        if not (isinstance(self.teacher_request_timeout, (int, float)) and self.teacher_request_timeout > 0):
            raise ValueError(
                f"`teacher_request_timeout` must be a number of seconds > 0, got {self.teacher_request_timeout!r}."
            )
        if self.teacher_url is None:
            return
        if not (isinstance(self.teacher_url, str) and self.teacher_url.startswith(("http://", "https://"))):
            raise ValueError(
                f"`teacher_url` must be an http(s) URL such as 'http://host:8000', got {self.teacher_url!r}."
            )
        if self.kd_top_k is None:
            raise ValueError(
                "`teacher_url` gives the teacher's top-k log-probabilities only: set `kd_top_k` (at most the server's "
                "`--max-logprobs`, 20 by default), got None."
            )
        if self.kd_temperature != 1.0:
            raise ValueError(
                f"`kd_temperature={self.kd_temperature}` with `teacher_url`: vLLM's prompt log-probabilities are at "
                "temperature 1, and top-k log-probabilities cannot be moved to another temperature (the normalizer "
                "needs the whole vocabulary). Set `kd_temperature=1.0`."
            )
        if self.teacher_cache is not None:
            return  # training reads the store (`trl-distill cache-teacher --teacher_url` fills it)
        if get_mode(self.distill_mode).for_served_teacher() is None:
            raise ValueError(
                f"`teacher_url` scores the teacher's top-k for the token mode's loss; `distill_mode="
                f"{self.distill_mode!r}` needs a teacher of its own. Use `distill_mode='token'`, or fill a store with "
                "`trl-distill cache-teacher --teacher_url ...` where the mode reads one."
            )
        for name in ("packing", "padding_free"):
            if getattr(self, name):
                raise ValueError(
                    f"`{name}=True` cannot be used with `teacher_url`: each row is sent to the server on its own, "
                    f"which packed or padding-free batches merge. Set `{name}=False`."
                )
        if self.feature_weight > 0 or self.seq_kd:
            raise ValueError(
                f"`teacher_url` gives only the teacher's top-k log-probabilities: `feature_weight="
                f"{self.feature_weight}` (hidden states) and `seq_kd={self.seq_kd}` (teacher generations) need a "
                "loaded teacher. Set `feature_weight=0` and `seq_kd=False`."
            )

    def _check_completion_sources(self) -> None:
        if not (isinstance(self.lmbda, (int, float)) and 0.0 <= self.lmbda <= 1.0):
            raise ValueError(
                f"`lmbda` must be in [0, 1] (the fraction of on-policy steps: 0 = never, 1 = always), got {self.lmbda!r}."
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"`temperature` (sampling) must be a finite number > 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1] (1 = no nucleus filtering), got {self.top_p}.")
        if self.top_k is not None and not positive_int(self.top_k):
            raise ValueError(f"`top_k` (sampling) must be None (no limit) or an integer >= 1, got {self.top_k!r}.")
        for name in ("max_completion_length", "teacher_num_beams", "teacher_generation_batch_size"):
            if not positive_int(getattr(self, name)):
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if self.teacher_cache is not None and (self.lmbda > 0 or self.seq_kd):
            raise ValueError(
                f"`teacher_cache` with `lmbda={self.lmbda}` / `seq_kd={self.seq_kd}`: an offline store only holds the "
                "teacher's top-k for the dataset's own completions; there is no teacher to score or write new samples. "
                "Set `lmbda=0` and `seq_kd=False`, or train with a live teacher."
            )
        if self.lmbda > 0 or self.seq_kd:
            if self.packing or self.padding_free:
                raise ValueError(
                    f"`lmbda={self.lmbda}` / `seq_kd={self.seq_kd}` generate completions for each row's prompt, which "
                    "packed or padding-free batches no longer delimit: set `packing=False` and `padding_free=False`."
                )
            if self.completion_only_loss is False:
                raise ValueError(
                    "`completion_only_loss=False` puts the prompt in the loss, so on-policy steps (`lmbda > 0`) and "
                    "`seq_kd=True` cannot tell where the prompt ends: leave `completion_only_loss` at None or True."
                )
        if self.lmbda > 0 and self.alpha < 1.0:
            warnings.warn(
                f"`lmbda={self.lmbda}` with `alpha={self.alpha}`: on on-policy steps the (1 - alpha) cross-entropy "
                "term is taken on the student's own samples, which reinforces them. GKD uses `alpha=1.0`.",
                UserWarning,
                stacklevel=4,
            )
