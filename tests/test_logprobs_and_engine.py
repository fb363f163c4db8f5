"""The transformers engine and the chunked log-prob computation, on a tiny random Qwen2."""

from __future__ import annotations

import pytest
import torch

from rl.grpo import aggregate_loss, policy_loss
from rl.logprobs import completion_logprobs, pack
from rollouts import SamplingParams, build_engine
from rollouts.hf_engine import TransformersEngine
from tests.conftest import assert_close_float32


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
        assert_close_float32(got[i, : len(row)], torch.tensor(row))
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
    assert_close_float32(grads[0], grads[1])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_logprobs_backward_matches_autograd(temperature):
    from rl.logprobs import HeadLogprobs, entropy_from_logits

    torch.manual_seed(0)
    hidden = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 5, 7])
    upstream = torch.randn(6, dtype=torch.float64)
    logprobs, entropy = HeadLogprobs.apply(hidden, weight, bias, targets, temperature, True)
    fused = torch.autograd.grad((logprobs * upstream).sum(), (hidden, weight, bias))
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature
    reference = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    expected = torch.autograd.grad((reference * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(logprobs, reference.float(), atol=1e-6, rtol=0)  # forward works in float32
    torch.testing.assert_close(entropy, entropy_from_logits(logits).float(), atol=1e-5, rtol=0)
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_completion_logprobs_gradients_match_a_plain_log_softmax(tiny_model):
    prompts, completions = [[5, 6, 7], [8, 9]], [[20, 21, 22], [23, 24]]
    tiny_model.zero_grad()
    reference = _full_logprobs_with_grad(tiny_model, prompts, completions, 0.8)
    sum(r.sum() for r in reference).backward()
    expected = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    batch = pack(prompts, completions, pad_id=0)
    logprobs, _ = completion_logprobs(tiny_model, batch, 0.8, share_prompts=False)
    logprobs.sum().backward()
    for param, want in zip(tiny_model.parameters(), expected, strict=True):
        assert_close_float32(param.grad, want)


def _full_logprobs_with_grad(model, prompts, completions, temperature):
    out = []
    for p, c in zip(prompts, completions, strict=True):
        logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float() / temperature, -1)
        out.append(torch.stack([logp[len(p) - 1 + j, tok] for j, tok in enumerate(c)]))
    return out


@pytest.mark.parametrize(
    "completions", [[[20, 21, 22, 23], [24], [25, 26], [27, 28, 29]], [[20], [21], [22], [23]]]
)
def test_shared_prompts_give_the_full_forwards_logprobs_and_gradients(tokenizer, completions):
    from tests.conftest import build_model

    model = build_model(len(tokenizer), initializer_range=0.1)  # lively weights: prompts matter
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9], [5, 6, 7]]  # two distinct prompts, of different lengths
    batch = pack(prompts, completions, pad_id=0)
    assert batch.prompt_index.tolist() == [0, 0, 1, 0]
    results = []
    for share in (True, False):
        model.zero_grad()
        logprobs, entropy = completion_logprobs(model, batch, 0.7, share_prompts=share, with_entropy=True)
        (logprobs * torch.arange(1.0, 5.0)[:, None]).sum().backward()  # unequal weights per sequence
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((logprobs.detach(), entropy, grads))
    (shared_lp, shared_ent, shared_grad), (full_lp, full_ent, full_grad) = results
    # Same arithmetic over other batch shapes: equal up to float32 rounding of sums taken in another order
    # (a fixed atol of 1e-5 failed on another CPU at 1.19e-5, of gradients up to 30).
    assert_close_float32(shared_lp, full_lp)
    assert_close_float32(shared_ent, full_ent)
    assert_close_float32(shared_grad, full_grad)
    assert full_grad.abs().max() > 0


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
        assert_close_float32(torch.tensor(c.logprobs), torch.tensor(r))


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


