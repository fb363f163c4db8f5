"""The policy update's micro-batching (rl/update.py): the order samples take into micro-batches."""

from __future__ import annotations

import copy

import torch

from rl.config import load_config
from rl.distributed import Distributed
from rl.logprobs import CompletionLogprobs
from rl.trajectory import Trajectory
from rl.update import Trainee, micro_batch_order, update_policy
from tests.conftest import assert_close_float32


def _sample(group: int, prompt: list[int], length: int, advantage: float = 1.0) -> Trajectory:
    completion = [10 + (group * 7 + length + k) % 40 for k in range(length)]
    return Trajectory(group, prompt, completion, [0.0] * length, advantage, True)


def test_micro_batch_order_sorts_by_length_only_when_that_pads_fewer_tokens():
    short_prompts = [_sample(g, [1 + g, 2], n) for g in (0, 1) for n in (1, 9)]
    # As they come: [1, 9] [1, 9] pad to 2 + 2 x 9 tokens each (40); sorted: [1, 1] [9, 9] cost 4 + 2 and 4 + 18.
    assert [len(s.completion_ids) for s in micro_batch_order(short_prompts, 2)] == [1, 1, 9, 9]
    long_prompts = [_sample(g, [1 + g] * 50, n) for g in (0, 1) for n in (1, 2)]
    # As they come: 50 + 2 x 2 per micro-batch (108); sorted, each runs both 50-token prompts (206).
    assert micro_batch_order(long_prompts, 2) == long_prompts


def test_update_is_the_same_whichever_order_micro_batches_take(tiny_model, tokenizer):
    lengths = [3, 11, 2, 9, 12, 1, 7, 4]  # sorting regroups these into micro-batches of 2
    samples = [
        _sample(i // 4, [5 + i // 4, 6, 7], n, advantage=(-1.0) ** i * (1 + i / 8))
        for i, n in enumerate(lengths)
    ]
    assert micro_batch_order(samples, 2) != samples
    results = []
    for micro in (2, len(samples)):  # reordered micro-batches of 2, or one pass over the batch as it is
        policy = copy.deepcopy(tiny_model)
        config = load_config(None, [f"train.micro_batch_size={micro}", "rollout.max_new_tokens=12"])
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        dist = Distributed(torch.device("cpu"))
        trainer = CompletionLogprobs(policy)
        update_policy(
            Trainee(trainer, policy, None, tokenizer.pad_token_id),
            optimizer,
            scheduler,
            samples,
            config,
            dist,
        )
        results.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
    before = torch.cat([p.detach().flatten() for p in tiny_model.parameters()])
    assert (results[0] - before).abs().max() > 1e-3  # the update did something
    assert_close_float32(results[0], results[1])  # the same update, its gradients summed in another order


def test_the_update_leaves_no_gradients_for_the_rollout_that_follows(tiny_model, tokenizer):
    # a colocated vLLM engine wakes into the memory the gradients would hold (rl/gpu_memory.py)
    samples = [_sample(g, [5, 6, 7], n, advantage=a) for g, n, a in ((0, 3, 1.0), (1, 5, -1.0))]
    config = load_config(None, ["algorithm.minibatches=2", "train.prompts_per_step=2"])
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model = Trainee(CompletionLogprobs(tiny_model), tiny_model, None, tokenizer.pad_token_id)
    metrics = update_policy(model, optimizer, scheduler, samples, config, Distributed(torch.device("cpu")))
    assert metrics["optim/updates"] == 2.0
    assert all(p.grad is None for p in tiny_model.parameters())


def test_reference_logprobs_build_no_graph(tiny_model):
    from rl.logprobs import pack
    from rl.update import reference_logprobs

    reference = CompletionLogprobs(copy.deepcopy(tiny_model))
    logprobs = reference_logprobs(tiny_model, reference, pack([[5, 6]], [[7, 8, 9]], 0), 1.0)
    assert not logprobs.requires_grad and logprobs.grad_fn is None
