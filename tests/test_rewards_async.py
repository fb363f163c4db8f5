"""Asynchronous, concurrent, time-bounded reward calls: async rewards, threads, groups vs the batch, timeouts,
on_error none, and the alarm for a reward that fails every call."""

import asyncio
import functools
import threading
import time
import uuid

import pytest

from rewards import RewardError, RewardScorer, RewardSpec, batch_reward, register_reward, registry
from rewards.math import get_pool
from rl.config import load_config
from rl.tracking import Alarms

PROMPTS = ["p0", "p0", "p1", "p1", "p2", "p2"]
COMPLETIONS = ["a", "bb", "a", "ccc", "bb", "a"]
ANSWERS = ["a", "a", "ccc", "ccc", "bb", "x"]
GROUPS = [slice(0, 2), slice(2, 4), slice(4, 6)]
RELEASE = threading.Event()  # lets hung calls end when the module's tests are done


@pytest.fixture(autouse=True, scope="module")
def _release_hung_calls():
    yield
    RELEASE.set()


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """Each test's registrations end with it (the registry is process-wide)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _register(fn, accuracy=False) -> str:
    """Register `fn` under a fresh name (the registry refuses a name twice) and return the name."""
    name = f"async_test_{getattr(fn, '__name__', type(fn).__name__)}_{uuid.uuid4().hex[:8]}"
    register_reward(name, accuracy=accuracy)(fn)
    return name


def _both_at_once(barrier: threading.Barrier):
    """A plain and an async reward that each wait at `barrier`: they finish only if they run at once."""

    def plain(prompts, completions, **columns):
        barrier.wait()  # a BrokenBarrierError after its timeout if the other never comes
        return [1.0] * len(completions)

    async def coroutine(prompts, completions, **columns):
        await asyncio.to_thread(barrier.wait)
        return [2.0] * len(completions)

    return plain, coroutine


def _exact(prompts, completions, answer, **columns):
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


async def _length(prompts, completions, **columns):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


def _group(i: int) -> tuple[list, list, dict]:
    part = GROUPS[i]
    return PROMPTS[part], COMPLETIONS[part], {"answer": ANSWERS[part]}


def _without_perf(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


@pytest.mark.parametrize("kinds", [("plain", "coroutine"), ("plain", "plain"), ("coroutine", "coroutine")])
def test_rewards_of_a_step_run_at_the_same_time(kinds):
    barrier = threading.Barrier(2, timeout=10)
    fns = dict(zip(("plain", "coroutine"), _both_at_once(barrier), strict=True))
    first = _register(fns[kinds[0]])
    second = _register(functools.partial(fns[kinds[1]]))  # the same through a partial
    with RewardScorer([RewardSpec(first), RewardSpec(second)]) as scorer:
        result = scorer(PROMPTS, COMPLETIONS, {})
    assert not barrier.broken
    assert result.per_function[first] == [1.0 if kinds[0] == "plain" else 2.0] * 6


def test_a_group_is_scored_while_the_rest_of_the_batch_is_generated():
    scored = []

    async def per_group(prompts, completions, **columns):
        scored.append(prompts[0])
        return [1.0] * len(completions)

    name = _register(per_group)

    async def rollout(scorer):
        tasks = []
        for i in range(len(GROUPS)):
            prompts, completions, columns = _group(i)  # group i is complete: score it, generate the next
            tasks.append(
                asyncio.create_task(scorer.score_async(prompts, completions, columns, scope="group"))
            )
            await asyncio.wait_for(_until(lambda n=i + 1: len(scored) == n), timeout=10)
        batch = await scorer.score_async(PROMPTS, COMPLETIONS, {"answer": ANSWERS}, scope="batch")
        return scorer.combine([await t for t in tasks], batch)

    with RewardScorer([RewardSpec(name)]) as scorer:
        result = asyncio.run(rollout(scorer))
    assert scored == ["p0", "p1", "p2"] and result.total == [1.0] * 6


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def test_a_batch_level_reward_gets_the_whole_batch_once_and_per_group_rewards_each_group():
    calls: dict[str, list[list[str]]] = {"group": [], "marked": [], "spec": []}

    def per_group(prompts, completions, **columns):
        calls["group"].append(list(prompts))
        return [1.0] * len(completions)

    @batch_reward
    def marked(prompts, completions, **columns):
        calls["marked"].append(list(prompts))
        return [0.5] * len(completions)

    def by_spec(prompts, completions, **columns):
        calls["spec"].append(list(prompts))
        return [0.25] * len(completions)

    specs = [
        RewardSpec(_register(per_group)),
        RewardSpec(_register(marked)),
        RewardSpec(_register(by_spec), batch=True),
    ]
    with RewardScorer(specs) as scorer:
        assert scorer.batch_level == {specs[1].name, specs[2].name}
        groups = [scorer(*_group(i), scope="group") for i in range(len(GROUPS))]
        batch = scorer(PROMPTS, COMPLETIONS, {"answer": ANSWERS}, scope="batch")
        result = scorer.combine(groups, batch)
    assert calls["group"] == [["p0", "p0"], ["p1", "p1"], ["p2", "p2"]]
    assert calls["marked"] == calls["spec"] == [PROMPTS]
    assert set(groups[0].per_function) == {specs[0].name} and set(batch.per_function) == {
        specs[1].name,
        specs[2].name,
    }
    assert result.total == [1.75] * 6


def test_combining_groups_and_the_batch_level_rewards_equals_scoring_the_whole_batch():
    exact = _register(_exact, accuracy=True)
    length = _register(_length)
    specs = [RewardSpec(exact), RewardSpec(length, weight=0.1, batch=True), RewardSpec("format", weight=0.5)]
    with RewardScorer(specs) as scorer:
        whole = scorer(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
        groups = [scorer(*_group(i), scope="group") for i in range(len(GROUPS))]
        combined = scorer.combine(groups, scorer(PROMPTS, COMPLETIONS, {"answer": ANSWERS}, scope="batch"))
    assert combined.total == whole.total == [1.1, 0.2, 0.1, 1.3, 1.2, 0.1]
    assert combined.per_function == whole.per_function
    assert combined.correct == whole.correct == [True, False, False, True, True, False]
    assert _without_perf(combined.metrics) == _without_perf(whole.metrics)
    assert set(combined.metrics) == set(whole.metrics) and combined.errors == whole.errors == {}


def test_combine_refuses_results_that_miss_a_reward():
    specs = [RewardSpec(_register(_exact)), RewardSpec(_register(_length), batch=True)]
    with RewardScorer(specs) as scorer:
        groups = [scorer(*_group(i), scope="group") for i in range(len(GROUPS))]
        with pytest.raises(RewardError, match="missing from the batch-level result"):
            scorer.combine(groups)


@pytest.mark.parametrize("kind", ["plain", "coroutine"])
def test_a_call_past_its_timeout_scores_none_is_counted_and_does_not_hold_up_the_step(kind):
    def plain(prompts, completions, **columns):
        if "p1" in prompts:
            RELEASE.wait(60)  # hangs; its thread cannot be killed
        return [1.0] * len(completions)

    async def coroutine(prompts, completions, **columns):
        if "p1" in prompts:
            await asyncio.sleep(60)  # cancelled at the timeout
        return [1.0] * len(completions)

    name = _register({"plain": plain, "coroutine": coroutine}[kind])
    with RewardScorer([RewardSpec(name, timeout_s=0.2)]) as scorer:
        start = time.monotonic()
        result = scorer.combine([scorer(*_group(i), scope="group") for i in range(len(GROUPS))])
        seconds = time.monotonic() - start
    assert seconds < 10  # not the 60 s the hung call would take
    assert result.per_function[name] == [1.0, 1.0, None, None, 1.0, 1.0]
    assert result.metrics[f"reward/{name}/timeout_frac"] == pytest.approx(2 / 6)
    assert result.metrics[f"reward/{name}/error_frac"] == 0.0
    assert result.metrics[f"reward/{name}/none_frac"] == pytest.approx(2 / 6)
    assert result.errors == {name: "TimeoutError after 0.2 s"}


def test_on_error_none_leaves_the_failing_calls_samples_unscored_and_counts_them():
    def fails_on_p1(prompts, completions, **columns):
        if "p1" in prompts:
            raise ValueError("the judge said 503")
        return [1.0] * len(completions)

    name = _register(fails_on_p1)
    with RewardScorer([RewardSpec(name, on_error="none"), RewardSpec("format")]) as scorer:
        result = scorer.combine([scorer(*_group(i), scope="group") for i in range(len(GROUPS))])
    assert result.per_function[name] == [1.0, 1.0, None, None, 1.0, 1.0]
    assert result.per_function["format"] == [0.0] * 6  # the other reward is untouched
    assert result.metrics[f"reward/{name}/error_frac"] == pytest.approx(2 / 6)
    assert result.metrics[f"reward/{name}/errors"] == 2.0
    assert result.metrics[f"reward/{name}/timeout_frac"] == 0.0
    assert result.errors == {name: "ValueError: the judge said 503"}


def test_a_reward_that_fails_every_call_raises_the_alarm_naming_it_and_its_first_error():
    def always_fails(prompts, completions, **columns):
        raise ConnectionError(f"no route to the judge for {prompts[0]}")

    name = _register(always_fails)
    with RewardScorer([RewardSpec(name, on_error="none"), RewardSpec("format")]) as scorer:
        result = scorer.combine([scorer(*_group(i), scope="group") for i in range(len(GROUPS))])
    alarms = Alarms(max_new_tokens=64)
    row = {"step": 3, "reward/unscored_frac": 0.0, **result.metrics}
    (message,) = alarms.check(row, result.errors)
    assert f"reward {name} failed every call of step 3" in message
    assert "ConnectionError: no route to the judge for p0" in message  # the first error, in batch order
    assert row["alarm/reward_failed"] == 1.0 and "alarm/unscored" not in row
    again = {"step": 4, **result.metrics}
    assert alarms.check(again, result.errors) == [] and again["alarm/reward_failed"] == 1.0  # said once


def test_a_reward_that_times_out_on_every_call_raises_the_alarm_too():
    async def hangs(prompts, completions, **columns):
        await asyncio.sleep(60)

    name = _register(hangs)
    with RewardScorer([RewardSpec(name, timeout_s=0.05)]) as scorer:
        result = scorer(PROMPTS, COMPLETIONS, {})
    row = {"step": 1, **result.metrics}
    (message,) = Alarms(max_new_tokens=64).check(row, result.errors)
    assert "0% raised, 100% timed out" in message and "TimeoutError after 0.05 s" in message


def test_by_default_a_failure_still_fails_the_step_and_no_failure_fractions_are_logged():
    def fails(prompts, completions, **columns):
        raise ValueError("bad")

    async def fine(prompts, completions, **columns):
        return [1.0] * len(completions)

    failing, ok = _register(fails), _register(fine)
    with RewardScorer([RewardSpec(ok)]) as scorer:
        result = scorer(PROMPTS, COMPLETIONS, {})
    assert sorted(k.removeprefix(f"reward/{ok}/") for k in _without_perf(result.metrics)) == [
        "errors",
        "mean",
        "none_frac",
        "std",
    ]
    with (
        RewardScorer([RewardSpec(failing)]) as scorer,
        pytest.raises(RewardError, match="raised ValueError: bad on sample 0 of 6"),
    ):
        scorer(PROMPTS, COMPLETIONS, {})


def test_the_synchronous_call_works_inside_a_running_event_loop():
    name = _register(_length)

    async def caller():
        with RewardScorer([RewardSpec(name)]) as scorer:
            return scorer(PROMPTS, COMPLETIONS, {})

    assert asyncio.run(caller()).total == [1.0, 2.0, 1.0, 3.0, 2.0, 1.0]


def test_async_callables_and_partials_are_awaited():
    class Judge:
        async def __call__(self, prompts, completions, *, bonus=0.0, **columns):
            return [1.0 + bonus] * len(completions)

    name = _register(Judge())
    with RewardScorer([RewardSpec(name, kwargs={"bonus": 0.5})]) as scorer:
        assert scorer(PROMPTS, COMPLETIONS, {}).total == [1.5] * 6


def test_a_plain_function_that_returns_a_coroutine_is_told_to_be_async():
    def wrapper(prompts, completions, **columns):
        return _length(prompts, completions)

    with (
        RewardScorer([RewardSpec(_register(wrapper))]) as scorer,
        pytest.raises(RewardError, match="async def"),
    ):
        scorer(PROMPTS, COMPLETIONS, {})


def test_a_recipe_sets_timeout_on_error_none_and_batch():
    config = load_config(None, ["rewards=[{name: format, timeout_s: 5, on_error: none, batch: true}]"])
    assert config.rewards == [RewardSpec("format", on_error="none", timeout_s=5.0, batch=True)]


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), True, "5"])
def test_a_bad_timeout_fails_when_the_scorer_is_built(timeout):
    with pytest.raises(RewardError, match="timeout_s must be a positive number"):
        RewardScorer([RewardSpec("format", timeout_s=timeout)])


def test_worker_processes_a_plain_reward_starts_outlive_its_call():
    """math's verifier workers die with the thread that started them (PR_SET_PDEATHSIG): calls must not run on
    threads that exit after them."""
    with RewardScorer([RewardSpec("math", kwargs={"workers": 1})]) as scorer:
        assert scorer(["q"], ["\\boxed{\\frac{1}{2}}"], {"answer": ["0.5"]}).total == [1.0]
        (worker,) = get_pool(1)._workers
        time.sleep(0.2)  # time for a SIGKILL to land
        assert scorer(["q"], ["\\boxed{0.25}"], {"answer": ["1/4"]}).total == [1.0]
        assert get_pool(1)._workers == [worker] and worker.proc.poll() is None
