"""Data parallel on accelerate (DDP) and sharded (FSDP2): one step split over 2 CPU ranks (gloo) equals the same
step in one process, and a checkpoint written by sharded ranks resumes in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TOY_PROMPTS

# Every run here trains the same step; uneven micro-batches (3 of 8 per rank) check that rank-local
# accumulation still adds up.
STEP = [
    "rewards=[{name: 'tests.toy_rewards:letter_a'}]",
    "train.steps=1",
    "train.prompts_per_step=4",
    "train.micro_batch_size=3",
    "train.threads=1",
    "rollout.group_size=4",
    "rollout.max_new_tokens=6",
    "optim.lr=1e-2",
    "track.console=plain",
    "track.tensorboard=false",
    "track.dashboard=false",
    "eval.size=0",
]
SAME = ("reward/mean", "rollout/len_mean", "perf/rollout_tokens", "loss/policy", "optim/grad_norm")


class Runs:
    """Launches `aha train` on 1 process or on 2 CPU ranks (torch.distributed.run, gloo); each named run once."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root, self.model_dir, self.done, self.port = root / "runs", model_dir, {}, 29533
        data = root / "prompts.jsonl"
        data.write_text("\n".join(json.dumps({"prompt": p, "answer": "a"}) for p in TOY_PROMPTS))
        self.base = [f"model.path={model_dir}", f"data.source={data}", f"run.dir={self.root}", *STEP]
        self.env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def __call__(self, name: str, *overrides: str, ranks: int = 1) -> Path:
        if name not in self.done:
            launcher = [sys.executable]
            if ranks > 1:
                self.port += 1
                launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
                launcher += ["--master_port", str(self.port)]
            args = [*launcher, "-m", "rl.cli", "train", *self.base, *overrides, f"run.name={name}"]
            done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            self.done[name] = self.root / name
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"), tiny_model_dir)


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path, tol: float = 1e-4) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() < tol, name


def assert_same_step(one: Path, two: Path, base_model: Path) -> None:
    (a,), (b,) = logged(one), logged(two)  # logged once
    # same samples (seeded by global prompt position), same global loss, same clipped gradient
    for key in SAME:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert_same_weights(one / "model", two / "model")
    wa, w0 = load_file(one / "model" / "model.safetensors"), load_file(base_model / "model.safetensors")
    assert any((wa[n] - w0[n]).abs().max() > 1e-4 for n in wa)  # it moved


def test_two_ranks_give_the_same_update_as_one_process(runs, tiny_model_dir):
    assert_same_step(runs("one"), runs("ddp", ranks=2), tiny_model_dir)


def test_two_fsdp_ranks_give_the_same_update_as_one_process(runs, tiny_model_dir):
    assert_same_step(runs("one"), runs("fsdp", "train.sharding=fsdp", ranks=2), tiny_model_dir)


def test_fsdp_checkpoint_is_whole_and_resumes_in_one_process(runs):
    one, fsdp = runs("one"), runs("fsdp", "train.sharding=fsdp", ranks=2)
    ckpt_one, ckpt_fsdp = (r / "checkpoints" / "step-000001" for r in (one, fsdp))
    # rank 0 wrote what a single process writes: whole weights, and the optimizer state in the same layout
    assert_same_weights(ckpt_one / "model", ckpt_fsdp / "model")
    opt_one, opt_fsdp = (torch.load(c / "optimizer.pt", weights_only=True) for c in (ckpt_one, ckpt_fsdp))
    assert opt_fsdp["param_groups"] == opt_one["param_groups"]
    assert opt_fsdp["state"].keys() == opt_one["state"].keys()
    for i, state in opt_one["state"].items():
        for key, value in state.items():
            assert opt_fsdp["state"][i][key].shape == value.shape, (i, key)
            assert (opt_fsdp["state"][i][key] - value).abs().max() < 1e-5, (i, key)

    # the sharded checkpoint continues in one process exactly as the one-process checkpoint does
    second = ("train.steps=2",)
    from_one = runs("one-2", *second, f"run.resume={ckpt_one}")
    from_fsdp = runs("fsdp-2", *second, f"run.resume={ckpt_fsdp}")
    (a,), (b,) = logged(from_one), logged(from_fsdp)
    assert a["step"] == b["step"] == 2
    for key in SAME:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert_same_weights(from_one / "model", from_fsdp / "model")


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(runs):
    ckpt_one = runs("one") / "checkpoints" / "step-000001"
    second = ("train.steps=2", f"run.resume={ckpt_one}")
    from_one = runs("one-2", *second)
    # each rank keeps its shard of the whole saved optimizer state
    sharded = runs("one-2-fsdp", *second, "train.sharding=fsdp", ranks=2)
    (a,), (b,) = logged(from_one), logged(sharded)
    for key in SAME:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert_same_weights(from_one / "model", sharded / "model")


