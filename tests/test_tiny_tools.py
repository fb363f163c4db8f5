"""The shipped tools model (rl/tiny/tools_model), its tokenizer, its task and its pretraining data."""

from __future__ import annotations

import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl.models import load_tokenizer
from rl.tiny.pretrain import (
    TASKS,
    TOOLS_OUT,
    PretrainArgs,
    build_tokenizer,
    encode_example,
    make_batch,
    pretrain,
    tag_pattern,
)
from rl.tiny.tools_eval import evaluate_tools
from rl.tiny.tools_task import (
    TOOL_TAGS,
    Problem,
    calculate,
    format_direct,
    format_tool_call,
    format_tool_output,
    format_worked,
    make_problems,
    parse,
)

MODEL_DIR = TOOLS_OUT
MARKERS = ["<calc>", "</calc>", "<out>", "</out>", "<think>", "</think>", "<answer>", "</answer>"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL_DIR)  # AutoTokenizer would swap in Qwen2's, which drops the tags


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()


def test_model_loads_offline_and_is_small(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 10 * 2**20


def test_shipped_tokenizer_is_the_one_pretrain_builds(tokenizer):
    assert tokenizer.get_vocab() == build_tokenizer(TASKS["tools"].tags).get_vocab()
    assert set(TOOL_TAGS) <= set(TASKS["tools"].tags)


@pytest.mark.parametrize(
    "text",
    [
        "12345+6789+54321=",
        format_tool_call("12345+6789+54321="),
        format_direct("12345+6789+54321="),
        "  1 2+ <calc></out><think> </answer>- *=",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_markers_are_single_tokens(tokenizer):
    for marker in MARKERS:
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(marker)) == [marker]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("<calc>1+2</calc><out>3</out>"))
    assert tokens == ["<calc>", "1", "+", "2", "</calc>", "<out>", "3", "</out>"]


def test_tag_pattern_needs_pairs():
    assert tag_pattern(["<think>", "</think>", "<out>", "</out>"]) == r"</?(?:think|out)>|[\s\S]"
    for bad in (["<calc>"], ["<calc>", "</calc>", "</calc>"], ["<Calc>", "</Calc>"]):
        with pytest.raises(ValueError):
            tag_pattern(bad)


def canonical(prompt: str) -> tuple[int, ...]:
    return tuple(sorted(parse(prompt).terms))


def test_train_and_test_never_overlap_across_seeds():
    train = {canonical(row["prompt"]) for seed in range(3) for row in make_problems("train", 5000, seed=seed)}
    test = {canonical(row["prompt"]) for seed in range(3) for row in make_problems("test", 2000, seed=seed)}
    assert len(train) > 14000 and len(test) > 5500
    assert not train & test  # not even a reordering of a test problem is a training problem
    for row in make_problems("test", 300, seed=1):
        assert Problem(tuple(reversed(parse(row["prompt"]).terms))).split == "test"


def test_generator_is_deterministic_and_problems_have_the_shape():
    assert make_problems("train", 200, seed=7) == make_problems("train", 200, seed=7)
    assert make_problems("train", 200, seed=7) != make_problems("train", 200, seed=8)
    rows = make_problems("test", 300, seed=0)
    assert len({row["prompt"] for row in rows}) == 300
    for row in rows:
        terms = parse(row["prompt"]).terms
        assert len(terms) == 3 and all(1000 <= t <= 99999 for t in terms)
        assert row["answer"] == str(sum(terms))
    assert {len(str(t)) for row in rows for t in parse(row["prompt"]).terms} == {4, 5}


def test_formats_and_calculator():
    prompt = "12345+6789+54321="
    assert format_direct(prompt) == "<answer>73455</answer>"
    assert format_tool_call(prompt) == "<calc>12345+6789+54321</calc><out>73455</out><answer>73455</answer>"
    assert format_tool_output(73455) == "<out>73455</out>"
    assert format_worked(prompt) == "<think>12345+6789+54321</think><answer>73455</answer>"
    assert calculate("12345+6789+54321") == 73455 and calculate("7") == 7
    for bad in ("", "12+", "+3", "1-2", "1+2=", "<out>3</out>", "1+2 "):
        assert calculate(bad) is None


def test_tool_output_span_is_not_trained():
    tokenizer = build_tokenizer(TASKS["tools"].tags)
    ids, mask = encode_example(tokenizer, "1+2=", "<calc>1+2</calc><out>3</out><answer>3</answer>")
    prompt, call = ["1", "+", "2", "="], ["<calc>", "1", "+", "2", "</calc>"]
    output, answer = ["<out>", "3", "</out>"], ["<answer>", "3", "</answer>", "<eos>"]
    assert tokenizer.convert_ids_to_tokens(ids) == prompt + call + output + answer
    assert (
        mask == [0] * 4 + [1] * 5 + [0] * 3 + [1] * 4
    )  # the call and the answer are trained, the output not
    _, direct_mask = encode_example(tokenizer, "1+2=", "<answer>3</answer>")
    assert direct_mask == [0, 0, 0, 0, 1, 1, 1, 1]


def test_tools_batches_mask_every_output_span():
    tokenizer = build_tokenizer(TASKS["tools"].tags)
    args = PretrainArgs(task="tools", batch_size=64, p_tool=0.5)
    out_open, out_close = tokenizer.convert_tokens_to_ids(["<out>", "</out>"])
    calls = 0
    for ids, mask in make_batch(random.Random(0), tokenizer, args):  # [b, T], [b, T]
        for row, row_mask in zip(ids.tolist(), mask.tolist(), strict=True):
            if out_open in row:
                calls += 1
                start, end = row.index(out_open), row.index(out_close)
                assert set(row_mask[start : end + 1]) == {0.0}
                assert row_mask[start - 1] == 1.0 and row_mask[end + 1] == 1.0  # </calc> and <answer> trained
    assert 15 < calls < 50


def test_shipped_model_copies_the_calculator_output(tokenizer, model):
    """What RL relies on: after <calc>EXPR</calc><out>N</out>, the model answers N."""
    rows = make_problems("test", 8, seed=3)
    texts = [row["prompt"] + format_tool_call(row["prompt"]).split("<answer>")[0] for row in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    for ids, row in zip(out[:, batch["input_ids"].shape[1] :].tolist(), rows, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert text == f"<answer>{row['answer']}</answer>", text


def test_shipped_model_rarely_calls_and_guesses_wrong_but_its_calls_are_right():
    """The demo's start (docs/tiny-model.md): sampled at T=1 it calls the calculator now and then (0.104 over
    200 problems x 4), its direct answers are wrong, its calls right. Bands, not values: another CPU rounds the
    sampling's float sums differently."""
    result = evaluate_tools(MODEL_DIR, n=50, samples=4, temperature=1.0)
    assert 0.03 <= result["tool_fraction"] <= 0.25, result
    assert result["direct_accuracy"] <= 0.05 and result["tool_accuracy"] >= 0.8, result


def test_evaluate_tools_forced_call_writes_the_prompts_expression():
    result = evaluate_tools(MODEL_DIR, n=8, samples=1, temperature=0.0, prefix="<calc>")
    assert result["tool_fraction"] == 1.0
    assert result["call_exact"] >= 0.75 and result["tool_accuracy"] >= 0.75


def test_pretrain_script_saves_a_tools_model(tmp_path):
    out = pretrain(PretrainArgs(task="tools", out=str(tmp_path / "m"), steps=2, batch_size=8, threads=1))
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert (
        model.config.vocab_size == len(load_tokenizer(out)) == len(TASKS["tools"].tags) + 18
    )  # 3 special, 15 characters
    assert re.search(r"calc", (out / "tokenizer.json").read_text())