def test_checking_for_the_end_every_few_tokens_gives_the_same_completions(tiny_model, tokenizer, monkeypatch):
    import rollouts.hf_engine as H

    with torch.no_grad():  # EOS likely: sequences end at different lengths
        tiny_model.get_output_embeddings().weight[tokenizer.eos_token_id] *= 40
    engine = TransformersEngine(tiny_model, tokenizer)
    params = SamplingParams(n=4, max_new_tokens=40, seed=3)
    every_token = engine.generate([[5, 6, 7], [8, 9]], params)
    monkeypatch.setattr(H, "_check_interval", lambda device, params: 16)  # what a GPU uses
    every_16 = engine.generate([[5, 6, 7], [8, 9]], params)
    flat = [c for g in every_token for c in g]
    assert len({len(c.token_ids) for c in flat}) > 1 and any(c.finish_reason == "stop" for c in flat)
    assert [(c.token_ids, c.finish_reason, c.logprobs) for g in every_16 for c in g] == [
        (c.token_ids, c.finish_reason, c.logprobs) for c in flat
    ]


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


# ------------------------------------------------------------------ the Llama-family decoder and the sampler


def _llama(tokenizer, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
    )
    config = LlamaConfig(**{**settings, **overrides})
    return LlamaForCausalLM(config).eval()


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA on the attention and MLP projections, with non-zero B so that the adapters change the logits."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return lora.eval()


