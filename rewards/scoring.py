"""Score a batch with the recipe's rewards: weights, per-reward metrics, and loud, attributable errors.

The recipe lists rewards with weights; each is logged separately besides the weighted total::

    rewards:
      - {name: math, weight: 1.0}
      - {name: format, weight: 0.1, kwargs: {strict: true}}
      - {name: my_pkg.rewards:brevity, weight: 0.05, on_error: zero}
      - {name: my_pkg.judge:llm_judge, weight: 0.5, timeout_s: 30, on_error: none}

Semantics:

- ``None`` from a reward means "no score for this sample": it is left out of that reward's mean and of
  the weighted total (not counted as 0). A sample where every reward returned None has total NaN.
- A reward that raises, returns the wrong number of scores, NaN/inf or a non-number fails the step with a
  RewardError naming the reward, the sample and the problem (``on_error: raise``, the default). With
  ``on_error: zero`` the reward is re-run one sample at a time, and each failing sample scores 0.0 and is
  counted in ``reward/<name>/errors``. With ``on_error: none`` the failing call's samples score None
  (unscored) and are counted. RewardErrors raised by a reward itself (a missing dataset column, a missing
  sandbox) are configuration errors and always fail the step: zeroing them would silently zero a whole run.
- Rewards run concurrently with each other: ``async def`` functions on the event loop, plain ones each in
  a thread of its own. A call that outlives its ``timeout_s`` scores None for its samples and is counted.
- Each reward is called per group of samples (the caller scores groups as they finish, ``scope="group"``)
  or, when it needs the whole batch (``batch: true``, or ``@batch_reward``), once per batch
  (``scope="batch"``); ``RewardScorer.combine`` assembles the parts. ``scope=None`` calls every reward on
  what it is given (the whole batch: one call per reward per batch).

Metrics per reward: ``reward/<name>/mean`` and ``/std`` (over non-None scores), ``/errors``,
``/none_frac``, ``perf/reward/<name>_s`` (seconds, summed over calls), and ``/error_frac`` and
``/timeout_frac`` for a reward that can fail without failing the step (``timeout_s`` set, or ``on_error``
other than ``raise``). Statistics of the weighted total are the training loop's to log.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from rewards._calls import CallTimeout, call, run_sync, unwrap
from rewards.registry import RewardEntry, RewardError, close_all, resolve_reward

Scope = Literal["group", "batch"]
F = TypeVar("F", bound=Callable[..., Any])
_ONE_BY_ONE = 16
"""Calls at once when a failed call is re-run one sample at a time (a thread each, for a plain function)."""


@dataclass
class RewardSpec:
    """One entry of the recipe's ``rewards:`` list."""

    name: str
    """A built-in name (math, format, countdown, code) or ``"package.module:function"``."""
    weight: float = 1.0
    """Multiplier of this reward in the total."""
    on_error: Literal["raise", "zero", "none"] = "raise"
    """``raise``: a failing reward fails the step. ``zero``: failing samples score 0 and are counted.
    ``none``: a failing call's samples score None (unscored) and are counted."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Options bound to the function, e.g. ``{"strict": True}`` or ``{"all_or_nothing": True}``."""
    timeout_s: float | None = None
    """Seconds one call may take; past it the call's samples score None, counted in
    ``reward/<name>/timeout_frac``. None: no limit."""
    batch: bool = False
    """Call the function once with the whole batch instead of once per group (a function marked with
    ``@batch_reward`` is batch-level whatever this says)."""


@dataclass
class RewardTally:
    """How one reward's calls went, summed over the calls behind a result."""

    errors: int = 0
    """Samples whose call raised or returned invalid scores (scored 0 with on_error zero, None with none)."""
    timeouts: int = 0
    """Samples whose call outlived ``timeout_s`` (scored None)."""
    seconds: float = 0.0
    """Wall time of the reward's calls, summed (concurrent calls each count)."""
    first_error: str | None = None
    """The first failure, e.g. ``"ValueError: bad input"`` or ``"TimeoutError after 2.0 s"``."""


