"""The shipped tiny model, its tokenizer and its synthetic arithmetic data (rl/tiny/)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl.models import load_tokenizer
from rl.tiny.arithmetic import Problem, format_direct, format_reasoning, make_problems, parse, solve
from rl.tiny.pretrain import DEFAULT_OUT, PretrainArgs, build_tokenizer, pretrain

MODEL_DIR = DEFAULT_OUT


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(
        MODEL_DIR
    )  # AutoTokenizer would swap in the Qwen2 pre-tokenizer (rl.models.load_tokenizer)


def test_model_loads_offline_and_answers(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    rows = make_problems("test", 4, seed=0)
    batch = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=80, do_sample=False)
    for ids in out[:, batch["input_ids"].shape[1] :].tolist():
        assert tokenizer.eos_token_id in ids  # the base model stops by itself
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert re.fullmatch(r"(<think>.*</think>)?<answer>\d+</answer>", text), text


def test_model_file_is_small():
    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size < 10 * 2**20


def test_shipped_tokenizer_is_the_one_pretrain_builds(tokenizer):
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


@pytest.mark.parametrize(
    "text",
    [
        "12+35+48+23+67=",
        format_reasoning("12+35+48+23+67="),
        format_direct("12+35+48+23+67="),
        "  1 2+ <think> </answer>- *=",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_tags_are_single_tokens_and_digits_single_characters(tokenizer):
    for tag in ["<think>", "</think>", "<answer>", "</answer>"]:
        assert len(tokenizer.encode(tag)) == 1
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("12+3=")) == ["1", "2", "+", "3", "="]


def canonical(prompt: str) -> tuple[int, ...]:
    return tuple(sorted(parse(prompt).terms))


def test_train_and_test_never_overlap_across_seeds():
    train = {canonical(row["prompt"]) for seed in range(3) for row in make_problems("train", 5000, seed=seed)}
    test = {canonical(row["prompt"]) for seed in range(3) for row in make_problems("test", 2000, seed=seed)}
    assert len(train) > 14000 and len(test) > 5500
    assert not train & test  # not even a reordering of a test problem is a training problem


def test_split_is_a_property_of_the_problem():
    for row in make_problems("test", 500, seed=1):
        problem = parse(row["prompt"])
        assert problem.split == "test"
        assert Problem(tuple(reversed(problem.terms))).split == "test"
    for row in make_problems("train", 500, seed=1):
        assert parse(row["prompt"]).split == "train"


def test_generator_is_deterministic_given_the_seed():
    assert make_problems("train", 200, seed=7) == make_problems("train", 200, seed=7)
    assert make_problems("train", 200, seed=7) != make_problems("train", 200, seed=8)
    rows = make_problems("test", 300, seed=0)
    assert len({row["prompt"] for row in rows}) == 300


def test_both_styles_carry_the_right_answer():
    for row in make_problems("train", 300, seed=0) + make_problems("test", 300, seed=0):
        prompt, answer = row["prompt"], row["answer"]
        assert solve(prompt)[-1][2] == int(answer) == sum(parse(prompt).terms)
        assert format_direct(prompt) == f"<answer>{answer}</answer>"
        reasoning = format_reasoning(prompt)
        think, final = re.fullmatch(r"<think>(.*)</think><answer>(\d+)</answer>", reasoning).groups()
        assert final == answer
        steps = [tuple(map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", s).groups())) for s in think.split(" ")]
        terms = parse(prompt).terms
        assert steps[0][0] == terms[0] and [s[1] for s in steps] == list(terms[1:])
        for (a, b, c), following in zip(steps, steps[1:] + [(int(answer),)], strict=True):
            assert a + b == c and following[0] == c  # each step is right and feeds the next


def test_pretrain_script_saves_a_loadable_model(tmp_path):
    out = pretrain(PretrainArgs(out=str(tmp_path / "m"), steps=2, batch_size=8, threads=1))
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = load_tokenizer(out)
    assert model.config.vocab_size == len(tokenizer)
    assert (out / "model.safetensors").exists() and (out / "generation_config.json").exists()
