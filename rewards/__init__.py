"""Rule-based rewards for aha, behind TRL's reward-function contract.

A reward function is ``fn(prompts, completions, **columns) -> list[float | None]``: ``columns`` are the
dataset row fields (``answer``, ``tests``, ``target``, ``numbers``, ...) as lists aligned with
``completions``; ``None`` means "no score for this sample". Completions may be strings or chat message
lists.

Built-ins: ``math`` (symbolic answer check), ``format`` (R1-Zero tags), ``countdown`` (arithmetic target),
``code`` (tests in a bubblewrap sandbox), ``environment`` (an environment's own score); model-based: ``judge`` (an LLM behind an OpenAI-compatible endpoint)
and ``reward_model`` (a sequence-classification model). Public API::

    from rewards import RewardSpec, RewardScorer, get_reward, register_reward

    get_reward("math")                    # a built-in
    get_reward("my_pkg.my_module:my_fn")  # a user's function
    scorer = RewardScorer([RewardSpec("math"), RewardSpec("format", weight=0.1)])
    result = scorer(prompts, completions, {"answer": answers})

This package never imports ``rl`` or ``rollouts``. See docs/rewards.md.
"""

from rewards import (  # noqa: F401 - importing registers the built-ins
    code,
    countdown,
    environment,
    format,
    judge,
    math,
    reward_model,
)
from rewards.registry import RewardError, get_reward, register_reward, registered_names
from rewards.scoring import RewardResult, RewardScorer, RewardSpec, RewardTally, batch_reward

__all__ = [
    "RewardError",
    "RewardResult",
    "RewardScorer",
    "RewardSpec",
    "RewardTally",
    "batch_reward",
    "get_reward",
    "register_reward",
    "registered_names",
]
