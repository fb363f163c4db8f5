"""LoRA through PEFT: adapters train, the engine sees merged weights, the adapter saves and resumes."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from rl.config import load_config
from rl.train import train
from rl.weights import merged_weights
from rollouts.base import SamplingParams
from rollouts.hf_engine import TransformersEngine


def _config(tmp_path, data, model_dir, name, steps, extra=()):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.source={data}",
            "rewards=[{name: 'tests.toy_rewards:letter_a'}]",
            f"train.steps={steps}",
            "train.prompts_per_step=4",
            "train.micro_batch_size=16",
            "rollout.group_size=8",
            "rollout.max_new_tokens=8",
            "model.lora.r=8",
            "model.lora.alpha=16",
            "optim.lr=3e-2",
            f"run.dir={tmp_path / 'runs'}",
            f"run.name={name}",
            "track.console=quiet",
            "track.dashboard=false",
            "eval.size=0",
            *extra,
        ],
    )


def test_lora_run_raises_reward_and_saves_a_loadable_peft_adapter(tmp_path, toy_data, lively_model_dir):
    run_dir = train(_config(tmp_path, toy_data, lively_model_dir, "lora", steps=12))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert last > first + 0.1, (first, last)

    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(lively_model_dir)
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # the merged model loads on its own
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(ids).logits, merged(ids).logits)  # the adapter did train


def test_merged_weights_are_base_named_and_include_the_lora_update(tiny_model):
    names = set(tiny_model.state_dict())
    peft = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero; make the update non-zero
    expected = layer.base_layer.weight + layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 2.0
    before = layer.base_layer.weight.clone()
    exported = dict(merged_weights(peft))
    assert set(exported) == names
    torch.testing.assert_close(exported["model.layers.0.self_attn.q_proj.weight"], expected)
    assert torch.equal(layer.base_layer.weight, before)  # computed out of place: the trainer's W is untouched


def test_a_lora_sync_holds_about_one_merged_tensor_at_a_time(tiny_model, monkeypatch):
    import gc
    import weakref

    from peft.tuners.lora import Linear as LoraLinear

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base_tensors = len(tiny_model.state_dict())
    peft = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    calls = []
    real = LoraLinear.get_delta_weight
    monkeypatch.setattr(LoraLinear, "get_delta_weight", lambda self, a: calls.append(1) or real(self, a))
    sent, merged_sent, earlier = 0, 0, []
    for name, tensor in merged_weights(peft):  # an engine copies each tensor, then asks for the next
        merged_sent += name.endswith("_proj.weight")
        # lazy: a delta is computed only for the tensor going out now (up front, all 14 came before the first)
        assert len(calls) <= merged_sent, (name, len(calls), merged_sent)
        if name.endswith("_proj.weight"):
            earlier.append(weakref.ref(tensor))
        sent += 1
        del tensor
        gc.collect()
        assert all(r() is None for r in earlier[:-1])  # the sync keeps no tensor it sent before this one
    assert sent == base_tensors and merged_sent == len(calls) == 14


def test_engine_samples_from_the_updated_lora_policy(tiny_model, tokenizer):
    peft = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    engine = TransformersEngine(peft, tokenizer)
    params = SamplingParams(n=1, max_new_tokens=6, temperature=0)
    before = engine.generate([[5, 6, 7]], params)[0][0]
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=2.0)
    engine.update_weights(peft)
    after = engine.generate([[5, 6, 7]], params)[0][0]
    assert after.logprobs != before.logprobs


def test_lora_run_resumes_from_its_adapter_checkpoint(tmp_path, toy_data, tiny_model_dir):
    config = _config(tmp_path, toy_data, tiny_model_dir, "resume", steps=2, extra=["run.checkpoint_every=1"])
    run_dir = train(config)
    assert (run_dir / "checkpoints" / "step-000002" / "model" / "adapter_config.json").is_file()
    longer = _config(tmp_path, toy_data, tiny_model_dir, "resume", steps=3, extra=["run.resume=auto"])
    train(longer)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
