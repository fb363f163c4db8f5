"""Tools a model calls in the middle of a completion: the contract, the registry, the built-ins, and running calls.

A tool is a function `fn(call: str, **columns) -> str`: `call` is the text between the call markers, `columns`
the dataset row's fields (as for rewards), and the string returned is the observation the model reads next.
Built-ins, by name: `calculator` (arithmetic without eval) and `python` (the program runs in the code reward's
bubblewrap sandbox; its stdout and stderr are the observation). A user's tool is named `module:function`, as a
reward is; `@register_tool("name")` registers one under a name.

Running calls (`run_calls`): every call of a batch in its own thread, at once, each with a deadline. A tool that
raises, returns something other than a string, or is still running at its deadline gives an error observation
(`error: ...`), counted; the run goes on. A thread cannot be killed, so a tool that hangs keeps its daemon
thread until the process ends: the rollout does not wait for it. Observations are cut to `max_chars`.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import inspect
import operator
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ToolFn = Callable[..., Any]
_TOOLS: dict[str, ToolFn] = {}


class ToolError(Exception):
    """A tool that cannot be set up (unknown name, missing sandbox); the message says why."""


def register_tool(name: str) -> Callable[[ToolFn], ToolFn]:
    """Register a tool under `name` (a name registered twice is an error)."""

    def decorate(fn: ToolFn) -> ToolFn:
        if name in _TOOLS:
            raise ToolError(f"tool name {name!r} is already registered")
        _TOOLS[name] = fn
        return fn

    return decorate


def resolve_tool(name: str) -> ToolFn:
    """A built-in or registered tool by name, or a user's `module:function` (imported as reward paths are)."""
    if name in _TOOLS:
        return _TOOLS[name]
    if ":" not in name:
        raise ToolError(
            f"unknown tool {name!r}; built-in tools: {', '.join(sorted(_TOOLS))}, or 'module:function'"
        )
    from rewards.registry import RewardError, import_object

    try:
        return import_object(name, "tool")
    except RewardError as err:
        raise ToolError(str(err)) from None


# ---------------------------------------------------------------------------------------------- built-ins
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPONENT = 100
MAX_DIGITS = 100


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent over {MAX_EXPONENT}")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, int) and len(str(abs(value))) > MAX_DIGITS:
            raise ValueError(f"result over {MAX_DIGITS} digits")
        return value
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


@register_tool("calculator")
def calculator(call: str, **columns: Any) -> str:
    """Numbers, + - * / // % ** and parentheses; no names, no calls, no eval.

    Example: `calculator("12345+6789+54321")` -> "73455"; `calculator("2**0.5")` -> "1.4142135623730951".
    """
    value = _evaluate(ast.parse(call.strip(), mode="eval"))
    return (
        str(int(value))
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15
        else str(value)
    )


@register_tool("python")
def python(
    call: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    read_only_paths: list[str] | None = None,
    **columns: Any,
) -> str:
    """Run the code in the code reward's sandbox (rewards/sandbox.py: only the system's software and the
    interpreter visible, read-only; private /tmp, no network, no new processes, rlimits); the observation is
    its stdout, then its stderr. `read_only_paths` are host paths the code may also read (what it prints of
    them becomes the model's context: see the sandbox docstring)."""
    from rewards.sandbox import Limits, check_sandbox, run_python

    check_sandbox(read_only_paths=read_only_paths)
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)
    result = run_python({"solution.py": call.encode()}, "stdio", b"", limits, read_only_paths=read_only_paths)
    text = (result.stdout + result.stderr).decode(errors="replace")
    if result.timed_out:
        return f"{text}error: timed out after {timeout_s:g} s"
    return text


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Observation:
    """What the model reads next (inserted as tokens), whether it reports an error, and whether the episode
    ends here instead (an environment's answer of None, or its failure: nothing is inserted then)."""

    text: str
    error: bool = False
    end: bool = False


