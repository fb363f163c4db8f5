"""The ``judge`` reward: an LLM grades each completion through an OpenAI-compatible endpoint.

For tasks with no checker (helpfulness, style, a proof's rigour); the easiest reward to hack, so prefer a
rule-based one where it exists and keep the judge's question narrow.

One request per completion, made concurrently on the endpoint's ``max_concurrency`` threads (shared by every
call in the process, so the bound holds when groups are judged at once), with greedy sampling (temperature 0
and a ``seed``) so that the same completion gets the same verdict. A request answered with 408, 409, 429 or
5xx, or that could not connect, is retried with exponential backoff and jitter (waiting at least the server's
``Retry-After``). A completion not judged within ``request_timeout_s`` of its request's start, retries
included, scores None. A 401/403/404 is a configuration error and fails the step; another 4xx (a prompt too
long for the judge) scores None, and so does a request that still fails after ``retries``, unless every
request of the call failed: then it raises JudgeUnavailable, and the reward's ``on_error`` decides (``raise``,
the default, fails the step; ``none`` scores the call's completions None and counts them).

The request is ``template`` filled with ``{prompt}`` (the prompt's text: the last message of a chat prompt),
``{completion}`` and any dataset column (``{answer}``); write a literal brace as ``{{``. The API key is read
from the environment variable named by ``api_key_env`` when a request is made: it is never an option, so it
never reaches the run directory, and it is struck out of every error message.

``parse`` turns the judge's text into a score:

- ``number``: the last ``score: X`` (``score=X``), else the last number in the text, if it lies in
  ``score_range``; else None.
- ``yes_no``: the last verdict word, 1.0 for yes/correct/right/true/pass, 0.0 for no/incorrect/wrong/false/
  fail ("not correct" is 0.0); else None.
- ``auto`` (default): a ``score: X`` in range; else whichever of a verdict word and an in-range number comes
  last in the text; else None.
- ``"package.module:function"``: your ``fn(text: str) -> float | None``.

When the run starts (the registry's preflight) the endpoint is checked once: ``GET {base_url}/models`` must
list ``model``, and a 1-token request to the chosen endpoint must succeed. A dead URL, a wrong model, a missing
or rejected key, or a model without a chat template is one RewardError before anything is written.

This function is a coroutine: ``asyncio.run(judge_reward(prompts, completions, base_url=..., ...))``.

Example (an OpenAI-compatible server on localhost serving ``judge-7b``, which answered "Score: 0.8"):
``asyncio.run(judge_reward(["2+2?"], ["4"], base_url="http://127.0.0.1:8000/v1", model="judge-7b",
template="Q: {prompt}\\nA: {completion}\\nGrade it from 0 to 1. Score:"))`` -> ``[0.8]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import http.client
import json
import logging
import os
import random
import re
import string
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rewards.registry import RewardError, on_close, register_reward, resolve_reward
from rewards.text import render_template

log = logging.getLogger(__name__)


class JudgeUnavailable(Exception):
    """Every request of a call failed (after retries): the endpoint is down or refuses the work. Not a
    RewardError, so the recipe's ``on_error`` decides: fail the step (``raise``) or score None (``none``)."""


BACKOFF_START_S = 0.5
"""First retry's delay; it doubles on each retry, up to BACKOFF_MAX_S, times a jitter factor in [0.5, 1]."""
BACKOFF_MAX_S = 8.0
PARSERS = ("auto", "number", "yes_no")
ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}

