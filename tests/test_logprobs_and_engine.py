"""The transformers engine and the chunked log-prob computation, on a tiny random Qwen2."""

from __future__ import annotations

import pytest
import torch

from rl.grpo import aggregate_loss, policy_loss
from rl.logprobs import completion_logprobs, pack
from rollouts import SamplingParams, build_engine
from rollouts.hf_engine import TransformersEngine


def _full_logprobs(model, prompts, completions, temperature=1.0):
    """Reference: one sequence at a time, full log-softmax over the vocabulary."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids = torch.tensor([p + c])
        logits = model(ids).logits[0].float() / temperature  # [L, V]
        logp = torch.log_softmax(logits, -1)
        out.append([logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(c)])
    return out


def test_chunked_logprobs_match_full_log_softmax(tiny_model):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    completions = [[20, 21, 22, 23], [24], [25, 26]]
    ref = _full_logprobs(tiny_model, prompts, completions, temperature=0.7)
    with torch.no_grad():
        got, entropy = completion_logprobs(
            tiny_model, pack(prompts, completions, pad_id=0), temperature=0.7, chunk_size=2, with_entropy=True
        )
    for i, row in enumerate(ref):
        torch.testing.assert_close(got[i, : len(row)], torch.tensor(row), atol=1e-5, rtol=0)
        assert torch.all(got[i, len(row) :] == 0)
        assert torch.all(entropy[i, : len(row)] > 0)


def test_chunked_logprobs_gradients_match_unchunked(tiny_model):
    batch = pack([[5, 6], [7, 8, 9]], [[10, 11, 12], [13, 14]], pad_id=0)
    grads = []
    for chunk in (1, 1024):
        tiny_model.zero_grad()
        lp, _ = completion_logprobs(tiny_model, batch, chunk_size=chunk)
        lp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_engine_returns_n_completions_per_prompt_with_trainer_matching_logprobs(tiny_model, tokenizer):
    engine = build_engine("transformers", policy=tiny_model, tokenizer=tokenizer, model_path="unused")
    prompts = [tokenizer("What is 12 + 35?")["input_ids"], tokenizer("aaa")["input_ids"]]
    groups = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=12, temperature=0.8, seed=1))
    assert [len(g) for g in groups] == [3, 3]
    flat_p = [p for p in prompts for _ in range(3)]
    flat_c = [c for g in groups for c in g]
    for c in flat_c:
        assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason == ("length" if len(c.token_ids) == 12 else "stop")
    ref = _full_logprobs(tiny_model, flat_p, [c.token_ids for c in flat_c], temperature=0.8)
    for c, r in zip(flat_c, ref, strict=True):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(r), atol=1e-4, rtol=0)


def test_engine_sampling_is_reproducible_with_a_seed(tiny_model, tokenizer):
    engine = TransformersEngine(tiny_model, tokenizer)
    params = SamplingParams(n=4, max_new_tokens=8, seed=123)
    a = engine.generate([[5, 6, 7]], params)
    b = engine.generate([[5, 6, 7]], params)
    c = engine.generate([[5, 6, 7]], SamplingParams(n=4, max_new_tokens=8, seed=124))
    assert [x.token_ids for x in a[0]] == [x.token_ids for x in b[0]]
    assert [x.token_ids for x in a[0]] != [x.token_ids for x in c[0]]


def test_engine_greedy_is_deterministic_and_left_padding_does_not_change_it(tiny_model, tokenizer):
    engine = TransformersEngine(tiny_model, tokenizer)
    short = [5, 6]
    alone = engine.generate([short], SamplingParams(n=1, max_new_tokens=6, temperature=0))[0][0]
    padded = engine.generate([[9, 9, 9, 9, 9], short], SamplingParams(n=1, max_new_tokens=6, temperature=0))[
        1
    ][0]
    assert alone.token_ids == padded.token_ids


def test_engine_stops_at_stop_string_and_eos(tiny_model, tokenizer):
    # Make the model always emit the token for "a" then eos: bias the LM head.
    a_id = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        tiny_model.get_output_embeddings().weight.zero_()
        tiny_model.get_output_embeddings().weight[a_id] = 0.0
    head_bias = torch.full((tiny_model.config.vocab_size,), -1e4)
    head_bias[a_id] = 0.0
    handle = tiny_model.get_output_embeddings().register_forward_hook(lambda m, i, o: o + head_bias)
    try:
        engine = TransformersEngine(tiny_model, tokenizer)
        out = engine.generate([[5, 6]], SamplingParams(n=2, max_new_tokens=10, stop=("aaa",)))[0]
        for c in out:
            assert c.finish_reason == "stop" and c.text.endswith("aaa") and len(c.token_ids) == 3
        head_bias[a_id] = -1e4
        head_bias[tokenizer.eos_token_id] = 0.0
        out = engine.generate([[5, 6]], SamplingParams(n=1, max_new_tokens=10))[0][0]
        assert out.token_ids == [tokenizer.eos_token_id] and out.finish_reason == "stop" and out.text == ""
    finally:
        handle.remove()


def test_policy_gradient_raises_positive_and_lowers_negative_advantage_tokens(tiny_model):
    batch = pack([[5, 6, 7], [5, 6, 7]], [[30, 31, 32], [40, 41, 42]], pad_id=0)
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.02)  # small: a first-order step
    with torch.no_grad():
        before, _ = completion_logprobs(tiny_model, batch)
    logp, _ = completion_logprobs(tiny_model, batch)
    loss, _, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]))
    aggregate_loss(loss, batch.completion_mask, "token_mean").backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = completion_logprobs(tiny_model, batch)
    assert after[0].sum() > before[0].sum()  # positive advantage: more likely
    assert after[1].sum() < before[1].sum()  # negative advantage: less likely


def test_unknown_engine_is_a_clear_error():
    from rollouts import EngineError

    with pytest.raises(EngineError, match="unknown rollout engine 'vlm'"):
        build_engine("vlm")
