"""The trajectory: one sample's record, from the dataset row to the loss, the logs and a checkpoint.

A trajectory is made once, when the engine returns a completion (rl/rollout.py), and then filled in place as the
step goes: the reward functions' scores and the total (rl/rollout.py `score`), the shaped reward and whether it
enters the loss (rl/batch.py `shape_round`), its group-relative advantage and its group's index in the step
(rl/batch.py `assign_advantages`). The update (rl/update.py) reads the first seven fields; the metrics, the
samples log, evaluation and the asynchronous schedule's checkpoint read the rest. Nothing about a sample lives
in a parallel list beside it.

Tokens: `completion_ids` holds the model's tokens and those the environment inserted (tool outputs), in order;
`inserted` marks the latter (None when the model sampled every token). Inserted tokens carry log-prob 0.0 and
stay out of the loss, the KL and the entropy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trajectory:
    """One sample. The first seven fields are what the update needs, in the order tests build them."""

    group: int
    """Its prompt's index among the step's kept groups (mini-batches split by group); 0 until assigned."""
    prompt_ids: list[int]
    completion_ids: list[int]
    """The completion's tokens: sampled ones, and inserted ones where `inserted` says so."""
    logprobs: list[float]
    """The engine's log-prob of each completion token at the sampling temperature (0.0 where inserted)."""
    advantage: float = 0.0
    trainable: bool = False
    """Scored, and not dropped by overlong filtering: it enters the loss."""
    inserted: list[bool] | None = None
    """True for each token the environment inserted (a tool's output): not sampled, out of the loss."""
    row_index: int = -1
    """The row's index in its prompt set (-1: not from one)."""
    row: dict[str, Any] = field(default_factory=dict)
    """The dataset row, every column (the reward functions' and tools' columns)."""
    prompt: str = ""
    """The templated prompt text."""
    text: str = ""
    """The decoded completion, special tokens removed."""
    finish_reason: str = "stop"
    """`stop` (EOS or a stop string) or `length` (hit the token limit)."""
    version: int | None = None
    """The policy version that sampled it (updates before sampling) when sampled ahead; None: the current."""
    scores: dict[str, float | None] = field(default_factory=dict)
    """Each reward function's score, by name; None = that function did not score it."""
    reward: float = math.nan
    """The weighted total of the scores, after overlong shaping; NaN when no function scored it."""
    correct: bool | None = None
    """The accuracy reward's verdict (score 1.0), None when there is no accuracy reward or it did not score."""
    turns: int = 1
    """Model turns: 1, plus one for each observation the environment inserted."""
    tool_calls: int = 0
    tool_errors: int = 0
    error: str | None = None
    """Why its environment failed (raised, hung, answered nonsense): the trajectory is unscored."""
    env_reward: float | None = None
    """Its environment's own score (get_reward), the `environment` reward's; None: none given."""
    environment: Any = field(default=None, repr=False, compare=False)
    """The environment instance that ran it (reward functions receive them as `environments`); not saved."""

    @property
    def scored(self) -> bool:
        return not math.isnan(self.reward)

    @property
    def model_tokens(self) -> int:
        """The completion tokens the model sampled (those the loss counts)."""
        return len(self.completion_ids) - (sum(self.inserted) if self.inserted else 0)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (a checkpoint's in-flight batches); `from_dict` gives it back field for field
        (the environment instance aside: live state, not data)."""
        saved = dataclasses.asdict(dataclasses.replace(self, environment=None))
        del saved["environment"]
        return saved

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Trajectory:
        return cls(**saved)


def flatten(groups: list[list[Trajectory]]) -> list[Trajectory]:
    """The trajectories of groups, prompt-major."""
    return [t for group in groups for t in group]
