"""Score a batch with the recipe's rewards: weights, per-reward metrics, and loud, attributable errors.

The recipe lists rewards with weights; each is logged separately besides the weighted total::

    rewards:
      - {name: math, weight: 1.0}
      - {name: format, weight: 0.1, kwargs: {strict: true}}
      - {name: my_pkg.rewards:brevity, weight: 0.05, on_error: zero}

Semantics:

- ``None`` from a reward means "no score for this sample": it is left out of that reward's mean and of
  the weighted total (not counted as 0). A sample where every reward returned None has total NaN.
- A reward that raises, returns the wrong number of scores, NaN/inf or a non-number fails the step with a
  RewardError naming the reward, the sample and the problem (``on_error: raise``, the default). With
  ``on_error: zero`` the reward is re-run one sample at a time, and each failing sample scores 0.0 and is
  counted in ``reward/<name>/errors``. RewardErrors raised by a reward itself (a missing dataset column,
  a missing sandbox) are configuration errors and always fail the step: zeroing them would silently
  zero a whole run.

Metrics per reward: ``reward/<name>/mean`` and ``/std`` (over non-None scores), ``/errors``,
``/none_frac``, and ``perf/reward/<name>_s`` (seconds). Statistics of the weighted total are the training loop's to log.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from rewards.registry import RewardEntry, RewardError, close_all, resolve_reward


@dataclass
class RewardSpec:
    """One entry of the recipe's ``rewards:`` list."""

    name: str
    """A built-in name (math, format, countdown, code) or ``"package.module:function"``."""
    weight: float = 1.0
    """Multiplier of this reward in the total."""
    on_error: Literal["raise", "zero"] = "raise"
    """``raise``: a failing reward fails the step. ``zero``: failing samples score 0 and are counted."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Options bound to the function, e.g. ``{"strict": True}`` or ``{"all_or_nothing": True}``."""


@dataclass
class RewardResult:
    """Scores for one batch."""

    total: list[float]
    """Weighted sum over rewards of the non-None scores; NaN where every reward returned None."""
    per_function: dict[str, list[float | None]]
    """Each reward's scores, keyed by its spec's name."""
    correct: list[bool | None] | None
    """From the first accuracy reward in the specs (score == 1.0); None if there is none."""
    metrics: dict[str, float]
    """``reward/<name>/{mean,std,errors,none_frac}`` and ``perf/reward/<name>_s`` for each reward."""


