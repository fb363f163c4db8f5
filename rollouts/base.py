"""The rollout-engine protocol: what the training loop needs from whatever samples completions.

An engine takes prompts as token ids and returns, per prompt, n completions with the sampled token ids,
the log-prob of each sampled token under the engine's (temperature-scaled) policy and a finish reason.
After each policy update the loop calls `update_weights(policy)`; engines that share the policy module
(the transformers engine) have nothing to copy, engines with their own copy (vLLM) load the new weights.
`sleep()`/`wake()` bracket the update so a colocated engine can give its memory back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """A rollout engine that cannot start or failed while sampling; the message says why."""


@dataclass(frozen=True)
class SamplingParams:
    n: int
    """Completions per prompt (the group size)."""
    max_new_tokens: int
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Stop strings; a completion ends with (and includes) the first one it produces."""
    seed: int | None = None
    """Prompt i of a `generate` call is sampled from a stream determined by `seed + i` alone: reproducible,
    and independent of the other prompts in the call. None = unseeded."""
    logprobs: bool = True
    """Return each sampled token's log-prob (`Completion.logprobs`). Evaluation does not use them, and vLLM's
    throughput halves when it computes them at a 152k vocabulary (measured on an H100): ask only when used.
    An engine may return [] when False."""
    on_stop: Callable[[int, list[int]], None] | None = None
    """Called, by an engine that decodes token by token (the transformers engine), as soon as sample i (its
    index in prompt-major order, prompt * n + sample) ends at a stop string, with its token ids, while the
    other samples go on decoding: multi-turn rollouts start that sample's tool call then. An engine that only
    returns whole batches (vLLM's `LLM.generate`) never calls it."""


@dataclass
class Completion:
    token_ids: list[int]
    """Sampled tokens, including the EOS token when the completion ended with one."""
    logprobs: list[float]
    """Log-prob of each sampled token under the engine's policy at the sampling temperature."""
    finish_reason: FinishReason
    """`stop`: ended by EOS or a stop string; `length`: hit max_new_tokens (truncated)."""
    text: str
    """Decoded completion, special tokens removed."""
    tool_mask: list[bool] | None = None
    """With tool calls (rollouts/multiturn.py): True for each token a tool inserted (not sampled: its log-prob
    is 0.0 and the loss leaves it out); None when every token was sampled."""
    tool_calls: int = 0
    """Observations inserted (tool outputs, an environment's replies)."""
    tool_errors: int = 0
    error: str | None = None
    """Why the sample's environment failed (it raised, hung or answered nonsense): the episode ended there."""


class RolloutEngine(Protocol):
    """What the loop asks of an engine. Whatever differs between engines is said here, so the loop and
    evaluation never branch on which engine they hold (rollouts/__init__.py registers them by name)."""

    shares_policy: bool
    """True when the engine samples from the trainer's own policy module (the transformers engine): the loop
    gathers a sharded policy whole and enters mixed precision around `generate`. False for an engine with its
    own copy of the weights (vLLM), refreshed by `update_weights`."""
    batch_size: int | None
    """Most sequences one `generate` call should hold, or None when the engine schedules any number best in
    one call (vLLM). Evaluation calls `generate` per batch of this size, so its progress bar moves."""
    standalone: dict
    """Options to use when the engine runs alone, with no trainer beside it (`aha eval`): e.g. vLLM takes most
    of the GPU and never sleeps."""
    summary: str
    """One line on what the engine set itself up with (e.g. vLLM's KV-cache size), printed at start-up."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """For each prompt (token ids), `params.n` completions."""
        ...

    def update_weights(self, policy: torch.nn.Module) -> None:
        """Make the engine sample from the policy's current weights."""
        ...

    def sleep(self) -> None:
        """Release memory the engine does not need during the policy update."""
        ...

    def wake(self) -> None:
        """Undo `sleep` before the next `generate`."""
        ...

    def close(self) -> None: ...
