"""Per-step metrics, namespaced: reward/*, rollout/*, loss/*, policy/*, optim/*, perf/*.

Every name written here has a line in docs/metrics.md. The functions take plain values (no trainer) so the
numbers can be checked by hand in tests.
"""

from __future__ import annotations

import re
import resource
from typing import Any

import torch

from rl.trajectory import Trajectory


def reward_metrics(rewards: torch.Tensor, valid: torch.Tensor, scores: Any) -> dict[str, float]:
    """rewards, valid: [P, G]. scores: the RewardResult of the step (per-function metrics, correctness)."""
    scored = rewards[valid]
    out = {
        "reward/mean": float(scored.mean()) if scored.numel() else float("nan"),
        "reward/std": float(scored.std()) if scored.numel() > 1 else 0.0,
        "reward/unscored_frac": float((~valid).float().mean()),
    }
    # A group whose rewards are all equal has zero advantages: it teaches nothing this step.
    spread = torch.where(valid, rewards, rewards.nan_to_num(0.0))
    out["reward/zero_std_frac"] = float(
        ((spread.max(dim=1).values - spread.min(dim=1).values) == 0).float().mean()
    )
    out.update(scores.metrics)
    if scores.correct is not None:
        judged = [c for c in scores.correct if c is not None]
        out["reward/accuracy"] = sum(judged) / len(judged) if judged else float("nan")
    return out


DEFAULT_REFLECTION_WORDS = ("wait", "verify", "check", "re-examine", "let me", "recheck", "double-check")


def length_metrics(
    lengths: list[int], truncated: list[bool], correct: list[bool | None] | None
) -> dict[str, float]:
    """Response-length statistics in tokens.

    Example: lengths [2, 4, 6, 8], truncated [F, F, F, T], correct [T, F, T, None] ->
    len_mean 5, len_median 5, len_p90 7.4, len_max 8, truncated_frac 0.25, len_correct 4, len_incorrect 4.
    """
    t = torch.tensor(lengths, dtype=torch.float64)
    out = {
        "rollout/len_mean": float(t.mean()),
        "rollout/len_median": float(t.quantile(0.5)),
        "rollout/len_p90": float(t.quantile(0.9)),
        "rollout/len_max": float(t.max()),
        "rollout/truncated_frac": sum(truncated) / len(truncated),
    }
    if correct is not None:
        for name, want in (("rollout/len_correct", True), ("rollout/len_incorrect", False)):
            chosen = [n for n, c in zip(lengths, correct, strict=True) if c is want]
            out[name] = sum(chosen) / len(chosen) if chosen else float("nan")
    return out


def reflection_frac(texts: list[str], words: tuple[str, ...] | list[str] = DEFAULT_REFLECTION_WORDS) -> float:
    """Fraction of completions that use at least one reflection word ("wait", "verify", ...), case-insensitive,
    as whole words: the R1 paper's sign of the aha moment.

    Example: ["Wait, 3+4=7", "so 7", "let me check"] -> 2/3.
    """
    if not texts or not words:
        return 0.0
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return sum(bool(pattern.search(t)) for t in texts) / len(texts)


def repeated_ngram_share(ids: list[int], n: int = 4) -> float:
    """Share of a sequence's n-grams that repeat an earlier n-gram of it: seq-rep-n of Welleck et al. 2019
    ("Neural Text Degeneration with Unlikelihood Training"), 1 - |distinct n-grams| / |n-grams|; 0 for a
    sequence shorter than n. A completion stuck in a loop nears 1; human text at n=4 stays near 0.

    Example: [1, 2, 1, 2, 1, 2], n 2 -> 5 bigrams, 2 distinct -> 0.6.
    """
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_frac(completions: list[list[int]], n: int = 4, share: float = 0.5) -> float:
    """Fraction of completions caught in a loop, repeating the same span over and over: at least `share` of
    their n-grams of tokens repeat an earlier one (repeated_ngram_share).

    Example: [[5, 6, 7, 8] * 4, [1, 2, 3, 4, 5]] -> the first's 13 4-grams hold 4 distinct, share 0.69 -> 1/2.
    """
    if not completions:
        return 0.0
    return sum(repeated_ngram_share(ids, n) >= share for ids in completions) / len(completions)


