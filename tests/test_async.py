"""Asynchronous rollouts (rollout.max_staleness >= 1): the engine in its own process samples ahead; the
schedule of versions is fixed, no sequence mixes versions, and a resume after SIGKILL is exact."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl.config import load_config
from rl.train import train
from rl.weights import merged_weights
from rollouts import SamplingParams
from rollouts.process_engine import ProcessEngine
from tests.test_checkpoint import _aha, _metrics, _overrides, _wait_for


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _config(tmp_path: Path, model_dir: Path, name: str, *extra: str):
    return load_config(None, [*_overrides(tmp_path, model_dir, name, steps=5), "track.console=quiet", *extra])


@pytest.mark.parametrize("k", [1, 2])
def test_each_batch_is_sampled_by_the_version_the_schedule_names(tmp_path, toy_data, tiny_model_dir, k):
    run_dir = train(_config(tmp_path, tiny_model_dir, f"k{k}", f"rollout.max_staleness={k}"))
    rows = _rows(run_dir)
    # step s trains on a batch sampled by version max(0, s-1-k): staleness min(s-1, k), never more than k
    assert [r["rollout/staleness_max"] for r in rows] == [float(min(s - 1, k)) for s in range(1, 6)]
    assert [r["rollout/staleness_mean"] for r in rows] == [float(min(s - 1, k)) for s in range(1, 6)]
    assert any(r["policy/ratio_mean"] != 1.0 for r in rows[1:])  # the ratio is taken against the older policy


def test_a_weight_publish_racing_a_generation_never_mixes_versions(tiny_model, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    tiny_model.config.save_pretrained(tmp_path)
    engine = ProcessEngine("transformers", tiny_model, str(tmp_path), merged_weights(tiny_model))
    try:
        params = SamplingParams(n=4, max_new_tokens=24, temperature=1.0, seed=5)
        prompts = [[5, 6, 7], [8, 9]]
        before = engine.generate(prompts, params)
        racing = engine.submit(prompts, params)
        with torch.no_grad():
            for p in tiny_model.parameters():
                p.add_(torch.randn_like(p) * 0.5)  # new weights, published while the generation may run
        engine.publish(merged_weights(tiny_model), 1)
        version, during = engine.collect(racing)
        after_version, after = engine.collect(engine.submit(prompts, params))
    finally:
        engine.close()
    # the racing request came before the publish: wholly version 0, the same tokens as before it
    assert version == 0 and _tokens(during) == _tokens(before)
    assert after_version == 1 and _tokens(after) != _tokens(before)


def _tokens(groups) -> list[list[int]]:
    return [c.token_ids for g in groups for c in g]


def test_dynamic_sampling_evaluation_and_checkpoints_work_with_asynchronous_rollouts(
    tmp_path, toy_data, tiny_model_dir
):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(json.dumps({"prompt": p, "answer": "a"}) for p in ["bca", "aab"]))
    run_dir = train(
        _config(
            tmp_path, tiny_model_dir, "dyn", "rollout.max_staleness=1", "algorithm.dynamic_sampling=true",
            "rewards=[{name: 'tests.toy_rewards:has_a'}]", f"eval.source={held_out}", "eval.split=train",
            "eval.size=2", "eval.every=2", "run.keep_last=0",
        )
    )  # fmt: skip
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert all("eval/reward_mean" in rows[s] for s in (0, 2, 4, 5))
    assert any(r["rollout/sampling_rounds"] > 1 for r in rows[1:])  # extra rounds were sampled
    state = json.loads((run_dir / "checkpoints" / "step-000003" / "state.json").read_text())
    assert [b["step"] for b in state["in_flight"]] == [4, 5]  # sampled ahead, saved with the checkpoint


def test_resume_after_sigkill_reproduces_the_asynchronous_run_exactly(workdir, tiny_model_dir):
    extra = ["rollout.max_staleness=1"]
    straight = _aha(workdir, _overrides(workdir, tiny_model_dir, "straight") + extra)
    assert straight.wait(timeout=300) == 0, straight.communicate()
    killed = _aha(workdir, _overrides(workdir, tiny_model_dir, "killed") + extra)
    _wait_for(workdir / "runs" / "killed" / "checkpoints" / "step-000003" / "manifest.json", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _aha(workdir, _overrides(workdir, tiny_model_dir, "killed") + extra + ["resume=auto"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = workdir / "runs" / "straight", workdir / "runs" / "killed"
    assert [r["step"] for r in _metrics(b)] == [1, 2, 3, 4, 5, 6]
    assert _metrics(a) == _metrics(b)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def workdir(tmp_path, toy_data):
    return tmp_path