@pytest.mark.parametrize(
    "arch", ["qwen2", "llama", "llama_bias_linear_rope", "llama_dynamic_rope", "llama_mha", "qwen2_lora"]
)
def test_llama_decoder_logits_match_transformers_forward(arch, tokenizer):
    from rollouts.llama_decoder import LlamaDecoder, unsupported_reason
    from tests.conftest import build_model

    model = {
        "qwen2": lambda: build_model(len(tokenizer), initializer_range=0.1).eval(),
        "llama": lambda: _llama(tokenizer),
        "llama_bias_linear_rope": lambda: _llama(
            tokenizer,
            attention_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
        "llama_dynamic_rope": lambda: _llama(  # frequencies that depend on the sequence's length
            tokenizer,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        ),
        "llama_mha": lambda: _llama(tokenizer, num_key_value_heads=4),
        "qwen2_lora": lambda: _lora(build_model(len(tokenizer), initializer_range=0.1)),
    }[arch]()
    assert unsupported_reason(model) is None
    prompts, copies, appended = [[5, 6, 7, 8, 9], [10, 11]], 2, [[20, 21, 22], [23, 24, 25]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        decoder = LlamaDecoder(model, len(prompts) * copies, width + 3)
        got = [decoder.prefill(ids, attention, copies)]
        for column in range(3):
            got.append(decoder.step(torch.tensor([appended[i // copies][column] for i in range(4)])))
        for row in range(len(prompts) * copies):
            p, extra = prompts[row // copies], appended[row // copies]
            reference = model(torch.tensor([p + extra])).logits[0]  # one unpadded sequence, full forward
            for j, logits in enumerate(got):
                assert_close_float32(logits[row], reference[len(p) - 1 + j])


def test_fast_decoding_runs_the_hooks_of_the_modules_it_calls(tokenizer):
    # The decoder calls the model's own projections, norms and MLPs as modules, so forward hooks on them (and
    # global ones) apply as in transformers' forward; hooks on the layers themselves do not run (module
    # docstring): fast_decoding=false is the path for those. A plain LM head is computed as the trainer
    # computes it (`head_logits`, float32 output): a hook of its own sends it through the module instead,
    # global hooks do not see it.
    from torch.nn.modules.module import register_module_forward_hook

    from tests.conftest import build_model

    model = build_model(len(tokenizer), initializer_range=0.1).eval()
    prompts, params = [[5, 6, 7], [8, 9]], SamplingParams(n=2, max_new_tokens=6, temperature=0.8, seed=1)
    plain = TransformersEngine(model, tokenizer).generate(prompts, params)
    seen = []
    handles = [
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: out * 3),
        register_module_forward_hook(lambda module, args, out: seen.append(type(module).__name__)),
    ]
    try:
        fast = TransformersEngine(model, tokenizer).generate(prompts, params)
        fast_seen, seen[:] = list(seen), []
        generic = TransformersEngine(model, tokenizer, fast_decoding=False).generate(prompts, params)
    finally:
        for handle in handles:
            handle.remove()
    fast_flat, generic_flat = [c for g in fast for c in g], [c for g in generic for c in g]
    assert [c.logprobs for c in fast_flat] != [c.logprobs for g in plain for c in g]  # the hook applied
    for a, b in zip(fast_flat, generic_flat, strict=True):
        assert a.token_ids == b.token_ids
        assert_close_float32(torch.tensor(a.logprobs), torch.tensor(b.logprobs))
    linears = 7 * len(model.model.layers)  # per layer q, k, v, o, gate, up, down
    assert fast_seen.count("Linear") >= linears * params.max_new_tokens and "Qwen2RMSNorm" in fast_seen


@pytest.mark.parametrize("fast", [True, False])
def test_fast_decoding_is_switched_by_the_config(fast, tmp_path, monkeypatch):
    import rollouts.hf_engine as H
    from rl.cli import resolve_recipe
    from rl.config import load_config
    from rl.train import train

    built, decoder = [], H.LlamaDecoder
    monkeypatch.setattr(H, "LlamaDecoder", lambda *args: built.append(args) or decoder(*args))
    overrides = [
        f"rollout.transformers.fast_decoding={str(fast).lower()}",
        "train.steps=1",
        "eval.size=0",
        "track.console=quiet",
        "track.tensorboard=false",
        "track.dashboard=false",
        "run.save_model=false",
        f"run.dir={tmp_path}",
    ]
    run_dir = train(load_config(resolve_recipe("default"), overrides))  # the shipped tiny Qwen2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert bool(built) == fast  # false: every rollout through transformers' forward


def test_fast_and_generic_decoding_sample_the_same_tokens(tiny_model, tokenizer):
    prompts = [tokenizer("What is 12 + 35?")["input_ids"], tokenizer("aaa")["input_ids"]]
    params = SamplingParams(n=3, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    fast = TransformersEngine(tiny_model, tokenizer).generate(prompts, params)
    generic = TransformersEngine(tiny_model, tokenizer, fast_decoding=False).generate(prompts, params)
    for a, b in zip((c for g in fast for c in g), (c for g in generic for c in g), strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert_close_float32(torch.tensor(a.logprobs), torch.tensor(b.logprobs))


def test_models_outside_the_llama_family_decode_through_transformers(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rollouts.llama_decoder import unsupported_reason

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    assert "model type 'gpt2'" in unsupported_reason(gpt2)
    sliding = _llama(tokenizer)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert unsupported_reason(sliding) == "sliding-window attention"
    groups = TransformersEngine(gpt2, tokenizer).generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4))
    assert [len(c.token_ids) for c in groups[0]] == [4, 4] or any(
        c.finish_reason == "stop" for c in groups[0]
    )


def test_sampler_draws_tokens_at_their_probabilities_and_never_outside_top_p():
    from rollouts.hf_engine import _sample_next

    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20_000, 5)
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    ids, logp = _sample_next(logits, 1.0, 1.0, generators, 5_000)
    frequencies = torch.bincount(ids, minlength=5).float() / len(ids)
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)  # 4 sigma at 20k draws is under 0.015
    assert frequencies[4] == 0  # probability 0: never drawn
    torch.testing.assert_close(logp, probs.log()[ids])
    ids, _ = _sample_next(logits, 1.0, 0.7, generators, 5_000)  # nucleus: 0.5 + 0.25 reaches 0.7
    assert set(ids.tolist()) == {0, 1}


_GRADIENT_HASH = """
import hashlib, random, sys, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoModelForCausalLM
from rl.logprobs import completion_logprobs, pack
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/rl/tiny/model", dtype=torch.float32)
rng = random.Random(0)
vocab = model.config.vocab_size
prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(8, 14))] for _ in range(16)]
rows = [(prompts[i % 16], [rng.randrange(5, vocab) for _ in range(rng.randint(6, 60))]) for i in range(64)]
logprobs, _ = completion_logprobs(model, pack([p for p, _ in rows], [c for _, c in rows], 0))
logprobs.sum().backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters()])
print(hashlib.md5(grads.numpy().tobytes()).hexdigest())
"""


def test_shared_prompt_gradients_are_the_same_in_every_process_with_two_threads():
    # The shipped tiny model, rows of 16 prompts interleaved: each prompt's keys are indexed to rows far apart
    # (as micro-batches in length order have them). Indexing by tensor[index] made these gradients differ
    # between processes (~1e-9, enough for a run to diverge); index_select sums the repeats in one order.
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    hashes = {
        subprocess.run(
            [sys.executable, "-c", _GRADIENT_HASH, root], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(3)
    }
    assert len(hashes) == 1, hashes
