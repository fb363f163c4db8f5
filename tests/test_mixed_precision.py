"""Mixed precision (`model.compute_dtype: bfloat16` over float32 weights) against pure bfloat16 training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rl.config import ConfigError, load_config
from rl.distributed import Distributed
from rl.logprobs import CompletionLogprobs, HeadLogprobs
from rl.models import prepare_for_training
from rl.train import train
from rl.trajectory import Trajectory
from rl.update import Trainee, update_policy
from tests.conftest import build_model


def _one_update(
    tokenizer, dtype: str, compute_dtype: str | None, lora: int = 0
) -> tuple[float, torch.nn.Module]:
    """Fraction of the trainable weights one AdamW step at lr 1e-6 changes, and the updated model."""
    overrides = [
        f"model.dtype={dtype}",
        "optim.lr=1e-6",
        "train.micro_batch_size=8",
        "rollout.max_new_tokens=6",
    ]
    overrides += [f"model.compute_dtype={compute_dtype or 'null'}", f"model.lora.r={lora}"]
    config = load_config(None, overrides)
    model = prepare_for_training(build_model(len(tokenizer)).to(getattr(torch, dtype)), config.model)
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=config.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    generator = torch.Generator().manual_seed(0)
    samples = [
        Trajectory(
            g,
            [5, 6, 7 + g],
            torch.randint(3, 200, (6,), generator=generator).tolist(),
            [0.0] * 6,
            (-1.0) ** k,
            True,
        )
        for g in range(2)
        for k in range(4)
    ]
    update_policy(
        Trainee(CompletionLogprobs(model), model, None, 0),
        optimizer,
        scheduler,
        samples,
        config,
        Distributed(torch.device("cpu")),
    )
    moved = [p.detach() != b for p, b in zip(trained, before, strict=True)]
    if lora:  # lora_B starts at zero, so lora_A gets no gradient in the first step: count lora_B
        moved = [p.detach() != 0 for name, p in model.named_parameters() if "lora_B" in name]
    return sum(int(m.sum()) for m in moved) / sum(m.numel() for m in moved), model


def test_mixed_precision_keeps_small_updates_that_pure_bfloat16_loses(tokenizer):
    mixed, model = _one_update(tokenizer, "float32", "bfloat16")
    pure, _ = _one_update(tokenizer, "bfloat16", None)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    assert mixed > 0.95  # every weight with a gradient moves by about lr
    assert pure < 0.2  # most 1e-6 steps round back to the same bfloat16 number


def test_lora_over_a_bfloat16_base_trains_float32_adapters_under_autocast(tokenizer):
    fraction, model = _one_update(tokenizer, "bfloat16", "bfloat16", lora=4)
    adapters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name and p.dtype == torch.float32 for name, p in adapters.items())
    assert fraction > 0.95  # every lora_B entry left zero after a 1e-6 step: nothing rounded away


def test_compute_dtype_needs_float32_master_weights():
    with pytest.raises(ConfigError, match="set model.dtype=float32"):
        load_config(None, ["model.dtype=bfloat16", "model.compute_dtype=bfloat16"])
    load_config(
        None, ["model.dtype=bfloat16", "model.compute_dtype=bfloat16", "model.lora.r=8"]
    )  # frozen base
    with pytest.raises(ConfigError, match="expected .bfloat16. or NoneType, got .float16."):
        load_config(None, ["model.compute_dtype=float16"])  # would need loss scaling


def test_head_logprobs_under_autocast_match_autograd_under_autocast():
    torch.manual_seed(0)
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.tensor([0, 3, 39, 3, 5, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, _ = HeadLogprobs.apply(hidden, weight, None, targets, 1.0, False)
        reference = torch.log_softmax(torch.nn.functional.linear(hidden, weight).float(), -1)
        reference = reference.gather(-1, targets[:, None]).squeeze(-1)
    fused = torch.autograd.grad(logprobs.sum(), (hidden, weight))
    expected = torch.autograd.grad(reference.sum(), (hidden, weight))
    torch.testing.assert_close(logprobs, reference, atol=1e-5, rtol=0)  # both bf16 products
    for got, want in zip(fused, expected, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)  # bf16 products in the backward


def test_training_under_mixed_precision_samples_and_trains_in_bfloat16(tmp_path, lively_model_dir, toy_data):
    # Every linear layer's output, through a global forward hook: whether it ran with gradients (the trainer's
    # recomputation) or without (the engine's sampling, and the trainer's no-grad passes), its dtype, and the
    # largest LM-head logit. This checks the precision itself, whatever kernels the CPU has.
    linear_calls: set[tuple[bool, torch.dtype]] = set()
    largest_logit = [0.0]

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Linear):
            linear_calls.add((torch.is_grad_enabled(), output.dtype))
            if module.out_features > 200:  # the LM head (vocabulary-wide)
                largest_logit[0] = max(largest_logit[0], float(output.detach().abs().max()))

    config = load_config(
        None,
        [
            f"model.path={lively_model_dir}",
            "model.compute_dtype=bfloat16",
            f"data.source={toy_data}",
            "rollout.group_size=4",
            "rollout.max_new_tokens=8",
            "train.steps=2",
            "train.prompts_per_step=2",
            "train.device=cpu",
            "eval.size=0",
            "rewards=[{name: 'tests.toy_rewards:letter_a'}]",
            f"run.dir={tmp_path}",
            "track.console=quiet",
            "track.tensorboard=false",
            "track.dashboard=false",
        ],
    )
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_dir = train(config)
    finally:
        handle.remove()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # The engine sampled under bf16 autocast (no-grad calls) and the trainer recomputed under it (grad calls):
    # every linear layer returned bf16, in both. Sampling in float32 would show float32 no-grad calls here.
    assert linear_calls == {(False, torch.bfloat16), (True, torch.bfloat16)}
    # Both sides' logits are bf16 numbers: where the two round differently (a KV-cached decode step and a
    # whole-sequence pass, in other blocking), each logit differs by at most about one bf16 ulp of the
    # largest, 2^-7 * 2^ceil(log2 max|z|), and a log-softmax moves by at most twice its inputs' largest change.
    # Measured: 4e-8 where bf16 products run on AVX-512/AMX kernels (both sides round alike), 1.3e-3 to 2.1e-3
    # on AVX2-only CPUs (bf16 emulated in float32, other blocking); this bound is 3.1e-2 on this model.
    ulp = 2.0**-7 * 2.0 ** math.ceil(math.log2(largest_logit[0]))
    assert all(0 <= r["rollout/logprob_diff_mean"] <= 2 * ulp for r in rows)
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "float32"  # the master weights are saved