_SCORE = re.compile(r"\bscore\**\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)  # "**Score:** 0.8" too
_NUMBER = re.compile(r"(?<![\w./])-?\d+(?:\.\d+)?")  # "7/10" is 7
_VERDICT = re.compile(
    r"\b(?:(not)\s+)?(yes|no|correct|incorrect|right|wrong|true|false|pass|fail)\b", re.IGNORECASE
)
_POSITIVE = {"yes", "correct", "right", "true", "pass"}


@dataclass(frozen=True)
class JudgeConfig:
    """The judge's options, checked (``judge_config``); the fields are ``judge_reward``'s options."""

    base_url: str
    model: str
    template: str
    api_key_env: str | None = None
    endpoint: str = "chat"
    parse: str = "auto"
    score_range: tuple[float, float] = (0.0, 1.0)
    system: str | None = None
    max_tokens: int = 256
    seed: int = 0
    max_concurrency: int = 16
    request_timeout_s: float = 30.0
    retries: int = 3
    extra_body: dict[str, Any] | None = None

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINTS[self.endpoint]


def judge_config(options: dict[str, Any]) -> JudgeConfig:
    """Check the recipe's options; RewardError naming the first problem.

    Example: ``judge_config({"base_url": "http://h/v1/", "model": "m", "template": "{completion}"}).base_url``
    -> ``"http://h/v1"``.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(JudgeConfig)})
    if unknown:
        raise RewardError(f"judge reward: unknown option(s) {unknown}")
    missing = [k for k in ("base_url", "model", "template") if not options.get(k)]
    if missing:
        raise RewardError(f"judge reward: set {', '.join(missing)} in its kwargs")
    score_range = options.get("score_range", (0.0, 1.0))
    if not isinstance(score_range, list | tuple) or len(score_range) != 2:
        raise RewardError(f"judge reward: score_range must be [low, high], not {score_range!r}")
    cfg = JudgeConfig(
        **{**options, "base_url": str(options["base_url"]).rstrip("/"), "score_range": tuple(score_range)}
    )
    if not cfg.base_url.startswith(("http://", "https://")):
        raise RewardError(f"judge reward: base_url must start with http:// or https://, not {cfg.base_url!r}")
    if cfg.endpoint not in ENDPOINTS:
        raise RewardError(f"judge reward: endpoint must be one of {sorted(ENDPOINTS)}, not {cfg.endpoint!r}")
    if cfg.parse not in PARSERS and ":" not in cfg.parse:
        raise RewardError(
            f"judge reward: parse must be one of {list(PARSERS)} or 'package.module:function', not {cfg.parse!r}"
        )
    lo, hi = cfg.score_range
    if not lo < hi:
        raise RewardError(
            f"judge reward: score_range must be [low, high] with low < high, not {cfg.score_range}"
        )
    for name in ("max_concurrency", "max_tokens"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise RewardError(f"judge reward: {name} must be a positive integer, not {getattr(cfg, name)!r}")
    if not cfg.request_timeout_s > 0 or not isinstance(cfg.retries, int) or cfg.retries < 0:
        raise RewardError("judge reward: request_timeout_s must be > 0 and retries an integer >= 0")
    if cfg.extra_body is not None and (
        not isinstance(cfg.extra_body, dict)
        or {"model", "messages", "prompt", "max_tokens"} & set(cfg.extra_body)
    ):
        raise RewardError(
            "judge reward: extra_body must be a mapping without model, messages, prompt, max_tokens"
        )
    try:
        fields = {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(cfg.template) if f}
    except ValueError as e:
        raise RewardError(
            f"judge reward: the template is not a valid format string ({e}); write {{{{ for a brace"
        ) from None
    if "completion" not in fields:
        raise RewardError("judge reward: the template must contain {completion}, the text being judged")
    return cfg


# ---- verdicts -----------------------------------------------------------------------------------------


def parse_verdict(
    text: str, parse: str = "auto", score_range: tuple[float, float] = (0.0, 1.0)
) -> float | None:
    """The judge's text as a score, by one of the built-in parsers (see the module docstring).

    Examples: ``parse_verdict("Reasoning... Score: 0.7")`` -> ``0.7``; ``parse_verdict("It is not correct.")``
    -> ``0.0``; ``parse_verdict("7/10", "number", (0, 10))`` -> ``7.0``; ``parse_verdict("meh")`` -> ``None``.
    """
    lo, hi = score_range
    numbers = [(m.start(), float(m.group())) for m in _NUMBER.finditer(text)]
    numbers = [(at, x) for at, x in numbers if lo <= x <= hi]
    labelled = [float(m.group(1)) for m in _SCORE.finditer(text)]
    verdicts = [
        (m.start(), float(m.group(2).lower() in _POSITIVE and not m.group(1)))
        for m in _VERDICT.finditer(text)
    ]
    if parse == "yes_no":
        return verdicts[-1][1] if verdicts else None
    if labelled:
        return labelled[-1] if lo <= labelled[-1] <= hi else None
    if parse == "number":
        return numbers[-1][1] if numbers else None
    last = max(numbers[-1:] + verdicts[-1:], default=None)
    return None if last is None else last[1]


def _parser(cfg: JudgeConfig) -> Callable[[str], float | None]:
    if cfg.parse in PARSERS:
        return lambda text: parse_verdict(text, cfg.parse, cfg.score_range)
    try:
        return resolve_reward(cfg.parse).fn  # resolves any "package.module:function"
    except RewardError as e:
        raise RewardError(f"judge reward: parse {cfg.parse!r}: {e}") from None


# ---- requests -----------------------------------------------------------------------------------------


def render(template: str, prompt: Any, completion: Any, row: dict[str, Any]) -> str:
    """The judge's request text for one completion (`rewards.text.render_template`)."""
    return render_template(template, prompt, completion, row, "judge reward")


def request_body(cfg: JudgeConfig, text: str, max_tokens: int | None = None) -> dict[str, Any]:
    """The JSON body of one request: greedy and seeded, so a completion's verdict does not change (unless
    ``extra_body``, merged in, says otherwise); ``max_tokens`` for the 1-token check."""
    body = {"temperature": 0.0, "seed": cfg.seed, **(cfg.extra_body or {}), "model": cfg.model}
    body["max_tokens"] = max_tokens or cfg.max_tokens
    if max_tokens:
        body.pop("min_tokens", None)
    if cfg.endpoint == "chat":
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        body["messages"] = [*system, {"role": "user", "content": text}]
    else:
        body["prompt"] = (cfg.system + "\n\n" if cfg.system else "") + text
    return body


def _api_key(cfg: JudgeConfig) -> str | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise RewardError(
            f"judge reward: the environment variable {cfg.api_key_env} (api_key_env) is not set; "
            "export it before the run (the key is never written to the recipe or the run directory)"
        )
    return key


def _headers(key: str | None) -> dict[str, str]:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


@dataclass
class _Reply:
    status: int
    body: Any
    text: str
    retry_after: float | None


@dataclass
class Outcome:
    """One request's end: the judge's text, or why there is none."""

    text: str | None = None
    error: str | None = None
    """A failure that scores None (a 4xx other than 401/403/404, retries spent, an unexpected reply)."""
    status: int | None = None
    fatal: str | None = None
    """A configuration error (401, 403, 404): the step fails with it."""
    timed_out: bool = False


def _http(method: str, url: str, body: dict | None, key: str | None, timeout: float) -> _Reply:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=_headers(key))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, headers = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        status, raw, headers = e.code, e.read(), e.headers
    text = raw.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return _Reply(status, parsed, text, _retry_after(headers))


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, ``Retry-After`` as seconds or a date."""
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


def _server_message(reply: _Reply) -> str:
    body = reply.body if isinstance(reply.body, dict) else {}
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    message = message or body.get("message") or body.get("detail") or reply.text
    return f"HTTP {reply.status}: {str(message).strip()[:300]}"


def _reply_text(cfg: JudgeConfig, body: Any) -> str | None:
    try:
        choice = body["choices"][0]
        return (choice["message"]["content"] or "") if cfg.endpoint == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
        return None


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)


def _fatal(cfg: JudgeConfig, reply: _Reply, url: str) -> str:
    message = f"judge reward: {url} answered {_server_message(reply)}"
    if reply.status in (401, 403):
        where = f"the key in ${cfg.api_key_env}" if cfg.api_key_env else "no API key (set api_key_env)"
        return f"{message}. The server refused {where}"
    return f"{message}. Check model ({cfg.model!r}) and base_url (it usually ends with /v1)"


def call_judge(cfg: JudgeConfig, body: dict, key: str | None) -> Outcome:
    """One request with retries (blocking; runs in a worker thread); past ``request_timeout_s`` from now it
    stops (a connection or read that hangs is cut then) and times out."""
    deadline = time.monotonic() + cfg.request_timeout_s
    failure = Outcome(error="no attempt")
    for attempt in range(cfg.retries + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Outcome(timed_out=True)
        wait = None
        try:
            reply = _http("POST", cfg.url, body, key, remaining)
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
            if _is_timeout(e):
                return Outcome(timed_out=True)
            failure = Outcome(error=f"cannot reach {cfg.url}: {getattr(e, 'reason', None) or e}")
        else:
            if reply.status == 200:
                text = _reply_text(cfg, reply.body)
                if text is None:
                    return Outcome(error=f"unexpected reply: {reply.text[:300]}", status=200)
                return Outcome(text=text, status=200)
            if reply.status in (401, 403, 404):
                return Outcome(fatal=_fatal(cfg, reply, cfg.url), status=reply.status)
            failure = Outcome(error=_server_message(reply), status=reply.status)
            if reply.status not in (408, 409, 429) and reply.status < 500:
                return failure  # 400, 413, 422: the same request would fail again
            wait = reply.retry_after
        if attempt == cfg.retries:
            break
        delay = max(wait or 0.0, min(BACKOFF_MAX_S, BACKOFF_START_S * 2**attempt) * random.uniform(0.5, 1.0))
        if delay >= deadline - time.monotonic():
            return Outcome(timed_out=True)
        time.sleep(delay)
    return failure


_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(cfg: JudgeConfig) -> ThreadPoolExecutor:
    """The process's threads for one endpoint: ``max_concurrency`` of them, shared by every call, so the
    bound holds when the scorer judges several groups at once (each on an event loop of its own or not)."""
    key = (cfg.base_url, cfg.max_concurrency)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="aha-judge")
        return _POOLS[key]


@on_close
def close_pools() -> None:
    """Let the judge's threads go (``RewardScorer.close``); a later call starts new ones."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.shutdown(wait=False, cancel_futures=True)
        _POOLS.clear()


