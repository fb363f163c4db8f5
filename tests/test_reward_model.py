"""The `reward_model` reward on tiny sequence classifiers built here (conftest's tokenizer, a 2-layer Qwen2 with a
classification head; nothing downloaded): batches score what pairs score alone, the text the model reads, labels,
truncation, and the start-up errors."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

from rewards import RewardError, RewardScorer, RewardSpec, get_reward
from rewards.reward_model import load, pair_text, reward_model_reward
from tests.conftest import assert_close_float32, build_tokenizer

PROMPTS = ["What is 12 + 35?", "aaa bbb", "The quick brown fox", "<think>", "Wait, let me verify", "abc", "a"]
COMPLETIONS = [
    "12 + 35 = 47",
    "ccc",
    "jumps over the lazy dog. " * 6,
    "reasoning process here </think> <answer> 42 </answer>",
    "3 * 4 = 12, so the answer is 12.",
    "",
    "b c cab bca",
]


def save_classifier(path: Path, num_labels: int = 1, seed: int = 0) -> str:
    """A tiny Qwen2ForSequenceClassification and its tokenizer (which has a chat template). The config has no
    pad token id, as many hub checkpoints do: the reward sets it from the tokenizer."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=num_labels,
        initializer_range=0.2,
    )
    if num_labels > 1:
        config.id2label = {i: name for i, name in enumerate(["bad", "okay", "good"][:num_labels])}
        config.label2id = {name: i for i, name in config.id2label.items()}
    model = Qwen2ForSequenceClassification(config)
    assert model.config.pad_token_id is None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> str:
    return save_classifier(tmp_path_factory.mktemp("rm"))


def alone(model_dir: str, text: str, last: int | None = None) -> float:
    """The model's logit for one text, computed here without the reward's batching (its last ``last`` tokens)."""
    net, tokenizer = load(model_dir, "cpu")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids  # [1, seq]
    with torch.no_grad():
        return net(input_ids=ids[:, -last:] if last else ids).logits[0, 0].item()


def test_batches_score_what_each_pair_scores_alone(rm_dir):
    one_by_one = reward_model_reward(PROMPTS, COMPLETIONS, model=rm_dir, batch_size=1, device="cpu")
    batched = reward_model_reward(PROMPTS, COMPLETIONS, model=rm_dir, batch_size=3, device="cpu")
    assert all(math.isfinite(s) for s in batched)
    assert len(set(batched)) == len(batched)  # the scores depend on the text
    assert_close_float32(torch.tensor(batched), torch.tensor(one_by_one))


def test_the_model_reads_the_chat_template_of_prompt_and_completion(rm_dir):
    _, tokenizer = load(rm_dir, "cpu")
    text = pair_text(tokenizer, "What is 12 + 35?", "47", None, {})
    assert text == "user: What is 12 + 35?\nassistant: 47\n"  # conftest's template
    chat_prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 35?"},
    ]
    assert pair_text(tokenizer, chat_prompt, "47", None, {}).startswith("system: Be brief.\nuser: What")
    [score] = reward_model_reward(["What is 12 + 35?"], ["47"], model=rm_dir, device="cpu")
    assert score == pytest.approx(alone(rm_dir, text), rel=1e-5, abs=1e-6)


def test_a_template_replaces_the_chat_template_and_reads_columns(rm_dir):
    kwargs = {"model": rm_dir, "device": "cpu", "template": "{prompt} = {completion} ({answer})"}
    [score] = reward_model_reward(["12 + 35"], ["47"], answer=["47"], **kwargs)
    assert score == pytest.approx(alone(rm_dir, "12 + 35 = 47 (47)"), rel=1e-5, abs=1e-6)
    with pytest.raises(RewardError, match=r"names 'gold'.*columns: \['answer'\]"):
        reward_model_reward(["q"], ["a"], answer=["a"], **{**kwargs, "template": "{gold} {completion}"})


def test_a_long_pair_keeps_its_end(rm_dir):
    """Truncation drops the beginning: the model always sees how the completion ends."""
    _, tokenizer = load(rm_dir, "cpu")
    text = pair_text(tokenizer, PROMPTS[2], COMPLETIONS[2], None, {})
    assert len(tokenizer(text).input_ids) > 16
    [score] = reward_model_reward(PROMPTS[2:3], COMPLETIONS[2:3], model=rm_dir, device="cpu", max_length=16)
    assert score == pytest.approx(alone(rm_dir, text, last=16), rel=1e-5, abs=1e-6)


def test_a_classifier_with_labels_scores_the_probability_of_the_named_one(tmp_path):
    model_dir = save_classifier(tmp_path, num_labels=3)
    by_label = [
        reward_model_reward(PROMPTS, COMPLETIONS, model=model_dir, device="cpu", label=label)
        for label in ("bad", "okay", 2)
    ]
    for probs in zip(*by_label, strict=True):
        assert all(0.0 < p < 1.0 for p in probs) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(RewardError, match=r"3 labels .*set label"):
        RewardScorer([RewardSpec("reward_model", kwargs={"model": model_dir, "device": "cpu"})])
    with pytest.raises(RewardError, match=r"label 'great' is not one of"):
        RewardScorer(
            [RewardSpec("reward_model", kwargs={"model": model_dir, "device": "cpu", "label": "great"})]
        )


def test_a_missing_model_is_one_clear_error_at_start(tmp_path):
    missing = str(tmp_path / "no-such-rm")
    with pytest.raises(RewardError, match=r"cannot load '.*no-such-rm' \(no such directory\) as a sequence"):
        RewardScorer([RewardSpec("reward_model", kwargs={"model": missing, "device": "cpu"})])
    with pytest.raises(RewardError, match=r"set model"):
        RewardScorer([RewardSpec("reward_model", kwargs={"device": "cpu"})])


def test_the_scorer_loads_the_model_once_and_scores_through_it(rm_dir):
    spec = RewardSpec("reward_model", kwargs={"model": rm_dir, "device": "cpu", "batch_size": 4})
    scorer = RewardScorer([spec])
    net, _ = load(rm_dir, "cpu")
    result = scorer(PROMPTS, COMPLETIONS, {"answer": ["x"] * len(PROMPTS)})
    assert load(rm_dir, "cpu")[0] is net
    expected = reward_model_reward(PROMPTS, COMPLETIONS, model=rm_dir, device="cpu")
    assert_close_float32(torch.tensor(result.per_function["reward_model"]), torch.tensor(expected))


def test_the_reward_model_is_registered_and_picklable():
    assert get_reward("reward_model") is reward_model_reward
    assert pickle.loads(pickle.dumps(reward_model_reward)) is reward_model_reward
