"""The reward registry: built-ins by name, users' functions by ``"pkg.module:function"``.

A reward function has TRL's signature, ``fn(prompts, completions, **columns) -> list[float | None]``.
Built-ins register themselves with ``@register_reward("name", accuracy=...)``; users may do the same in
their own module, or just name the function in the recipe::

    rewards:
      - {name: math, weight: 1.0}
      - {name: my_pkg.rewards:length_penalty, weight: 0.1}

A user's module is imported as ``python -m`` would find it: from the installed packages, ``PYTHONPATH``, and
the current directory, which the ``aha`` console script (whose ``sys.path[0]`` is its ``bin/`` directory)
would not search on its own (``resolve_reward``).

Example: ``get_reward("format")`` -> ``rewards.format.format_reward``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RewardFn = Callable[..., list]


class RewardError(Exception):
    """Every user-facing error raised by ``rewards``; its message reads on its own, without a traceback."""


@dataclass(frozen=True)
class RewardEntry:
    """A resolved reward: its name, the function, and whether it measures correctness."""

    name: str
    fn: RewardFn
    accuracy: bool = False
    """True for rewards whose score 1.0 means "correct" (math, countdown, code): they feed ``correct``."""
    preflight: Callable[[dict[str, Any]], None] | None = None
    """Called with the recipe's options when a scorer is built, so a missing dependency fails at start-up."""


_REGISTRY: dict[str, RewardEntry] = {}
_CLOSERS: list[Callable[[], None]] = []


def register_reward(
    name: str, *, accuracy: bool = False, preflight: Callable[[dict[str, Any]], None] | None = None
) -> Callable[[RewardFn], RewardFn]:
    """Decorator that registers a reward function under ``name``; registering a name twice is an error.

    Example::

        @register_reward("length_penalty")
        def length_penalty(prompts, completions, **columns):
            return [-len(c) / 1000 for c in completions]
    """
    if not name or ":" in name:
        raise RewardError(f"invalid reward name {name!r}: use a non-empty name without ':'")

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            old = _REGISTRY[name].fn
            raise RewardError(
                f"reward name {name!r} is already registered (by {old.__module__}.{old.__qualname__}); "
                "pick another name"
            )
        if not callable(fn):
            raise RewardError(f"register_reward({name!r}) needs a function, got {type(fn).__name__}")
        _REGISTRY[name] = RewardEntry(name, fn, accuracy, preflight)
        return fn

    return decorate


def registered_names() -> list[str]:
    """Names registered so far (the built-ins, plus whatever users registered)."""
    return sorted(_REGISTRY)


def resolve_reward(name: str) -> RewardEntry:
    """Resolve a built-in name or ``"pkg.module:function"`` to a RewardEntry; RewardError if neither."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        builtin = [n for n, e in sorted(_REGISTRY.items()) if e.fn.__module__.startswith("rewards.")]
        others = [n for n in registered_names() if n not in builtin]
        also = f" (also registered: {', '.join(others)})" if others else ""
        raise RewardError(
            f"unknown reward {name!r}. Built-in rewards: {', '.join(builtin)}{also}. "
            "For your own function, use 'package.module:function'."
        )
    obj = import_object(name)
    for entry in _REGISTRY.values():  # a function its module registered keeps its accuracy flag
        if entry.fn is obj:
            return RewardEntry(name, obj, entry.accuracy, entry.preflight)
    return RewardEntry(name, obj)


def import_object(name: str, kind: str = "reward") -> Any:
    """The callable a ``"pkg.module:attr.path"`` names (a reward, a tool, an environment class: `kind` says
    which, in the errors), its module imported as ``import_reward_module`` does; RewardError when it cannot
    be imported, has no such attribute, or is not callable."""
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = import_reward_module(name, module_name)
    except RewardError as err:
        raise RewardError(str(err).replace("reward", kind, 1)) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(
                f"{kind} {name!r}: module {module_name!r} has no attribute {attr!r}{_shadow_note(module_name)}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"{kind} {name!r} is a {type(obj).__name__}, not a function")
    return obj


def import_reward_module(name: str, module_name: str) -> Any:
    """Import the module of reward ``name``, looking in the current directory too, as ``python -m`` would.

    When ``module_name``'s top-level package is not found and the current directory is not on ``sys.path``
    (the ``aha`` console script), the directory is appended to ``sys.path`` and the import retried. At the
    end, not the front as ``python -m`` puts it: a file there named like an installed or standard module
    (``datasets.py``, ``random.py``) cannot replace that module for aha's own later imports. Rewards run in
    this process (``RewardScorer``), so no child process needs the path. An error inside the user's module
    (a SyntaxError, a missing module that it imports) is reported with its own message, without a retry.
    """
    found = _import(name, module_name)
    cwd = os.getcwd()
    if isinstance(found, ModuleNotFoundError) and not _on_sys_path(cwd):
        sys.path.append(cwd)
        importlib.invalidate_caches()
        found = _import(name, module_name)
        if isinstance(found, ModuleNotFoundError):
            sys.path.remove(cwd)
    if not isinstance(found, ModuleNotFoundError):
        return found
    top = module_name.partition(".")[0]
    raise RewardError(
        f"reward {name!r}: cannot import module {module_name!r}: there is no module {top!r} in the current "
        f"directory ({cwd}) nor on sys.path. Run aha from the directory that holds {top}.py (or the package "
        f"{top}/), or make that directory importable: PYTHONPATH=/path/to/it aha ..."
    ) from found


def _import(name: str, module_name: str) -> Any:
    """``importlib.import_module(module_name)``; the ModuleNotFoundError itself (returned, not raised) when
    the module's top-level package is missing; RewardError quoting the original for any other failure."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name.partition(".")[0]:
            return e
        failure: Exception = e  # the module was found, and something it imports was not
    except Exception as e:  # raised inside the user's module: SyntaxError, NameError, ...
        failure = e
    raise RewardError(
        f"reward {name!r}: cannot import module {module_name!r}: {type(failure).__name__}: {failure}"
    ) from failure


def _on_sys_path(directory: str) -> bool:
    """Whether imports already search ``directory`` (``''`` on ``sys.path`` stands for the current one)."""
    real = os.path.realpath(directory)
    return any(isinstance(p, str) and os.path.realpath(p or os.curdir) == real for p in sys.path)


def _shadow_note(module_name: str) -> str:
    """A note for an attribute missing from a module found elsewhere while the current directory holds a file
    of that name (``rewards.py``: aha's own ``rewards`` package comes first); "" otherwise."""
    top = module_name.partition(".")[0]
    here = [p for p in (f"{top}.py", top) if os.path.exists(p)]
    found = getattr(sys.modules.get(module_name), "__file__", None)
    if not here or not found or Path(found).resolve().is_relative_to(Path.cwd().resolve()):
        return ""
    return f" (it was imported from {found}, which comes before ./{here[0]} on sys.path: rename your file)"


def get_reward(name: str) -> RewardFn:
    """The reward function for a built-in name or ``"pkg.module:function"``.

    Example: ``get_reward("math")(["Q"], ["... \\\\boxed{4}"], answer=["4"])`` -> ``[1.0]``.
    """
    return resolve_reward(name).fn


def on_close(fn: Callable[[], None]) -> Callable[[], None]:
    """Register a clean-up hook (e.g. stopping worker processes) that ``close_all()`` runs."""
    _CLOSERS.append(fn)
    return fn


def close_all() -> None:
    """Stop every worker pool the built-ins started; they restart on the next call."""
    for fn in _CLOSERS:
        fn()