def _vote(rank: int, port: int, failing: int | None, results) -> None:
    """One rank of `test_a_failure_on_one_rank_stops_every_rank_with_its_news`."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    from rl.distributed import Distributed

    dist = Distributed(torch.device("cpu"))
    try:
        with dist.together("starting the rollout engine"):
            if rank == failing:
                raise RuntimeError("vLLM could not start: out of memory")
        results.put((rank, "ok"))
    except Exception as err:
        results.put((rank, f"{type(err).__name__}: {err}"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("failing", [None, 1])
def test_a_failure_on_one_rank_stops_every_rank_with_its_news(failing):
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    port = 29700 + (failing or 0)
    ranks = [context.Process(target=_vote, args=(r, port, failing, results)) for r in range(2)]
    for p in ranks:
        p.start()
    got = dict(results.get(timeout=120) for _ in ranks)
    for p in ranks:
        p.join(timeout=60)
    if failing is None:
        assert got == {0: "ok", 1: "ok"}
    else:  # the failing rank raises its own error; the other learns it at once instead of hanging
        assert got[1] == "RuntimeError: vLLM could not start: out of memory"
        assert (
            got[0]
            == "AhaError: rank 1 failed while starting the rollout engine (its error is in its output); stopping rank 0 too"
        )


class _StubLLM:
    """vLLM's calls that a weight sync makes, without vLLM: `reload_weights` consumes the weights (each one a
    FSDP gather) and may fail after `fail_after` of them; `wake_up` may fail."""

    def __init__(self, fail_after: int | None = None, fail_wake: bool = False) -> None:
        self.fail_after, self.fail_wake = fail_after, fail_wake

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        for i, _ in enumerate(kwargs["weights_iterator"]):
            if i + 1 == self.fail_after:
                raise RuntimeError("injected reload failure")

    def wake_up(self, tags: list[str]) -> None:
        if self.fail_wake:
            raise RuntimeError("injected wake failure")

    def reset_prefix_cache(self) -> None:
        pass


class _StubVLLM:
    """vLLM's start-up as the ranks see it: collectives on the world group (its parallel groups)."""

    class LLM:
        def __init__(self, **kwargs) -> None:
            torch.distributed.all_reduce(torch.ones(1))


