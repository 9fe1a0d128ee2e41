"""Tiny, fully local models and tokenizers for the demo and the test-suite.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on a corpus you pass in, and the models
are built from a config with a seeded initialisation. Building both takes well under a second, so tests can afford to
build fresh ones.

Loading what [`save_pretrained_pair`] wrote:

- Use [`load_pretrained_pair`] (or `PreTrainedTokenizerFast.from_pretrained(path)` for the tokenizer). It always
  returns the tokenizer exactly as it was trained.
- `AutoTokenizer.from_pretrained(path)` also gives the same ids and length, for both architectures, though for
  qwen2 it returns a `Qwen2Tokenizer`. In a directory whose config says `model_type="qwen2"`, transformers 5 ignores
  the `tokenizer_class` of `tokenizer_config.json` (qwen2 is on its list of models with a wrong class on the Hub) and
  rebuilds the tokenizer as `Qwen2Tokenizer`, which replaces the saved normalizer and pre-tokenizer with Qwen2's and
  adds `<|endoftext|>` as unknown token unless the config says otherwise. Two choices make that harmless: the
  tokenizer is trained with Qwen2's own pipeline (NFC, Qwen2's split regex, byte-level without regex), so the
  rebuilt one splits text identically; and `unk_token` is saved as `null` (as Qwen2.5 does; a byte-level BPE never
  needs it), so no token is added. A Llama directory loads as the generic `TokenizersBackend`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING


if TYPE_CHECKING:  # heavy imports stay lazy so `import trl_distill.demo` is cheap
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 in this order

# Qwen2's pre-tokenization regex (transformers/models/qwen2/tokenization_qwen2.py). Besides keeping qwen2 directories
# safe (see the module docstring), it splits every digit into its own token, which tiny models need to do arithmetic.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# A ChatML-like template written with our three special tokens. Assistant turns are wrapped in
# `{% generation %}...{% endgeneration %}` (end-of-turn token included, so the model learns to stop) for
# `return_assistant_tokens_mask=True`, which TRL's `assistant_only_loss=True` relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|bos|>assistant\n' }}{% generation %}{{ message['content'] + '<|eos|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|bos|>' + message['role'] + '\n' + message['content'] + '<|eos|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|bos|>assistant\n' }}{% endif %}"
)

_ARCHITECTURES = ("llama", "qwen2")


def build_tokenizer(
    corpus: Iterable[str], vocab_size: int = 1000, save_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerFast:
    """
    Train a byte-level BPE tokenizer on `corpus`, wrapped as a `PreTrainedTokenizerFast`.

    The result has `<|pad|>`, `<|bos|>`, `<|eos|>` as ids 0, 1, 2 (set as `pad_token`, `bos_token`, `eos_token`), adds
    no special tokens when encoding (so TRL's prompt/completion tokenization needs no BOS handling), supports
    `return_offsets_mapping=True`, and carries [`CHAT_TEMPLATE`] so `apply_chat_template` and TRL's conversational
    datasets work, `assistant_only_loss=True` included.

    Training is deterministic: the same corpus (in the same order) gives the same vocabulary and ids.

    Args:
        corpus (`Iterable[str]`):
            Training texts. Byte-level BPE stops merging once every word of the corpus is one token, so reaching
            `vocab_size` needs a varied corpus (a few repeated sentences stop at ~400 tokens).
        vocab_size (`int`, *optional*, defaults to `1000`):
            Target vocabulary size, special tokens and the 256 byte tokens included. Must be at least 259.
        save_dir (`str` or `os.PathLike`, *optional*):
            If given, the tokenizer is also saved there with `save_pretrained`.

    Returns:
        `PreTrainedTokenizerFast`: the trained tokenizer. `len(tokenizer)` may be a little below `vocab_size` when
        the corpus runs out of merges.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # 256 byte tokens + 3 special tokens is the smallest vocabulary a byte-level BPE can have.
    min_size = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(
            f"`vocab_size` must be an int >= {min_size} (256 bytes + special tokens), got {vocab_size!r}."
        )
    if isinstance(corpus, str):
        raise TypeError("`corpus` must be an iterable of strings, got a single `str`; wrap it in a list.")
    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("`corpus` is empty: the tokenizer needs text to learn merges from.")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a merge seen once is noise, and keeps the vocabulary stable under small corpus edits
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens, ever
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=512,  # matches `build_tiny_model`'s `max_position_embeddings`
        padding_side="right",
        # Saved as `"unk_token": null`, so a qwen2 directory's `Qwen2Tokenizer` does not add `<|endoftext|>`.
        unk_token=None,
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
    )
    wrapped.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        wrapped.save_pretrained(save_dir)
    return wrapped


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    arch: str = "llama",
    extra_vocab_rows: int = 0,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> PreTrainedModel:
    """
    Build a small randomly initialised causal LM for `tokenizer`.

    Args:
        tokenizer (`PreTrainedTokenizerFast`):
            Gives the vocabulary size and the pad/bos/eos ids (written on both `model.config` and
            `model.generation_config`, which `generate` reads).
        hidden_size (`int`, *optional*, defaults to `64`):
            Model width; must be divisible by `num_heads`.
        num_layers (`int`, *optional*, defaults to `2`):
            Number of decoder layers.
        num_heads (`int`, *optional*, defaults to `4`):
            Attention heads (as many key/value heads: no grouped-query attention).
        intermediate_size (`int`, *optional*):
            MLP width; defaults to `4 * hidden_size`.
        arch (`str`, *optional*, defaults to `"llama"`):
            `"llama"` (`LlamaForCausalLM`) or `"qwen2"` (`Qwen2ForCausalLM`, with biases on q/k/v).
        extra_vocab_rows (`int`, *optional*, defaults to `0`):
            Embedding rows beyond `len(tokenizer)` that no token maps to, as Qwen2.5 checkpoints have (151936 rows for
            151665 tokens). Use it to test code that must ignore the padded logits.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the weight initialisation; the global RNG state is left untouched.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Share the input embedding and the LM head.

    Returns:
        `PreTrainedModel`: the model in float32, train mode, on CPU, with `max_position_embeddings=512`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in _ARCHITECTURES:
        raise ValueError(f"`arch` must be one of {_ARCHITECTURES}, got {arch!r}.")
    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if hidden_size % num_heads:
        raise ValueError(
            f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}); pick e.g. "
            f"`num_heads={max(d for d in range(1, num_heads + 1) if hidden_size % d == 0)}`."
        )
    if not isinstance(extra_vocab_rows, int) or extra_vocab_rows < 0:
        raise ValueError(f"`extra_vocab_rows` must be an int >= 0, got {extra_vocab_rows!r}.")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"The tokenizer has no `{name}`; build it with `build_tokenizer` or set the token first.")

    config_kwargs = dict(
        vocab_size=len(tokenizer) + extra_vocab_rows,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(**config_kwargs)

    # fork_rng: a seeded init that does not reset the caller's global RNG (tests build several models in a row).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.to(torch.float32)

    # `generate` reads these from the generation config, not the model config: without them it warns and pads with
    # the EOS of the model config, which a saved-and-reloaded tiny model may not have.
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_pretrained_pair(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike) -> str:
    """
    Save `model` and `tokenizer` in one directory, loadable offline by `from_pretrained`.

    See the module docstring for why `AutoTokenizer` is safe on these directories, qwen2 included;
    [`load_pretrained_pair`] is the loader that does not depend on it.

    Args:
        model (`PreTrainedModel`): The model to save (safetensors).
        tokenizer (`PreTrainedTokenizerFast`): Its tokenizer; saved with its chat template.
        path (`str` or `os.PathLike`): Target directory, created if missing.

    Returns:
        `str`: the directory path.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_pretrained_pair(path: str | os.PathLike, **model_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """
    Load a model and tokenizer saved by [`save_pretrained_pair`] (or any local directory holding both).

    The tokenizer is loaded with `PreTrainedTokenizerFast.from_pretrained`, which reads `tokenizer.json` as is and
    never swaps in a model-specific tokenizer class.

    Args:
        path (`str` or `os.PathLike`): The directory.
        **model_kwargs: Forwarded to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`).

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerFast]`
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"No `config.json` in {path!r}: not a directory written by `save_pretrained_pair`.")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    return model, tokenizer
