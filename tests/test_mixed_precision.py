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


def test_head_logprobs_under_autocast_equal_a_float32_head_reference():
    # The head's inputs are bf16 under autocast, its product and output float32 (issue 26): the fused function
    # equals autograd through a float32 head on the bf16-rounded inputs, not a bf16 product.
    torch.manual_seed(0)
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = (4 * torch.randn(40, 16)).requires_grad_()  # logits of a few tens, as in real models
    targets = torch.tensor([0, 3, 39, 3, 5, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, _ = HeadLogprobs.apply(hidden, weight, None, targets, 1.0, False)
        bf16_output = torch.nn.functional.linear(
            hidden, weight
        ).float()  # today's engines' rounding, for scale
    logits = hidden.bfloat16().float() @ weight.bfloat16().float().t()  # float32 head, bf16 inputs
    reference = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    rounded = torch.log_softmax(bf16_output, -1).gather(-1, targets[:, None]).squeeze(-1)
    fused = torch.autograd.grad(logprobs.sum(), (hidden, weight))
    expected = torch.autograd.grad(reference.sum(), (hidden, weight))
    torch.testing.assert_close(logprobs, reference, atol=1e-5, rtol=0)
    assert (rounded - reference).abs().max() > 100 * (logprobs - reference).abs().max()  # bf16 output: off
    for got, want in zip(fused, expected, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)  # bf16 products in the backward


@pytest.mark.parametrize("setting", ["bfloat16 weights", "float32 weights, bf16 autocast"])
def test_trainer_logprobs_on_a_bfloat16_model_match_a_float64_head(tokenizer, setting):
    # The trainer's log-probs, with and without gradients, against a float64 head on the same bf16 hidden
    # states and bf16-rounded head weights: only float32 rounding separates them. A bf16 head output would be
    # off by about |z| x 2^-9 per logit; the test shows that too, for scale.
    from rl.logprobs import completion_logprobs, pack

    model = build_model(len(tokenizer), initializer_range=0.1)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)  # logits of a few tens
    if setting == "bfloat16 weights":
        model = model.to(torch.bfloat16)
        amp = torch.autocast("cpu", enabled=False)
    else:
        amp = torch.autocast("cpu", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7 + i] for i in range(4)]
    completions = [torch.randint(3, 200, (9,), generator=generator).tolist() for _ in prompts]
    batch = pack(prompts, completions, pad_id=0)
    with amp:
        trained, _ = completion_logprobs(model, batch, share_prompts=False)  # grad on: HeadLogprobs
        with torch.no_grad():
            scored, _ = completion_logprobs(model, batch, share_prompts=False)  # no grad: _chunk
            hidden = model.get_decoder()(input_ids=batch.input_ids).last_hidden_state  # [B, L, H]
            rounded = model.get_output_embeddings()(hidden).float()  # [B, L, V] a bf16 head output
    hidden = hidden.bfloat16()  # the head's input (the final norm returns float32 under autocast)
    weight = model.get_output_embeddings().weight.detach().bfloat16()
    logits = hidden.double() @ weight.double().t()  # [B, L, V] the float64 head
    positions = torch.arange(3 - 1, 3 - 1 + 9)  # every prompt has 3 tokens, every completion 9
    ids = batch.completion_ids[:, :, None]
    reference = torch.log_softmax(logits[:, positions], -1).gather(-1, ids).squeeze(-1)  # [B, T]
    bf16_head = torch.log_softmax(rounded[:, positions].double(), -1).gather(-1, ids).squeeze(-1)
    assert logits.abs().max() > 8  # logits of a realistic size
    for got in (trained.detach(), scored):
        assert (got.double() - reference).abs().max() < 2e-5
    assert (bf16_head - reference).abs().max() > 1e-2  # what the head's bf16 output used to cost


def test_training_under_mixed_precision_samples_and_trains_in_bfloat16(
    tmp_path, lively_model_dir, toy_data, monkeypatch
):
    # Every linear layer's output, through a global forward hook: whether it ran with gradients (the trainer's
    # recomputation) or without (the engine's sampling, and the trainer's no-grad passes), and its dtype. The
    # LM head is not called as a module: both sides compute it with `head_logits` (bf16 inputs, float32
    # output), recorded here with the largest logit. This checks the precision itself, whatever kernels the
    # CPU has.
    import rl.logprobs
    import rollouts.llama_decoder

    linear_calls: set[tuple[bool, torch.dtype]] = set()
    head_calls: set[tuple[bool, torch.dtype]] = set()
    largest_logit = [0.0]

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Linear):
            linear_calls.add((torch.is_grad_enabled(), output.dtype))

    def recorded_head(hidden, weight, bias, compute=None):
        logits = head_logits(hidden, weight, bias, compute)
        head_calls.add((torch.is_grad_enabled(), compute or rl.logprobs._compute_dtype(hidden, weight)))
        largest_logit[0] = max(largest_logit[0], float(logits.detach().abs().max()))
        assert logits.dtype == torch.float32
        return logits

    head_logits = rl.logprobs.head_logits
    monkeypatch.setattr(rl.logprobs, "head_logits", recorded_head)
    monkeypatch.setattr(rollouts.llama_decoder, "head_logits", recorded_head)

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
    # The head: bf16 inputs on both sides (sampling without gradients; the trainer's backward recomputes the
    # logits with gradients off, so only no-grad calls show), float32 output.
    assert head_calls == {(False, torch.bfloat16)}
    # Both sides' heads take bf16 hidden states: where the two bodies round differently (a KV-cached decode
    # step and a whole-sequence pass, in other blocking), each logit differs by at most about one bf16 ulp of
    # the largest, 2^-7 * 2^ceil(log2 max|z|), and a log-softmax moves by at most twice its inputs' largest change.
    # Measured: 4e-8 where bf16 products run on AVX-512/AMX kernels (both sides round alike), 1.3e-3 to 2.1e-3
    # on AVX2-only CPUs (bf16 emulated in float32, other blocking); this bound is 3.1e-2 on this model.
    ulp = 2.0**-7 * 2.0 ** math.ceil(math.log2(largest_logit[0]))
    assert all(0 <= r["rollout/logprob_diff_mean"] <= 2 * ulp for r in rows)
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "float32"  # the master weights are saved


def test_the_reference_model_is_loaded_in_the_compute_dtype(lively_model_dir):
    # Frozen and run under autocast, an fp32 reference would only hold a second fp32 copy (5.7 GiB at 3B).
    from rl.run import _load_models

    for compute, expected in (("bfloat16", torch.bfloat16), (None, torch.float32)):
        config = load_config(
            None,
            [
                f"model.path={lively_model_dir}",
                f"model.compute_dtype={compute or 'null'}",
                "algorithm.kl_coef=0.01",
            ],
        )
        _, policy, reference, _ = _load_models(
            config, torch.device("cpu"), Distributed(torch.device("cpu")), None
        )
        assert {p.dtype for p in policy.parameters()} == {torch.float32}  # the master weights
        assert {p.dtype for p in reference.parameters()} == {expected}