@dataclass
class Toolbox:
    """The tools of a run, by name, with how long a call may take and how much of its output is kept."""

    tools: dict[str, ToolFn] = field(default_factory=dict)
    options: dict[str, dict] = field(default_factory=dict)
    timeout_s: float = 30.0
    max_chars: int = 2000

    def run_calls(self, calls: list[tuple[str, dict]]) -> list[Observation]:
        """Run each (call, columns) with the first tool (the one a run uses), all at once, each to its deadline."""
        return self.finish([self.start(call, columns) for call, columns in calls])

    def start(self, call: str, columns: dict, name: str | None = None) -> PendingCall:
        """Start one call now with tool `name` (default: the first), to its deadline (`start_call`);
        `finish` collects it."""
        name = name or next(iter(self.tools))
        late = Observation(f"error: the {name} tool took over {self.timeout_s:g} s", True)
        fn, options = self.tools[name], self.options.get(name, {})

        def invoke(**columns: Any) -> Any:
            return fn(call, **options, **columns)

        return start_call(invoke, columns, self.timeout_s, functools.partial(self._observation, name), late)

    def finish(self, calls: list[PendingCall]) -> list[Observation]:
        """The started calls' observations (`collect`)."""
        return collect(calls)

    def _observation(self, name: str, value: Any) -> Observation:
        if not isinstance(value, str):
            return Observation(f"error: the {name} tool returned {type(value).__name__}, not text", True)
        return Observation(cut(value, self.max_chars))


def cut(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters (marked with "...") when longer."""
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class PendingCall:
    """A call running in its thread (or on an event loop): its deadline (time.monotonic()), the observation to
    give if it misses it, and its observation once it is done."""

    deadline: float
    late: Observation = field(default_factory=lambda: Observation("error: the call timed out", True))
    result: Observation | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def set(self, observation: Observation) -> None:
        self.result = observation
        self.done.set()

    @classmethod
    def ready(cls, observation: Observation) -> PendingCall:
        """A call whose observation is known now."""
        pending = cls(time.monotonic())
        pending.set(observation)
        return pending


def collect(calls: list[PendingCall]) -> list[Observation]:
    """The calls' observations, waiting for each at most until its own deadline (a call still running then
    gives its `late` observation; its thread is left to end on its own)."""
    for pending in calls:
        pending.done.wait(max(0.0, pending.deadline - time.monotonic()))
    return [pending.result or pending.late for pending in calls]


class _Loop:
    """One daemon thread running an event loop, for `async def` tools and environment methods."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="aha-calls").start()


_LOOP: _Loop | None = None
_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOCK:
        if _LOOP is None:
            _LOOP = _Loop()
    return _LOOP.loop


def start_call(
    fn: Callable[..., Any],
    kwargs: dict,
    timeout_s: float,
    wrap: Callable[[Any], Observation],
    late: Observation,
) -> PendingCall:
    """Call `fn(**kwargs)` now, in a daemon thread or (an `async def`) on one event loop thread, where it is
    cancelled at its deadline; `collect` gathers it. Its value becomes `wrap(value)`; an exception (bad
    arguments included) an error observation that ends the episode when `late` does."""
    pending = PendingCall(time.monotonic() + timeout_s, late)

    def failed(err: BaseException) -> Observation:
        return Observation(f"error: {type(err).__name__}: {str(err)[:200]}", True, late.end)

    def settle(get: Callable[[], Any]) -> None:
        try:
            pending.set(wrap(get()))
        except Exception as err:  # noqa: BLE001 - the model's call was bad, or the tool failed: it reads why
            pending.set(failed(err))

    if not inspect.iscoroutinefunction(fn):
        threading.Thread(target=settle, args=(lambda: fn(**kwargs),), daemon=True).start()
        return pending
    try:
        coroutine = fn(**kwargs)  # wrong arguments raise here, in the caller's thread
    except Exception as err:  # noqa: BLE001
        pending.set(failed(err))
        return pending
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coroutine, timeout_s), _loop())
    future.add_done_callback(lambda f: None if f.cancelled() else settle(f.result))
    return pending