def _sync_rank(rank: int, port: int, scenario: str, results) -> None:
    """One FSDP rank of `test_a_sync_or_start_up_failing_on_one_rank_stops_every_rank_without_a_hang`: the
    vLLM engine's own sync and start-up code, on a stand-in for vLLM; rank 1 fails in `scenario`."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    from rl.distributed import Distributed
    from rollouts.vllm_engine import VLLMEngine

    dist = Distributed(torch.device("cpu"), sharding="fsdp")
    torch.manual_seed(0)
    policy = dist.wrap(torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(4))))
    fails = rank == 1
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.__dict__.update(
        llm=_StubLLM(fail_after=2 if fails and scenario == "mid-generator" else None, fail_wake=fails),
        on_cpu=True, local_rank=rank, engine_dtype=torch.bfloat16, _fused={}, _failure=None,
        _asleep=scenario == "wake", _kv_asleep=False, _weights_discarded=False, lora_adapter=False,
    )  # fmt: skip
    try:
        if scenario == "start-up":
            with dist.together("starting the rollout engine"):
                if fails:
                    raise RuntimeError("vLLM is not installed")
                engine._start(_StubVLLM, {"model": "tiny"})
        else:
            with dist.together("syncing the weights into the rollout engine"):
                engine.wake()
                engine.update_weights(policy)
        results.put((rank, "ok"))
    except Exception as err:
        results.put((rank, f"{type(err).__name__}: {err}"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("scenario", ["none", "wake", "mid-generator", "start-up"])
def test_a_sync_or_start_up_failing_on_one_rank_stops_every_rank_without_a_hang(scenario):
    # Rank 1 fails at wake (before any gather), half-way through the weights (after the early vote, with
    # gathers still to come) or before vLLM's start-up collectives; rank 0 must stop with the news, not hang.
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    port = 29720 + ["none", "wake", "mid-generator", "start-up"].index(scenario)
    ranks = [context.Process(target=_sync_rank, args=(r, port, scenario, results)) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in ranks)  # a hang fails here
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    phase = (
        "starting the rollout engine"
        if scenario == "start-up"
        else "syncing the weights into the rollout engine"
    )
    if scenario == "none":
        assert got == {0: "ok", 1: "ok"}
        return
    assert (
        got[0] == f"AhaError: rank 1 failed while {phase} (its error is in its output); stopping rank 0 too"
    )
    expected = {
        "wake": "EngineError: vLLM could not wake up: RuntimeError: injected wake failure",
        "mid-generator": "EngineError: vLLM could not load the new weights: RuntimeError: injected reload",
        "start-up": "RuntimeError: vLLM is not installed",
    }[scenario]
    assert got[1].startswith(expected), got[1]


def _mixed_precision_rank(rank: int, port: int, results) -> None:
    """One rank of `test_fsdp_gathers_in_the_compute_dtype_and_keeps_float32_shards_and_gradients`."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    from torch.distributed.tensor import DTensor

    from rl.distributed import Distributed
    from rl.logprobs import CompletionLogprobs, pack
    from rl.weights import weight_makers
    from tests.conftest import build_model

    dist = Distributed(torch.device("cpu"), sharding="fsdp")
    dist.compute_dtype = torch.bfloat16
    model = build_model(300, initializer_range=0.1)
    whole = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainer = dist.wrap(CompletionLogprobs(model))
    seen = set()
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: seen.add(module.weight.dtype)
    )
    batch = pack([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], pad_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, _ = trainer(batch)
    logprobs.sum().backward()
    grads = {p.grad.dtype for p in model.parameters() if p.grad is not None}
    shards = {type(p).__name__ for p in model.parameters()} | {p.dtype for p in model.parameters()}
    synced = dict((name, make()) for name, make in weight_makers(model, torch.bfloat16))
    same = all(torch.equal(synced[n], whole[n].to(torch.bfloat16)) for n in whole)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    results.put(
        (rank, seen, grads, shards, {t.dtype for t in synced.values()}, same and sharded, logprobs.tolist())
    )
    torch.distributed.destroy_process_group()


def test_fsdp_gathers_in_the_compute_dtype_and_keeps_float32_shards_and_gradients():
    import torch.multiprocessing as mp

    from rl.logprobs import completion_logprobs, pack
    from tests.conftest import build_model

    context = mp.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_mixed_precision_rank, args=(r, 29740, results)) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        got = [results.get(timeout=120) for _ in ranks]
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    model = build_model(300, initializer_range=0.1)  # one process, autocast over float32 weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, _ = completion_logprobs(model, pack([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], 0))
    for _, seen, grads, shards, synced, same, logprobs in got:
        assert seen == {torch.bfloat16}  # the layer ran on weights gathered in bf16
        assert grads == {torch.float32} and shards == {"DTensor", torch.float32}  # float32 shards and grads
        assert synced == {torch.bfloat16} and same  # the sync gathers bf16: the float32 weights, rounded
        torch.testing.assert_close(torch.tensor(logprobs), reference.detach(), atol=2e-2, rtol=0)  # bf16 both
