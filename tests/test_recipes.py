"""Every shipped recipe: documented, sets the knobs of its paper, and runs a step on a tiny stand-in model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.cli import shipped_recipes
from rl.config import load_config
from rl.errors import DataError
from rl.gpu_memory import GPU_GIB, count_params, largest_tensor, plan_memory
from rl.train import train

RECIPES = shipped_recipes()

# Rows in the columns each recipe's data source produces (after preset normalisation).
ROWS = {
    "math": [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+3?", "answer": "5"}],
    "countdown": [
        {"prompt": "Use 3, 5, 2 to make 13.", "answer": "3*5-2", "numbers": [3, 5, 2], "target": 13},
        {"prompt": "Use 4, 6, 1 to make 25.", "answer": "(4*6)+1", "numbers": [4, 6, 1], "target": 25},
    ],
    "code": [
        {"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3"},
        {"prompt": "Write neg(a).", "tests": "assert neg(1) == -1"},
    ],
}


def _kind(config) -> str:
    names = {r.name for r in config.rewards}
    return "code" if "code" in names else "countdown" if "countdown" in names else "math"


def test_every_published_setup_has_a_recipe():
    assert {
        "default",
        "r1zero-qwen2.5-math-1.5b-drgrpo",
        "gsm8k-qwen2.5-0.5b",
        "countdown-qwen2.5-3b",
        "dapo-math",
        "code-python",
        "smollm2-gsm-symbolic",
    } <= set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_starts_with_hardware_time_and_expected_result(name):
    header = "".join(
        line for line in RECIPES[name].read_text().splitlines(keepends=True) if line.startswith("#")
    )
    for word in ("Hardware:", "Time:", "Expected:"):
        assert word in header, f"{name}: the opening comment must say {word}"


def test_dr_grpo_recipe_sets_every_dr_grpo_knob():
    algo = load_config(RECIPES["r1zero-qwen2.5-math-1.5b-drgrpo"]).algorithm
    assert algo.scale == "none"  # no std normalisation
    assert algo.loss_agg == "seq_mean_token_sum_norm"  # constant length normaliser
    assert algo.kl_coef == 0.0


def test_dapo_recipe_sets_every_dapo_knob():
    algo = load_config(RECIPES["dapo-math"]).algorithm
    assert algo.clip_high > algo.clip_low  # clip-higher
    assert algo.loss_agg == "token_mean"  # token-level loss
    assert algo.dynamic_sampling
    assert algo.overlong_buffer > 0
    assert algo.kl_coef == 0.0


def test_tinyzero_recipe_uses_the_r1_zero_template_and_countdown_rewards():
    config = load_config(RECIPES["countdown-qwen2.5-3b"])
    assert config.data.template == "r1_zero"
    assert [r.name for r in config.rewards] == ["countdown", "format"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_one_step_on_a_tiny_stand_in_model(name, tmp_path, tiny_model_dir):
    recipe = load_config(RECIPES[name])
    data, held_out = tmp_path / "data.jsonl", tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS[_kind(recipe)]))
    held_out.write_text(
        "\n".join(json.dumps({**r, "prompt": "Again: " + r["prompt"]}) for r in ROWS[_kind(recipe)])
    )
    config = load_config(
        RECIPES[name],
        [
            f"model.path={tiny_model_dir}",
            "model.dtype=float32",
            f"data.source={data}",
            f"eval.source={held_out}",
            "eval.size=2",
            "eval.split=train",
            "rollout.engine=transformers",
            "rollout.max_new_tokens=8",
            "rollout.group_size=2",
            "train.steps=1",
            "train.prompts_per_step=2",
            "train.micro_batch_size=4",
            "train.device=cpu",
            "algorithm.minibatches=1",
            f"run.dir={tmp_path}",
            "run.checkpoint_every=0",
            "track.console=quiet",
            "track.tensorboard=false",
            "track.dashboard=false",
        ]
        + (["algorithm.overlong_buffer=4"] if recipe.algorithm.overlong_buffer else []),
    )
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and "reward/mean" in rows[-1]


def test_default_recipe_shortened_on_the_shipped_model_logs_eval_and_length(tmp_path):
    config = load_config(
        RECIPES["default"],
        [
            "train.steps=2",
            "eval.size=8",
            f"run.dir={tmp_path}",
            "track.console=quiet",
            "track.tensorboard=false",
        ],
    )
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]  # held-out, before and after
    assert all("rollout/len_mean" in r for r in rows[1:])
    assert (run_dir / "dashboard.png").is_file() and (run_dir / "model" / "model.safetensors").is_file()


def test_held_out_rows_that_are_also_training_rows_are_dropped(tmp_path, tiny_model_dir):
    train_rows = ROWS["math"]
    data, held_out = tmp_path / "data.jsonl", tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in train_rows))
    extra = {"prompt": "What is 7+1?", "answer": "8"}
    held_out.write_text("\n".join(json.dumps(r) for r in [*train_rows, extra]))
    base = [
        f"model.path={tiny_model_dir}",
        f"data.source={data}",
        "train.steps=1",
        "train.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=4",
        f"run.dir={tmp_path}",
        "track.console=quiet",
        "track.tensorboard=false",
        "track.dashboard=false",
        "eval.split=train",
    ]
    from rl.data import PromptSet
    from rl.models import load_tokenizer

    config = load_config(None, [*base, f"eval.source={held_out}"])
    tokenizer = load_tokenizer(tiny_model_dir)
    train_set = PromptSet.load(config.data, tokenizer, source=str(data), split="train")
    eval_set = PromptSet.load(
        config.data, tokenizer, source=str(held_out), split="train", exclude=set(train_set.texts)
    )
    assert [r["prompt"] for r in eval_set.rows] == [extra["prompt"]]
    with pytest.raises(DataError, match="also in the training data"):
        train(load_config(None, [*base, f"eval.source={data}"]))


# ------------------------------------------------------------------------------------- GPU memory arithmetic
MODEL_CONFIGS = Path(__file__).parent / "fixtures" / "model_configs"  # public config.json architecture fields


def _gpu_recipes() -> list[str]:
    return sorted(n for n in RECIPES if (MODEL_CONFIGS / f"{_model(n).replace('/', '--')}.json").is_file())


def _model(name: str) -> str:
    return load_config(RECIPES[name]).model.path


@pytest.mark.parametrize(
    "model, published",
    [("Qwen/Qwen2.5-0.5B", 0.49e9), ("Qwen/Qwen2.5-Math-1.5B", 1.54e9), ("Qwen/Qwen2.5-3B", 3.09e9)],
)
def test_parameter_counts_from_the_config_match_the_published_sizes(model, published):
    hf = json.loads((MODEL_CONFIGS / f"{model.replace('/', '--')}.json").read_text())
    assert count_params(hf) == pytest.approx(published, rel=0.01)


def test_the_countdown_3b_arithmetic_by_hand():
    # 3.086e9 parameters: fp32 weights 11.5 GiB, AdamW 23.0, bf16 reference 5.7, vLLM 0.3 x 79.6 = 23.9
    qwen_3b = dict(
        params=3_085_938_688, gpu_gib=79.6, dtype="float32", reference=True, compute_dtype="bfloat16"
    )
    plan = plan_memory(**qwen_3b, vllm_utilization=0.3, largest=151936 * 2048)
    assert (round(plan.rollout, 1), round(plan.update, 1)) == (64.1, 64.2)
    # update: + gradients 11.5 + the AdamW step's float32 temporary 11.5 (> the bf16 weight copies, 5.7)
    # + what vLLM keeps asleep 1.0; the sync (weights 5.7 + the embedding's copies 1.7) stays below the rollout
    assert (round(plan.gradients, 1), round(plan.adamw_step, 1), round(plan.autocast_copies, 1)) == (
        11.5,
        11.5,
        5.7,
    )
    assert plan.sync < plan.rollout
    # with DDP its buckets (which the gradients are views of) stay through the rollout: 75.6 GiB, over 90%
    ddp = plan_memory(**qwen_3b, vllm_utilization=0.3, ddp=True)
    assert round(ddp.rollout, 1) == 75.6 and not ddp.fits
    # the recipe's 0.24 leaves vLLM 19.1 GiB: 70.8 GiB fits; an fp32 reference (as before) would add 5.7
    assert plan_memory(**qwen_3b, vllm_utilization=0.24, ddp=True).fits
    assert not plan_memory(**{**qwen_3b, "compute_dtype": None}, vllm_utilization=0.24, ddp=True).fits


@pytest.mark.parametrize("name", _gpu_recipes())
def test_gpu_recipe_fits_its_stated_gpu_and_its_header_says_how(name):
    # Every recipe may be launched on several GPUs of its size (accelerate, DDP): the plan counts DDP's buckets.
    config = load_config(RECIPES[name])
    text = RECIPES[name].read_text()
    sizes = [size for size in GPU_GIB if f"{size} GPU" in text or f"{size}+ GPU" in text]
    assert len(sizes) == 1, f"{name}: the Hardware line must name one GPU size of {list(GPU_GIB)}"
    hf = json.loads((MODEL_CONFIGS / f"{config.model.path.replace('/', '--')}.json").read_text())
    vllm = config.rollout.vllm
    plan = plan_memory(
        count_params(hf), GPU_GIB[sizes[0]], config.model.dtype, 0, config.algorithm.kl_coef > 0,
        vllm.gpu_memory_utilization, vllm.sleep_level, config.model.compute_dtype, ddp=True,
        largest=largest_tensor(hf),
    )  # fmt: skip
    assert plan.fits, f"{name} does not fit its {sizes[0]} GPU: {plan.describe()}"
    header = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    assert f"Memory (rl/gpu_memory.py, DDP): {plan.describe()}" in header, name