async def judge_all(cfg: JudgeConfig, bodies: list[dict], key: str | None) -> list[Outcome]:
    """Send every request, at most ``max_concurrency`` in flight in the process (a request waits for a free
    thread first); each ends about ``request_timeout_s`` after it started, at the latest."""
    loop = asyncio.get_running_loop()
    pool = _pool(cfg)
    jobs = [loop.run_in_executor(pool, call_judge, cfg, body, key) for body in bodies]
    try:
        return list(await asyncio.gather(*jobs))
    finally:
        for job in jobs:  # cancelled (the scorer's timeout): the requests that have not started never will
            job.cancel()


def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


# ---- the reward ---------------------------------------------------------------------------------------


def _preflight(options: dict[str, Any]) -> None:
    """At the run's start: the options, the key, the parser, and the endpoint (``check_endpoint``)."""
    cfg = judge_config(options)
    _parser(cfg)
    check_endpoint(cfg, _api_key(cfg))


def check_endpoint(cfg: JudgeConfig, key: str | None) -> None:
    """``GET {base_url}/models`` lists ``model``, and a 1-token request succeeds; RewardError otherwise."""
    url = cfg.base_url + "/models"
    try:
        reply = _http("GET", url, None, key, cfg.request_timeout_s)
    except (OSError, http.client.HTTPException) as e:
        reason = "no answer within request_timeout_s" if _is_timeout(e) else getattr(e, "reason", None) or e
        raise RewardError(
            _scrub(f"judge reward: cannot reach {url} ({reason}). Is the server running at base_url?", key)
        ) from None
    if reply.status in (401, 403):
        raise RewardError(_scrub(_fatal(cfg, reply, url), key))
    if reply.status == 200:
        data = reply.body.get("data", []) if isinstance(reply.body, dict) else []
        served = [m.get("id") for m in data if isinstance(m, dict)]
        if cfg.model not in served:
            raise RewardError(
                f"judge reward: {cfg.base_url} does not serve model {cfg.model!r}; it serves: {served}"
            )
    # any other status (some providers have no /models): the 1-token request below decides
    outcome = call_judge(cfg, request_body(cfg, "1+1=", max_tokens=1), key)  # text any tokenizer encodes
    if outcome.fatal:
        raise RewardError(_scrub(outcome.fatal, key))
    problem = outcome.error or ("no answer within request_timeout_s" if outcome.timed_out else None)
    if problem:
        if cfg.endpoint == "chat" and "chat template" in problem.lower():
            problem += (
                " (a model without a chat template needs endpoint: completions, or a server started with "
                "--chat-template)"
            )
        raise RewardError(_scrub(f"judge reward: a 1-token request to {cfg.url} failed: {problem}", key))


