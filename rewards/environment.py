"""The `environment` reward: an environment's own score of each trajectory (its `get_reward()`).

The rollout stage (rl/rollout.py) asks each finished trajectory's environment for its score and passes the
scores as the `environment_reward` column; this reward returns them, so they are weighted, logged
(`reward/environment/*`) and totalled like any other. aha adds it to the recipe's rewards (weight 1) when the
environment class defines `get_reward`; listing it yourself sets another weight. TRL names the same reward
after the environment's class.
"""

from __future__ import annotations

from rewards.registry import RewardError, register_reward


@register_reward("environment")
def environment_reward(
    prompts: list, completions: list, environment_reward: list | None = None, **columns: object
) -> list[float | None]:
    """Each trajectory's `get_reward()` score (None where its environment gave none)."""
    if environment_reward is None:
        raise RewardError(
            "the environment reward needs an environment whose class defines get_reward: set environment.name"
        )
    return list(environment_reward)