def rollout_metrics(
    trajectories: list[Trajectory], judged: bool, rollout_s: float, reflection_words: list[str]
) -> dict[str, float]:
    """Lengths, truncation, reflection rate and throughput of one step's completions; `judged`: an accuracy
    reward gave its verdicts (`Trajectory.correct`), so lengths are split by them."""
    lengths = [len(t.completion_ids) for t in trajectories]
    truncated = [t.finish_reason == "length" for t in trajectories]
    out = length_metrics(lengths, truncated, [t.correct for t in trajectories] if judged else None)
    out["rollout/reflection_frac"] = reflection_frac([t.text for t in trajectories], reflection_words)
    out["rollout/repetition_frac"] = repetition_frac([t.completion_ids for t in trajectories])
    tokens = float(sum(lengths))
    out["perf/rollout_tokens"] = tokens
    out["perf/rollout_tok_s"] = tokens / rollout_s if rollout_s > 0 else 0.0
    return out


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def timing_metrics(
    rollout_s: float, reward_s: float, update_s: float, sync_s: float, step_s: float, update_tokens: float
) -> dict[str, float]:
    return {
        "perf/rollout_s": rollout_s,
        "perf/reward_s": reward_s,
        "perf/update_s": update_s,
        "perf/sync_s": sync_s,
        "perf/step_s": step_s,
        "perf/update_tok_s": update_tokens / update_s if update_s > 0 else 0.0,
    }


class UpdateAccumulator:
    """Token-weighted means of the update's per-token statistics over all micro-batches of a step."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.loss = self.entropy = self.clip_low = self.clip_high = self.ratio = self.kl = 0.0
        self.ratio_max = 0.0
        self.has_kl = False
        self.skipped = 0
        self.mismatch_abs = self.mismatch_ratio_max = self.mismatch_tokens = 0.0
        self.losses: list[float] = []
        self.counts: dict[str, list[float]] = {}  # metric -> [numerator, denominator]
        self.ranges: dict[str, list[float]] = {}  # metric prefix -> [min, max]
        self.grad_norms: list[float] = []
        self.lr = 0.0

    def add(
        self,
        mask: torch.Tensor,
        pg_loss: torch.Tensor,
        entropy: torch.Tensor,
        clip_low: torch.Tensor,
        clip_high: torch.Tensor,
        ratio: torch.Tensor,
        kl: torch.Tensor | None,
    ) -> None:
        """mask, entropy, clip_low, clip_high, ratio, kl: [b, T]; pg_loss: this micro-batch's loss share."""
        m = mask.bool()
        self.tokens += float(m.sum())
        self.loss += float(pg_loss.detach())
        self.entropy += float(entropy[m].sum())
        self.clip_low += float(clip_low[m].float().sum())
        self.clip_high += float(clip_high[m].float().sum())
        self.ratio += float(ratio[m].sum())
        self.ratio_max = max(self.ratio_max, float(ratio[m].max()) if m.any() else 0.0)
        if kl is not None:
            self.has_kl = True
            self.kl += float(kl.detach()[m].sum())

    def add_mismatch(
        self, mask: torch.Tensor, train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor
    ) -> None:
        """Rollout/trainer mismatch: the sampling policy's log-probs as the trainer and the engine compute them."""
        m = mask.bool()
        diff = (train_logprobs.detach() - rollout_logprobs)[m]
        self.mismatch_abs += float(diff.abs().sum())
        self.mismatch_ratio_max = max(self.mismatch_ratio_max, float(diff.exp().max()) if m.any() else 0.0)
        self.mismatch_tokens += float(m.sum())

    def add_counts(
        self, counts: dict[str, tuple[float, float]], ranges: dict[str, tuple[float, float]]
    ) -> None:
        """A loss variant's fractions (numerator, denominator summed over micro-batches) and ranges."""
        for name, (num, den) in counts.items():
            total = self.counts.setdefault(name, [0.0, 0.0])
            total[0], total[1] = total[0] + num, total[1] + den
        for name, (low, high) in ranges.items():
            seen = self.ranges.setdefault(name, [low, high])
            seen[0], seen[1] = min(seen[0], low), max(seen[1], high)

    def skip_step(self) -> None:
        """The optimizer step was skipped (NaN/inf loss or gradient): its loss is not the step's loss."""
        self.skipped += 1
        self.loss = 0.0

    def add_step(self, grad_norm: float, lr: float) -> None:
        self.losses.append(self.loss)
        self.loss = 0.0
        self.grad_norms.append(grad_norm)
        self.lr = lr

    def metrics(self) -> dict[str, float]:
        """The step's update metrics. What no update measured (every update skipped for a NaN/inf loss, or no
        scored sample to train on) is NaN, never a fake 0.0 that plots as a real value."""
        nan = float("nan")
        n = self.tokens or nan
        out = {
            "loss/policy": sum(self.losses) / len(self.losses) if self.losses else nan,
            "policy/entropy": self.entropy / n,
            "policy/clip_frac_low": self.clip_low / n,
            "policy/clip_frac_high": self.clip_high / n,
            "policy/ratio_mean": self.ratio / n,
            "policy/ratio_max": self.ratio_max if self.tokens else nan,
            "optim/grad_norm": sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else nan,
            "optim/lr": self.lr if self.grad_norms else nan,
            "optim/updates": float(len(self.grad_norms)),
            "optim/skipped_updates": float(self.skipped),
            "perf/update_tokens": self.tokens,
        }
        if self.mismatch_tokens:
            out["rollout/logprob_diff_mean"] = self.mismatch_abs / self.mismatch_tokens
            out["rollout/is_ratio_max"] = self.mismatch_ratio_max
        if self.has_kl:
            out["loss/kl"] = self.kl / n
        for name, (num, den) in self.counts.items():
            out[name] = num / den if den else nan
        for name, (low, high) in self.ranges.items():
            out[f"{name}_min"], out[f"{name}_max"] = low, high
        return out


