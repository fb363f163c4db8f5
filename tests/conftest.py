"""Shared fixtures: a tiny random Qwen2 model and a BPE tokenizer trained locally on a few lines.

Nothing is downloaded: the tokenizer is trained here and the model is built from a config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps


def assert_close_float32(actual: torch.Tensor, expected: torch.Tensor, roundings: int = 64) -> None:
    """`actual` equals `expected` up to float32 rounding: the same arithmetic summed in another order (another
    batch shape, thread count or CPU) differs by at most about `roundings` x eps x the magnitude of the terms,
    and the largest |value| of the tensor stands for that magnitude. A logic error (a wrong prompt, a dropped
    token) moves values by a fair fraction of that magnitude, far above this bound.

    `roundings` is the budget of roundings that can pile up in one value: 64 covers the sums and chained
    products of a 2-layer model's forward and backward with room to spare (measured: 6 eps in the worst case).
    """
    scale = expected.abs().max().item()
    tolerance = roundings * FLOAT32_EPS * max(scale, torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=roundings * FLOAT32_EPS)


@pytest.fixture(autouse=True)
def _torch_global_state():
    """Tests run in one process: a test (or a run it starts) that sets torch's thread count or deterministic
    mode must not change the arithmetic of the tests after it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def pytest_collection_modifyitems(config, items):
    """AHA_TEST_ORDER=reverse (or shuffle:SEED) runs the tests in another order, to catch tests that depend on
    what ran before them (docs/reliability.md)."""
    order = os.environ.get("AHA_TEST_ORDER", "")
    if order == "reverse":
        items.reverse()
    elif order.startswith("shuffle:"):
        import random

        random.Random(int(order.split(":", 1)[1])).shuffle(items)


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 35? Let me think step by step. 12 + 35 = 47.",
    "<think> reasoning process here </think> <answer> 42 </answer>",
    "aaa bbb ccc abc cab bca aa bb cc a b c",
    "Wait, let me verify: 3 * 4 = 12, so the answer is 12.",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


CHAT_TEMPLATE = (  # a minimal chat template, so recipes with `template: chat` run on the tiny model
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_model(
    vocab_size: int, seed: int = 0, eos_id: int = 1, pad_id: int = 0, initializer_range: float = 0.02
):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=initializer_range,
    )
    return Qwen2ForCausalLM(config)


def save_tiny_model(path: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(
        len(tokenizer), seed, tokenizer.eos_token_id, tokenizer.pad_token_id, initializer_range
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Qwen2 + tokenizer directory (read-only for tests: copy before changing)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def lively_model_dir(tmp_path_factory) -> Path:
    """Like tiny_model_dir with 5x larger initial weights: at the default 0.02 a random 64-wide model's
    layers barely move its output, so low-rank adapters on them need many steps to change what it samples."""
    return save_tiny_model(tmp_path_factory.mktemp("lively-qwen2"), initializer_range=0.1)


REPO = Path(__file__).resolve().parent.parent
TOY_PROMPTS = ["abc", "The", "What is", "cab"]


@pytest.fixture
def toy_data(tmp_path) -> Path:
    """A prompts file for the toy rewards in tests/toy_rewards.py (`tests.toy_rewards:letter_a`)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "answer": "a"}) for p in TOY_PROMPTS))
    return data


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for `python -m rl.cli` subprocesses that can import tests.toy_rewards."""
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return build_model(len(tokenizer), 0, tokenizer.eos_token_id, tokenizer.pad_token_id)