@register_reward("judge", preflight=_preflight)
async def judge_reward(
    prompts: list,
    completions: list,
    *,
    base_url: str | None = None,
    model: str | None = None,
    template: str | None = None,
    api_key_env: str | None = None,
    endpoint: str = "chat",
    parse: str = "auto",
    score_range: tuple[float, float] | list[float] = (0.0, 1.0),
    system: str | None = None,
    max_tokens: int = 256,
    seed: int = 0,
    max_concurrency: int = 16,
    request_timeout_s: float = 30.0,
    retries: int = 3,
    extra_body: dict[str, Any] | None = None,
    **columns,
) -> list[float | None]:
    """The judge's score of each completion (see the module docstring); a coroutine."""
    options = {k: v for k, v in locals().items() if k not in ("prompts", "completions", "columns")}
    cfg = judge_config(options)  # the parameters above, checked
    parser, key = _parser(cfg), _api_key(cfg)
    rows = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
    texts = [render(cfg.template, p, c, row) for p, c, row in zip(prompts, completions, rows, strict=True)]
    outcomes = await judge_all(cfg, [request_body(cfg, t) for t in texts], key)
    if fatal := next((o.fatal for o in outcomes if o.fatal), None):
        raise RewardError(_scrub(fatal, key))
    errors = [o.error for o in outcomes if o.error]
    if errors and len(errors) == len(outcomes):
        raise JudgeUnavailable(
            _scrub(f"every request of the call ({len(outcomes)}) failed; the first: {errors[0]}", key)
        )
    if errors:
        log.warning(
            "judge reward: %d of %d requests failed and score None (first: %s)",
            len(errors),
            len(outcomes),
            _scrub(errors[0], key),
        )
    return [None if o.text is None else parser(o.text) for o in outcomes]
