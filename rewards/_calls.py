"""How the scorer calls one reward function: awaited if ``async def``, in a thread of its own if plain,
under a per-call timeout; and a private event loop for synchronous callers.

Example: ``await call(fn, (prompts, completions), {"answer": answers}, timeout=2.0)`` -> ``[1.0, 0.0]``,
or ``CallTimeout("TimeoutError after 2.0 s")`` when the call outlives its two seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class CallTimeout(Exception):
    """A call outlived its timeout (not TimeoutError: a reward function may raise that itself)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"TimeoutError after {float(seconds)} s")


def unwrap(fn: Any) -> Any:
    """The function under any ``functools.partial`` layers."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def is_async(fn: Any) -> bool:
    """``async def`` functions, partials of them, and objects whose class has an ``async def __call__``."""
    base = unwrap(fn)
    return inspect.iscoroutinefunction(base) or (
        callable(base) and inspect.iscoroutinefunction(type(base).__call__)
    )


async def call(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], timeout: float | None) -> Any:
    """``fn(*args, **kwargs)``: awaited on the running loop if async, else in a daemon thread (``_Threads``).

    Past ``timeout`` seconds (None: no limit) the call is abandoned and CallTimeout raised: an async call is
    cancelled; a plain call's thread cannot be killed (Python has no way to), so it runs on in the
    background and its result is dropped, and the caller does not wait for it. An ``async def`` that
    blocks the loop (CPU work without ``await``) cannot be timed out: make such a function plain.
    """
    if is_async(fn):
        task: asyncio.Future = asyncio.ensure_future(fn(*args, **kwargs))
    else:
        task = _in_thread(functools.partial(fn, *args, **kwargs))
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise CallTimeout(timeout)
    return task.result()


class _Threads:
    """Daemon threads for blocking reward calls: one starts when none is idle, and none ever exits.

    Not ``asyncio.to_thread``: a call abandoned at its timeout keeps its thread (Python cannot kill one), and
    in the loop's default executor it would hold a worker and make the loop's shutdown (``asyncio.run``)
    wait for it; daemon threads hold up neither the step nor the process's exit. And not a thread per
    call: a child process started by a reward (``math``'s verifier workers) gets ``PR_SET_PDEATHSIG``,
    which kills it when the *thread* that started it exits, so the threads must outlive the calls.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._work, name="aha-reward", daemon=True).start()
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            self._jobs.get()()
            with self._lock:
                self._idle += 1


_THREADS = _Threads()


def _in_thread(blocking: Callable[[], T]) -> asyncio.Future[T]:
    """Run a blocking call on one of ``_THREADS``; the returned future gets its result or exception."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, failed: bool) -> None:
        if not future.done():  # not abandoned at its timeout
            future.set_exception(value) if failed else future.set_result(value)

    def run() -> None:
        try:
            value, failed = context.run(blocking), False
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            value, failed = (RuntimeError(repr(e)) if isinstance(e, StopIteration) else e), True
        try:
            loop.call_soon_threadsafe(settle, value, failed)
        except RuntimeError:  # the loop has closed: nobody waits for this call any more
            pass

    _THREADS.submit(run)
    return future


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on a new event loop, in a helper thread if this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_on_new_loop(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aha-rewards") as helper:
        return helper.submit(_run_on_new_loop, coro).result()


def _run_on_new_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Like ``asyncio.run``, without touching the thread's current loop; abandoned async calls are cancelled
    (one that ignores its cancellation for a second is left behind)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
