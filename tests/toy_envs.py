"""Environments for the tests (rollouts/environments.py): a stateful game, a TRL-style tool environment, and
ones that fail in every way an environment can."""

from __future__ import annotations

import asyncio
import re
import time


class GuessGame:
    """Guess the row's answer in `attempts` tries: each wrong guess is told higher/lower and how many tries
    are left, so the reply depends on every earlier turn. A turn ends at `;`."""

    stop = (";",)

    def __init__(self, attempts: int = 3) -> None:
        self.attempts = attempts

    def reset(self, answer: str, **row: object) -> None:
        self.target, self.left, self.won, self.guesses = int(answer), self.attempts, False, []

    def respond(self, turn: str) -> str | None:
        numbers = re.findall(r"-?\d+", turn)
        guess = int(numbers[-1]) if numbers else None
        self.guesses.append(guess)
        self.left -= 1
        if guess == self.target:
            self.won = True
            return None
        if self.left == 0:
            return None
        hint = "higher" if guess is None or guess < self.target else "lower"
        return f"[{hint}, {self.left} left]"

    def get_reward(self) -> float:
        return 1.0 if self.won else 0.0


class AsyncGuessGame(GuessGame):
    """The same game with `async def` methods."""

    async def reset(self, answer: str, **row: object) -> None:
        await asyncio.sleep(0)
        super().reset(answer)

    async def respond(self, turn: str) -> str | None:
        await asyncio.sleep(0.01)
        return super().respond(turn)

    async def get_reward(self) -> float:
        return super().get_reward()


class Counter:
    """TRL-style: no respond; its public methods are tools (TRL's IncrementEnv, as written for TRL)."""

    def __init__(self) -> None:
        self._counter = 0

    def reset(self, **kwargs: object) -> None:
        self._counter = 0

    def increment(self, a: int) -> int:
        """Increment the integer by a specified value.

        Args:
            a: The value to increment by
        """
        self._counter += a
        return self._counter


class Hinted(GuessGame):
    """reset() returns text appended to the question: each trajectory's prompt gets its own hint."""

    count = 0

    def reset(self, answer: str, **row: object) -> str:
        super().reset(answer)
        Hinted.count += 1
        return f" (hint {Hinted.count})"


class RaisesInRespond(GuessGame):
    def respond(self, turn: str) -> str | None:
        raise ValueError("the game broke")


class HangsInRespond(GuessGame):
    def respond(self, turn: str) -> str | None:
        time.sleep(30)
        return "late"


class AnswersNonsense(GuessGame):
    def respond(self, turn: str) -> str | None:
        return 42  # type: ignore[return-value]


class RaisesInReset(GuessGame):
    def reset(self, answer: str, **row: object) -> None:
        raise KeyError("no such level")


class RaisesInReward(GuessGame):
    def get_reward(self) -> float:
        raise RuntimeError("scoreboard down")


class Chatter:
    """For training runs on a random tiny model: every turn that ends at `a` gets "!" back, twice; the reward
    counts the turns it took."""

    stop = ("a",)

    def reset(self, **row: object) -> None:
        self.turns = 0

    def respond(self, turn: str) -> str | None:
        self.turns += 1
        return "!" if self.turns < 3 else None

    def get_reward(self) -> float:
        return self.turns / 3


class Echo:
    """Answers each turn that ends at `s` with its turn number and the turn's length, twice (for comparing
    engines: the greedy texts of the vLLM tests' tiny model contain `s`)."""

    stop = ("s",)

    def reset(self, **row: object) -> None:
        self.turns = 0

    def respond(self, turn: str) -> str | None:
        self.turns += 1
        return f"<<{self.turns}:{len(turn)}>>" if self.turns < 3 else None


class AsyncCounter(Counter):
    """Counter with an `async def` tool."""

    async def increment(self, a: int) -> int:
        """Increment the integer by a specified value.

        Args:
            a: The value to increment by
        """
        self._counter += a
        return self._counter


class CounterWithFeedback(Counter):
    """Tools and replies in one environment: a turn that ends at `;` without a call gets feedback once."""

    stop = (";",)

    def reset(self, **kwargs: object) -> None:
        super().reset()
        self.replies = 0

    def respond(self, turn: str) -> str | None:
        self.replies += 1
        return "[again]" if self.replies == 1 else None