def tool_metrics(trajectories: list[Trajectory], judged: bool) -> dict[str, float]:
    """tools/*: calls per completion, the share of completions that call, failed calls, observation tokens, and
    accuracy with and without a call (rollouts/multiturn.py).

    Example: calls [1, 0, 2, 0], errors [0, 0, 1, 0], correct [T, F, T, T] -> calls_mean 0.75, call_frac 0.5,
    error_frac 1/3, accuracy_with_call 1.0, accuracy_without_call 0.5.
    """
    calls = [t.tool_calls for t in trajectories]
    inserted = [sum(t.inserted) if t.inserted else 0 for t in trajectories]
    out = {
        "tools/calls_mean": sum(calls) / len(calls),
        "tools/call_frac": sum(n > 0 for n in calls) / len(calls),
        "tools/error_frac": sum(t.tool_errors for t in trajectories) / sum(calls) if sum(calls) else 0.0,
        "tools/output_tokens_mean": sum(inserted) / len(inserted),
    }
    if judged:
        for name, called in (("tools/accuracy_with_call", True), ("tools/accuracy_without_call", False)):
            verdicts = [
                t.correct for t in trajectories if t.correct is not None and (t.tool_calls > 0) == called
            ]
            out[name] = sum(verdicts) / len(verdicts) if verdicts else float("nan")
    return out


def environment_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """env/*: model turns per trajectory, the share whose environment failed, what it inserted, and its tool
    calls' errors (rollouts/environments.py).

    Example: turns [1, 3], errors [None, "ValueError: x"], inserted tokens [0, 8] -> turns_mean 2.0,
    turns_max 3, error_frac 0.5, inserted_tokens_mean 4.0.
    """
    turns = [t.turns for t in trajectories]
    inserted = [sum(t.inserted) if t.inserted else 0 for t in trajectories]
    calls = sum(t.tool_calls for t in trajectories)
    return {
        "env/turns_mean": sum(turns) / len(turns),
        "env/turns_max": float(max(turns)),
        "env/error_frac": sum(t.error is not None for t in trajectories) / len(trajectories),
        "env/inserted_tokens_mean": sum(inserted) / len(inserted),
        "env/observation_error_frac": sum(t.tool_errors for t in trajectories) / calls if calls else 0.0,
    }
