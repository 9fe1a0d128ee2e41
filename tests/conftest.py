"""Shared fixtures: tiny local tokenizers and models (the demo's own builders), and small datasets."""

import os


# No Hub here or in CI: fail fast instead of retrying downloads, and send no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from trl_distill.demo.task import make_task_dataset, task_corpus  # noqa: E402
from trl_distill.demo.tiny import build_tiny_model, build_tokenizer  # noqa: E402


torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(task_corpus(seed=0, n=1500), vocab_size=1000)


@pytest.fixture(scope="session")
def other_tokenizer():
    """A genuinely different vocabulary (trained on other text, smaller)."""
    corpus = [" ".join(f"w{i * j % 97} item{j}" for j in range(30)) for i in range(200)]
    return build_tokenizer(corpus, vocab_size=400)


@pytest.fixture
def make_student(tokenizer):
    def build(**kwargs):
        kwargs = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "seed": 1, **kwargs}
        return build_tiny_model(tokenizer, **kwargs)

    return build


@pytest.fixture
def make_teacher(tokenizer):
    def build(**kwargs):
        kwargs = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "seed": 2, **kwargs}
        return build_tiny_model(tokenizer, **kwargs)

    return build


@pytest.fixture(scope="session")
def prompt_completion_dataset():
    return make_task_dataset(24, seed=0, split="train")


@pytest.fixture(scope="session")
def eval_dataset():
    return make_task_dataset(8, seed=0, split="test")