@dataclass
class RewardResult:
    """Scores for one batch (or, from a scoped call, for one group or the batch-level rewards only)."""

    total: list[float]
    """Weighted sum over rewards of the non-None scores; NaN where every reward returned None."""
    per_function: dict[str, list[float | None]]
    """Each reward's scores, keyed by its spec's name."""
    correct: list[bool | None] | None
    """From the first accuracy reward in the specs (score == 1.0); None if there is none (or it is out of
    this result's scope)."""
    metrics: dict[str, float]
    """``reward/<name>/{mean,std,errors,none_frac}`` (and ``error_frac``, ``timeout_frac`` where the reward
    can fail softly) and ``perf/reward/<name>_s`` for each reward."""
    tallies: dict[str, RewardTally] = field(default_factory=dict)
    """Failures and time of each reward's calls (what ``combine`` sums)."""

    @property
    def errors(self) -> dict[str, str]:
        """The first failure of each reward that failed: ``{"judge": "TimeoutError after 2.0 s"}``."""
        return {name: t.first_error for name, t in self.tallies.items() if t.first_error}


class _SampleError(Exception):
    """A reward's output is invalid at one sample (or as a whole when ``index`` is None)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def batch_reward(fn: F) -> F:
    """Mark a reward function as batch-level: called once with the whole batch, never per group.

    For a reward that compares samples across groups (a rank or diversity bonus over the batch)::

        @batch_reward
        def novelty(prompts, completions, **columns): ...
    """
    fn.batch_level = True  # type: ignore[attr-defined]
    return fn


def _describe(fn: Any) -> str:
    base = unwrap(fn)
    return f"{getattr(base, '__module__', '?')}.{getattr(base, '__qualname__', repr(base))}"


def _failure_text(failure: Exception) -> str:
    if isinstance(failure, CallTimeout | _SampleError):
        return str(failure)
    return f"{type(failure).__name__}: {failure}"


def validate_scores(raw: Any, n: int) -> list[float | None]:
    """Check a reward's return value: ``n`` scores, each None or a finite real number.

    Example: ``validate_scores([1, None, 0.5], 3)`` -> ``[1.0, None, 0.5]``.
    """
    if inspect.isawaitable(raw):
        getattr(raw, "close", lambda: None)()  # no "never awaited" warning
        raise _SampleError(
            "returned an awaitable: declare the function `async def` (or its class's `__call__`) so that "
            "the scorer awaits it"
        )
    if hasattr(raw, "tolist") and not isinstance(raw, list | tuple):
        raw = raw.tolist()  # numpy arrays and torch tensors
    if not isinstance(raw, list | tuple):
        raise _SampleError(f"returned {type(raw).__name__}, not a list of scores")
    if len(raw) != n:
        raise _SampleError(f"returned {len(raw)} scores for {n} completions")
    scores: list[float | None] = []
    for i, value in enumerate(raw):
        if value is None:
            scores.append(None)
            continue
        if not isinstance(value, numbers.Real):
            raise _SampleError(f"returned a non-number ({type(value).__name__}: {value!r:.80})", i)
        value = float(value)
        if not math.isfinite(value):
            raise _SampleError(f"returned {value} (scores must be finite numbers or None)", i)
        scores.append(value)
    return scores


def _check_options(entry: RewardEntry, options: dict[str, Any]) -> None:
    """Options must name parameters of the function (any name goes for a ``**kwargs``-only function)."""
    try:
        params = inspect.signature(entry.fn).parameters.values()
    except (TypeError, ValueError):
        return
    named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {
        "prompts",
        "completions",
    }
    keyword_only = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params) and not keyword_only
    unknown = sorted(set(options) - named)
    if unknown and not takes_any:
        allowed = ", ".join(sorted(keyword_only or named)) or "none"
        raise RewardError(f"reward {entry.name!r}: unknown option(s) {unknown}; its options are: {allowed}")


def _check_spec(spec: RewardSpec) -> None:
    if spec.on_error not in ("raise", "zero", "none"):
        raise RewardError(
            f"reward {spec.name!r}: on_error must be 'raise', 'zero' or 'none', not {spec.on_error!r}"
        )
    if not isinstance(spec.weight, numbers.Real) or not math.isfinite(spec.weight):
        raise RewardError(f"reward {spec.name!r}: weight must be a finite number, not {spec.weight!r}")
    timeout = spec.timeout_s
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < math.inf
    ):
        raise RewardError(
            f"reward {spec.name!r}: timeout_s must be a positive number or null, not {timeout!r}"
        )


class RewardScorer:
    """Turns completions into rewards for the training loop.

    Example::

        with RewardScorer([RewardSpec("math"), RewardSpec("format", weight=0.1)]) as scorer:
            result = scorer(prompts, completions, {"answer": answers})
            result.total, result.metrics["reward/math/mean"]

    Scoring groups as they finish, beside generation (``score_async`` on the rollout's event loop)::

        parts = {}  # group index -> task, started as each group completes
        parts[g] = asyncio.create_task(scorer.score_async(p_g, c_g, cols_g, scope="group"))
        ...  # once the whole batch is generated:
        whole = await scorer.score_async(prompts, completions, columns, scope="batch")
        result = scorer.combine([await parts[g] for g in range(len(parts))], whole)

    ``combine`` takes the group results in batch order (the order of ``prompts``) and gives what
    ``scorer(prompts, completions, columns)`` gives for rewards that score each sample on its own.
    """

    def __init__(self, specs: list[RewardSpec]) -> None:
        if not specs:
            raise RewardError("no rewards configured: the recipe's `rewards:` list is empty")
        self.specs = list(specs)
        self._entries: list[RewardEntry] = []
        self._fns: list[Any] = []
        seen: set[str] = set()
        for spec in self.specs:
            if spec.name in seen:
                raise RewardError(
                    f"reward {spec.name!r} is listed twice in the recipe; each reward is logged by name"
                )
            _check_spec(spec)
            seen.add(spec.name)
            entry = resolve_reward(spec.name)
            _check_options(entry, spec.kwargs)
            if entry.preflight is not None:
                entry.preflight(dict(spec.kwargs))
            self._entries.append(entry)
            self._fns.append(functools.partial(entry.fn, **spec.kwargs) if spec.kwargs else entry.fn)
        self.batch_level = frozenset(
            s.name for s, f in zip(self.specs, self._fns, strict=True) if s.batch or _is_batch(f)
        )
        """Names of the rewards called once per batch (``scope="batch"``); the others are per group."""

    def __call__(
        self, prompts: list, completions: list, columns: dict[str, list], *, scope: Scope | None = None
    ) -> RewardResult:
        """``score_async`` run to its end on a private event loop (usable from any thread, loop or not)."""
        return run_sync(self.score_async(prompts, completions, columns, scope=scope))

    async def score_async(
        self, prompts: list, completions: list, columns: dict[str, list], *, scope: Scope | None = None
    ) -> RewardResult:
        """Score samples with the rewards of ``scope``, all rewards at once, on the running event loop.

        ``scope``: None, every reward (on a whole batch: today's one call per reward); ``"group"``, the
        per-group rewards (call it on each group); ``"batch"``, the batch-level ones (call it on the whole
        batch). A scoped result holds only its rewards; ``combine`` assembles the batch's result.
        ``async def`` rewards are awaited here; plain ones run each in a thread of its own, so one that waits
        on I/O overlaps the others. A call past its ``timeout_s`` is abandoned and scores None: an async
        call is cancelled, a plain call's thread cannot be killed and finishes in the background, its result
        discarded (a hung function keeps its thread; the step does not wait for it).
        """
        columns = self._checked_columns(prompts, completions, columns)
        chosen = [k for k, spec in enumerate(self.specs) if _in_scope(spec.name in self.batch_level, scope)]
        outcomes = await asyncio.gather(
            *(self._score_reward(k, prompts, completions, columns) for k in chosen), return_exceptions=True
        )
        for outcome in outcomes:  # the first failure in the recipe's order, whichever finished first
            if isinstance(outcome, BaseException):
                raise outcome
        per_function = {self.specs[k].name: scores for k, (scores, _) in zip(chosen, outcomes, strict=True)}
        tallies = {self.specs[k].name: tally for k, (_, tally) in zip(chosen, outcomes, strict=True)}
        return self._result(per_function, tallies, len(completions))

    def combine(self, groups: Sequence[RewardResult], batch: RewardResult | None = None) -> RewardResult:
        """The batch's result from its groups' results and the batch-level rewards' result.

        ``groups``: the ``scope="group"`` results, in batch order; ``batch``: the ``scope="batch"`` result
        on the whole batch (None when ``batch_level`` is empty). Scores are concatenated, the total,
        ``correct`` and the metrics recomputed, failures and seconds summed over the calls.
        """
        per_function: dict[str, list[float | None]] = {}
        tallies: dict[str, RewardTally] = {}
        for spec in self.specs:
            parts = [batch] if spec.name in self.batch_level else list(groups)
            if not parts or any(p is None or spec.name not in p.per_function for p in parts):
                where = "the batch-level result" if spec.name in self.batch_level else "every group's result"
                raise RewardError(f"combine: reward {spec.name!r} is missing from {where}")
            per_function[spec.name] = [s for p in parts for s in p.per_function[spec.name]]
            tallies[spec.name] = _sum_tallies([p.tallies[spec.name] for p in parts])
        lengths = {len(scores) for scores in per_function.values()}
        if len(lengths) > 1:
            raise RewardError(
                f"combine: the groups and the batch-level result cover {sorted(lengths)} samples"
            )
        return self._result(per_function, tallies, lengths.pop())

    def _checked_columns(self, prompts: list, completions: list, columns: dict[str, list]) -> dict[str, list]:
        n = len(completions)
        if len(prompts) != n:
            raise RewardError(f"got {len(prompts)} prompts for {n} completions")
        for key, values in columns.items():
            if len(values) != n:
                raise RewardError(f"column {key!r} has {len(values)} values for {n} completions")
        columns = {k: list(v) for k, v in columns.items() if k not in ("prompts", "completions")}
        for spec in self.specs:
            clash = sorted(set(spec.kwargs) & set(columns))
            if clash:
                raise RewardError(
                    f"reward {spec.name!r}: option(s) {clash} have the same name as dataset columns"
                )
        return columns

    def _result(
        self, per_function: dict[str, list[float | None]], tallies: dict[str, RewardTally], n: int
    ) -> RewardResult:
        specs = [spec for spec in self.specs if spec.name in per_function]
        metrics: dict[str, float] = {}
        for spec in specs:
            metrics.update(_reward_metrics(spec, per_function[spec.name], tallies[spec.name]))
        total = _weighted_total(specs, per_function, n)
        return RewardResult(total, per_function, self._correct(per_function), metrics, tallies)

    async def _call(self, k: int, prompts: list, completions: list, columns: dict[str, list]) -> Any:
        """One call of reward ``k`` (``rewards._calls.call``): CallTimeout past the spec's ``timeout_s``."""
        return await call(self._fns[k], (prompts, completions), columns, self.specs[k].timeout_s)

    async def _score_reward(
        self, k: int, prompts: list, completions: list, columns: dict[str, list]
    ) -> tuple[list[float | None], RewardTally]:
        spec, n, tally = self.specs[k], len(completions), RewardTally()
        start = time.perf_counter()
        try:
            scores = validate_scores(await self._call(k, prompts, completions, columns), n)
        except RewardError:
            raise
        except CallTimeout as e:
            scores, tally.timeouts, tally.first_error = [None] * n, n, str(e)
        except Exception as e:  # noqa: BLE001 - the user's function may raise anything
            if spec.on_error == "raise":
                await self._raise_naming_the_sample(k, prompts, completions, columns, e)
            if spec.on_error == "none":
                scores, tally.errors, tally.first_error = [None] * n, n, _failure_text(e)
            else:
                scores = _zeroed(await self._one_by_one(k, prompts, completions, columns), tally)
        tally.seconds = time.perf_counter() - start
        return scores, tally

    async def _one_by_one(
        self, k: int, prompts: list, completions: list, columns: dict[str, list]
    ) -> list[float | None | Exception]:
        """Reward ``k`` on each sample alone, ``_ONE_BY_ONE`` calls at a time: its score, or what it raised."""
        slots = asyncio.Semaphore(_ONE_BY_ONE)

        async def one(i: int) -> float | None | Exception:
            try:
                row = {key: [values[i]] for key, values in columns.items()}
                async with slots:
                    raw = await self._call(k, [prompts[i]], [completions[i]], row)
                return validate_scores(raw, 1)[0]
            except RewardError:
                raise
            except Exception as e:  # noqa: BLE001
                return e

        return await asyncio.gather(*(one(i) for i in range(len(completions))))

    async def _raise_naming_the_sample(self, k, prompts, completions, columns, failure: Exception) -> None:
        """Raise the RewardError for a failed call, naming the first sample that fails alone (if any does)."""
        index = failure.index if isinstance(failure, _SampleError) else None
        if index is None and not isinstance(failure, _SampleError):  # not a whole-result problem
            alone = await self._one_by_one(k, prompts, completions, columns)
            found = [
                (i, e)
                for i, e in enumerate(alone)
                if isinstance(e, Exception) and not isinstance(e, CallTimeout)
            ]
            index, failure = found[0] if found else (None, failure)
        name, n = self.specs[k].name, len(completions)
        raise RewardError(_message(name, self._fns[k], failure, index, n)) from failure

    def _correct(self, per_function: dict[str, list[float | None]]) -> list[bool | None] | None:
        for spec, entry in zip(self.specs, self._entries, strict=True):
            if entry.accuracy:
                scores = per_function.get(spec.name)
                return None if scores is None else [None if s is None else s == 1.0 for s in scores]
        return None

    def close(self) -> None:
        """Stop the built-ins' worker processes (they restart if the scorer is used again)."""
        close_all()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_batch(fn: Any) -> bool:
    return getattr(unwrap(fn), "batch_level", False) is True


def _in_scope(batch_level: bool, scope: Scope | None) -> bool:
    if scope not in (None, "group", "batch"):
        raise RewardError(f"scope must be None, 'group' or 'batch', not {scope!r}")
    return scope is None or (scope == "batch") == batch_level


def _zeroed(outcomes: list[float | None | Exception], tally: RewardTally) -> list[float | None]:
    """``on_error: zero``: a sample that failed alone scores 0.0 (None if it timed out), counted in ``tally``."""
    scores: list[float | None] = []
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            timed_out = isinstance(outcome, CallTimeout)
            tally.timeouts += timed_out
            tally.errors += not timed_out
            tally.first_error = tally.first_error or _failure_text(outcome)
            outcome = None if timed_out else 0.0
        scores.append(outcome)
    return scores


def _sum_tallies(tallies: list[RewardTally]) -> RewardTally:
    first = next((t.first_error for t in tallies if t.first_error), None)
    return RewardTally(
        sum(t.errors for t in tallies),
        sum(t.timeouts for t in tallies),
        sum(t.seconds for t in tallies),
        first,
    )


def _message(name: str, fn: Any, failure: Exception, index: int | None, n: int) -> str:
    where = f"on sample {index} of {n}" if index is not None else f"on a batch of {n}"
    if isinstance(failure, _SampleError):
        what = str(failure)
    else:
        what = f"raised {type(failure).__name__}: {failure}"
    return (
        f"reward {name!r} ({_describe(fn)}) {what} {where}. "
        f"Set `on_error: zero` on this reward to score failing samples 0 and count them in reward/{name}/errors "
        "(or `on_error: none` to leave a failing call's samples unscored)."
    )


def _weighted_total(
    specs: list[RewardSpec], per_function: dict[str, list[float | None]], n: int
) -> list[float]:
    total = []
    for i in range(n):
        parts = [spec.weight * s for spec in specs if (s := per_function[spec.name][i]) is not None]
        total.append(math.fsum(parts) if parts else math.nan)
    return total


def _reward_metrics(spec: RewardSpec, scores: list[float | None], tally: RewardTally) -> dict[str, float]:
    """One reward's metrics; ``error_frac`` and ``timeout_frac`` only where they can be non-zero (with
    ``on_error: raise`` and no timeout a failure fails the step), so the default run logs what it did."""
    name, values, n = spec.name, [s for s in scores if s is not None], len(scores)
    metrics = {
        f"reward/{name}/mean": statistics.fmean(values) if values else math.nan,
        f"reward/{name}/std": statistics.pstdev(values) if values else math.nan,
        f"reward/{name}/errors": float(tally.errors),
        f"reward/{name}/none_frac": (n - len(values)) / n if n else 0.0,
        f"perf/reward/{name}_s": tally.seconds,
    }
    if spec.timeout_s is not None or spec.on_error != "raise":
        metrics[f"reward/{name}/error_frac"] = tally.errors / n if n else 0.0
        metrics[f"reward/{name}/timeout_frac"] = tally.timeouts / n if n else 0.0
    return metrics