class _SampleError(Exception):
    """A reward's output is invalid at one sample (or as a whole when ``index`` is None)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def _describe(fn: Any) -> str:
    base = fn.func if isinstance(fn, functools.partial) else fn
    return f"{getattr(base, '__module__', '?')}.{getattr(base, '__qualname__', repr(base))}"


def validate_scores(raw: Any, n: int) -> list[float | None]:
    """Check a reward's return value: ``n`` scores, each None or a finite real number.

    Example: ``validate_scores([1, None, 0.5], 3)`` -> ``[1.0, None, 0.5]``.
    """
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


class RewardScorer:
    """Turns completions into rewards for the training loop.

    Example::

        with RewardScorer([RewardSpec("math"), RewardSpec("format", weight=0.1)]) as scorer:
            result = scorer(prompts, completions, {"answer": answers})
            result.total, result.metrics["reward/math/mean"]
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
            if spec.on_error not in ("raise", "zero"):
                raise RewardError(
                    f"reward {spec.name!r}: on_error must be 'raise' or 'zero', not {spec.on_error!r}"
                )
            if not isinstance(spec.weight, numbers.Real) or not math.isfinite(spec.weight):
                raise RewardError(
                    f"reward {spec.name!r}: weight must be a finite number, not {spec.weight!r}"
                )
            seen.add(spec.name)
            entry = resolve_reward(spec.name)
            _check_options(entry, spec.kwargs)
            if entry.preflight is not None:
                entry.preflight(dict(spec.kwargs))
            self._entries.append(entry)
            self._fns.append(functools.partial(entry.fn, **spec.kwargs) if spec.kwargs else entry.fn)

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]) -> RewardResult:
        n = len(completions)
        if len(prompts) != n:
            raise RewardError(f"got {len(prompts)} prompts for {n} completions")
        for key, values in columns.items():
            if len(values) != n:
                raise RewardError(f"column {key!r} has {len(values)} values for {n} completions")
        columns = {k: list(v) for k, v in columns.items() if k not in ("prompts", "completions")}
        per_function: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        for spec, fn in zip(self.specs, self._fns, strict=True):
            clash = sorted(set(spec.kwargs) & set(columns))
            if clash:
                raise RewardError(
                    f"reward {spec.name!r}: option(s) {clash} have the same name as dataset columns"
                )
            start = time.perf_counter()
            scores, errors = self._score(spec, fn, prompts, completions, columns)
            per_function[spec.name] = scores
            metrics.update(_reward_metrics(spec.name, scores, errors, time.perf_counter() - start))
        total = _weighted_total(self.specs, per_function, n)
        return RewardResult(total, per_function, self._correct(per_function), metrics)

    def _score(
        self, spec: RewardSpec, fn: Any, prompts: list, completions: list, columns: dict[str, list]
    ) -> tuple[list[float | None], int]:
        n = len(completions)
        try:
            return validate_scores(fn(prompts, completions, **columns), n), 0
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's function may raise anything
            failure = e
        if spec.on_error == "zero":
            return self._score_one_by_one(fn, prompts, completions, columns)
        index = failure.index if isinstance(failure, _SampleError) else None
        if index is None:
            index, failure = self._first_failing_sample(fn, prompts, completions, columns, failure)
        raise RewardError(_message(spec.name, fn, failure, index, n)) from failure

    def _score_one_by_one(self, fn: Any, prompts: list, completions: list, columns: dict[str, list]):
        scores: list[float | None] = []
        errors = 0
        for i in range(len(completions)):
            try:
                one = fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
                scores += validate_scores(one, 1)
            except RewardError:
                raise
            except Exception:  # noqa: BLE001
                scores.append(0.0)
                errors += 1
        return scores, errors

    def _first_failing_sample(self, fn, prompts, completions, columns, failure):
        """Re-run a failed batch one sample at a time to name the sample that fails (None if none does)."""
        if isinstance(failure, _SampleError):  # wrong length or type of the whole result: no one sample
            return None, failure
        for i in range(len(completions)):
            try:
                validate_scores(
                    fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()}), 1
                )
            except RewardError:
                raise
            except Exception as e:  # noqa: BLE001
                return i, e
        return None, failure

    def _correct(self, per_function: dict[str, list[float | None]]) -> list[bool | None] | None:
        for spec, entry in zip(self.specs, self._entries, strict=True):
            if entry.accuracy:
                return [None if s is None else s == 1.0 for s in per_function[spec.name]]
        return None

    def close(self) -> None:
        """Stop the built-ins' worker processes (they restart if the scorer is used again)."""
        close_all()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _message(name: str, fn: Any, failure: Exception, index: int | None, n: int) -> str:
    where = f"on sample {index} of {n}" if index is not None else f"on a batch of {n}"
    if isinstance(failure, _SampleError):
        what = str(failure)
    else:
        what = f"raised {type(failure).__name__}: {failure}"
    return (
        f"reward {name!r} ({_describe(fn)}) {what} {where}. "
        f"Set `on_error: zero` on this reward to score failing samples 0 and count them in reward/{name}/errors."
    )


def _weighted_total(
    specs: list[RewardSpec], per_function: dict[str, list[float | None]], n: int
) -> list[float]:
    total = []
    for i in range(n):
        parts = [spec.weight * s for spec in specs if (s := per_function[spec.name][i]) is not None]
        total.append(math.fsum(parts) if parts else math.nan)
    return total


def _reward_metrics(name: str, scores: list[float | None], errors: int, seconds: float) -> dict[str, float]:
    values = [s for s in scores if s is not None]
    return {
        f"reward/{name}/mean": statistics.fmean(values) if values else math.nan,
        f"reward/{name}/std": statistics.pstdev(values) if values else math.nan,
        f"reward/{name}/errors": float(errors),
        f"reward/{name}/none_frac": (len(scores) - len(values)) / len(scores) if scores else 0.0,
        f"perf/reward/{name}_s": seconds,
    }
