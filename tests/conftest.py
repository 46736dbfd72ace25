"""Shared test setup: no network, deterministic seeds, small threads."""

import os

# No hub access in tests: a hub name must fail at once, not retry for ~23 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


TINY_TEXTS = [
    "The movie was great and I loved every minute of it.",
    "The acting was not bad at all, honestly.",
    "What a waste of two hours! The plot was dull.",
    "A slow drama with a gorgeous soundtrack.",
    "I would not watch this film again.",
] * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer GPT-2 with a small BPE tokenizer, saved in save_pretrained layout.

    Built from a local config: no download, a few hundred milliseconds.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_scratch.pretrain import train_tokenizer

    directory = tmp_path_factory.mktemp("tiny_model")
    tokenizer = train_tokenizer(TINY_TEXTS, vocab_size=320, directory=directory)
    special = tokenizer.bos_token_id
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=special, eos_token_id=special, pad_token_id=special,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture()
def tiny_bridge(tiny_model_dir):
    from rlhf_scratch.models import load_bridge

    return load_bridge(tiny_model_dir)


SMALL_PRETRAIN = dict(
    n_texts=3000, n_heldout=200, vocab_size=512, n_layer=2, n_head=2, d_model=64, n_ctx=96,
    steps=250, batch_size=32, lr=5e-3, n_samples=40, install_builtin=False,
)


@pytest.fixture(scope="session")
def small_pretrained(tmp_path_factory):
    """A small model pretrained on the built-in corpus (~10-20 s): ``(out_dir, summary)``."""
    from rlhf_scratch.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("pretrain")
    summary = pretrain(PretrainConfig(out=out, **SMALL_PRETRAIN))
    return out, summary


@pytest.fixture()
def sigint_default():
    """SIGINT handled as in a terminal for the test (``KeyboardInterrupt``), whatever the test runner inherited: a
    suite started in the background (``pytest &``) has SIGINT ignored, and the trainers then rightly leave it alone."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


ARGMAX_ATOL = 1e-4
"""Logits closer than this are a tie for greedy decoding: a KV-cached step and a full forward pass (or two batch
layouts, CPUs, thread counts) round differently, and at such a tie either token is the argmax."""


def greedy_up_to_rounding(logits: torch.Tensor, tokens: torch.Tensor, atol: float = ARGMAX_ATOL) -> torch.Tensor:
    """[..., V] logits, [...] tokens -> [...] bool: the token is the argmax, or within ``atol`` of the maximum."""
    logits = logits.float()
    return logits.gather(-1, tokens[..., None])[..., 0] >= logits.max(-1).values - atol


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ; None if equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


@pytest.fixture(scope="module")
def llama_bridge(tmp_path_factory):
    """A tiny random Llama (tests/model_families.py), loaded once per test module."""
    from model_families import build_family_model

    from rlhf_scratch.models import load_bridge

    return load_bridge(build_family_model("llama", tmp_path_factory.mktemp("llama")))
