"""Seeing a run while it trains: alarms, loggers (jsonl, TensorBoard, W&B, trackio), console and samples.

`metrics.jsonl` is always written; every other logger is optional and imported only when asked for, so
none of them is a dependency of the loop. Alarms catch the failures that otherwise waste a run quietly.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl.errors import AhaError, write_error
from rl.trajectory import Trajectory

if TYPE_CHECKING:
    from rl.config import TrackConfig


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log. A line that does not parse (the process died while writing it: power
    loss, SIGKILL, a full disk) is skipped; every complete line is kept."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_jsonl(path: Path, records: list[dict], handle: Any = None) -> None:
    """Append `records` to a JSON-lines file (through an open `handle` when given), flushed; a full disk is one
    clear AhaError naming the file and the free space, not a traceback."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    try:
        if handle is not None:
            handle.write(text)
            handle.flush()
        else:
            with Path(path).open("a") as f:
                f.write(text)
    except OSError as err:
        raise write_error(err, Path(path).parent, Path(path).name) from None


# ------------------------------------------------------------------------------------------------ alarms
@dataclass
class Alarms:
    """Stateful checks over the stream of step metrics. `check` returns messages and marks the row.

    zero_reward      every sample scored 0 for `zero_reward_steps` steps in a row
    truncation       more than `truncation_frac` of the completions hit the token limit
    collapse         at least `collapse_frac` of the groups had identical rewards for `collapse_steps` steps
    nonfinite_loss   the loss or the gradient was NaN/inf (the update was skipped)
    unscored         a reward function returned None for every completion of the step (said at once, and
                     again only after it has scored something in between)
    reward_failed    every call of a reward failed this step (raised or timed out: its error_frac plus
                     timeout_frac is 1), named with its first error (said at once, again only after a step
                     in which it scored); it is not also said to be unscored
    Also the runs that look healthy by reward while they degenerate (each said when it starts, again only
    after a step without it; `alarm/<name>` marks every step it holds; None or 0 switches one off):
    repetition       more than `repetition_frac` of the completions loop (rollout/repetition_frac)
    reward_hacking   over `hacking_window` steps a shaping reward's mean rises by `hacking_rise` or more while
                     correctness rises by less than `flat_gain` (both least-squares trends, `rise`)
    entropy_collapse policy/entropy below `entropy_floor` for `entropy_steps` steps in a row while correctness
                     (reward/mean without one) rose by less than `flat_gain` over them
    ratio_blowup     policy/ratio_max above `ratio_max`, or the mismatch correction dropping more than
                     `mismatch_frac` of the tokens (rollout/mismatch_masked_frac)
    Correctness is reward/<correctness_reward>/mean when named, else reward/accuracy.
    """

    max_new_tokens: int
    zero_reward_steps: int = 5
    truncation_frac: float = 0.5
    collapse_frac: float = 0.9
    collapse_steps: int = 5
    repetition_frac: float | None = 0.3
    hacking_window: int = 10
    hacking_rise: float = 0.1
    flat_gain: float = 0.02
    correctness_reward: str | None = None
    entropy_floor: float | None = 0.01
    entropy_steps: int = 10
    ratio_max: float | None = 20.0
    mismatch_frac: float | None = 0.05
    _zero_run: int = 0
    _collapse_run: int = 0
    _unscored: tuple[str, ...] = ()
    _failed: tuple[str, ...] = ()
    _low_entropy_run: int = 0
    _firing: tuple[str, ...] = ()
    _history: dict[str, list[float]] = field(default_factory=dict)  # reward means, last steps first-to-last

    @classmethod
    def from_track(cls, track: TrackConfig, max_new_tokens: int) -> Alarms:
        """The alarms with the thresholds of the `track` config section (rl/config.py TrackConfig)."""
        return cls(
            max_new_tokens, track.zero_reward_steps, track.truncation_alarm,
            repetition_frac=track.repetition_alarm, hacking_window=track.hacking_window,
            hacking_rise=track.hacking_rise, flat_gain=track.flat_gain,
            correctness_reward=track.correctness_reward, entropy_floor=track.entropy_floor,
            entropy_steps=track.entropy_steps, ratio_max=track.ratio_alarm, mismatch_frac=track.mismatch_alarm,
        )  # fmt: skip

    def state_dict(self) -> dict:
        return {
            "zero_run": self._zero_run,
            "collapse_run": self._collapse_run,
            "unscored": list(self._unscored),
            "failed": list(self._failed),
            "low_entropy_run": self._low_entropy_run,
            "firing": list(self._firing),
            "history": {key: list(values) for key, values in self._history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self._zero_run, self._collapse_run = state["zero_run"], state["collapse_run"]
        self._unscored = tuple(state.get("unscored", ()))
        self._failed = tuple(state.get("failed", ()))
        self._low_entropy_run = state.get("low_entropy_run", 0)
        self._firing = tuple(state.get("firing", ()))
        self._history = {key: list(values) for key, values in state.get("history", {}).items()}

    def check(self, row: dict[str, float], reward_errors: dict[str, str] | None = None) -> list[str]:
        """Messages for the alarms `row` sets off; `reward_errors`: each failing reward's first error
        (`RewardResult.errors`), quoted by `reward_failed`."""
        messages = self._check_failed(row, reward_errors or {})
        messages += self._check_unscored(row)
        all_zero = row.get("reward/mean") == 0 and row.get("reward/std") == 0
        self._zero_run = self._zero_run + 1 if all_zero else 0
        if self._zero_run >= self.zero_reward_steps:
            row["alarm/zero_reward"] = 1.0
            messages.append(
                f"every reward has been 0 for {self._zero_run} steps: there is no learning signal. Check that "
                "the reward matches the output format (answer tags, \\boxed{}), the answer column, and look at "
                "`aha samples RUN_DIR`"
            )
        truncated = row.get("rollout/truncated_frac", 0.0)
        if truncated > self.truncation_frac:
            row["alarm/truncation"] = 1.0
            messages.append(
                f"{truncated:.0%} of the completions hit rollout.max_new_tokens={self.max_new_tokens} without "
                f"finishing: the limit is too low. Raise it at least 2x, to rollout.max_new_tokens="
                f"{2 * self.max_new_tokens}, or truncated answers score as wrong"
            )
        collapsed = row.get("reward/zero_std_frac", 0.0) >= self.collapse_frac
        self._collapse_run = self._collapse_run + 1 if collapsed else 0
        if self._collapse_run >= self.collapse_steps:
            row["alarm/reward_collapse"] = 1.0
            messages.append(
                f"{row['reward/zero_std_frac']:.0%} of the groups have identical rewards for {self._collapse_run} "
                "steps: they carry no gradient. The task is too easy or too hard for the model; try a larger "
                "rollout.group_size, a higher temperature, or other data"
            )
        if row.get("optim/skipped_updates", 0) > 0:
            row["alarm/nonfinite_loss"] = 1.0
            messages.append(
                f"{int(row['optim/skipped_updates'])} update(s) skipped this step: the loss or gradient was NaN/inf"
            )
        return messages + self._check_degeneration(row)

    def _check_degeneration(self, row: dict[str, float]) -> list[str]:
        """The alarms of a run that looks healthy by reward while it degenerates; each message is said when its
        alarm starts firing, again only after a step without it."""
        self._remember(row)
        found = {}
        for name, check in (
            ("repetition", self._repetition),
            ("reward_hacking", self._hacking),
            ("entropy_collapse", self._entropy_collapse),
            ("ratio_blowup", self._ratio_blowup),
        ):
            if message := check(row):
                row[f"alarm/{name}"], found[name] = 1.0, message
        new, self._firing = [m for name, m in found.items() if name not in self._firing], tuple(found)
        return new

    def _remember(self, row: dict[str, float]) -> None:
        """Keep the last steps' reward means (reward/mean, reward/accuracy, reward/<name>/mean): the trends."""
        keep = max(self.hacking_window, self.entropy_steps)
        keys = {k for k in row if k in ("reward/mean", "reward/accuracy") or _is_reward_mean(k)}
        for key in keys | set(self._history):
            values = self._history.setdefault(key, [])
            values.append(float(row.get(key, math.nan)))
            del values[:-keep]

    def _correctness_key(self, fallback: str | None = None) -> str | None:
        if self.correctness_reward is not None:
            return f"reward/{self.correctness_reward}/mean"
        return "reward/accuracy" if "reward/accuracy" in self._history else fallback

    def _trend(self, key: str | None, steps: int) -> float | None:
        """`rise` of the last `steps` values of `key`; None while fewer are known or one is NaN."""
        values = self._history.get(key, [])[-steps:] if key else []
        if steps < 2 or len(values) < steps or not all(math.isfinite(v) for v in values):
            return None
        return rise(values)

    def _repetition(self, row: dict[str, float]) -> str | None:
        looping = row.get("rollout/repetition_frac", 0.0)
        if self.repetition_frac is None or not looping > self.repetition_frac:
            return None
        return (
            f"{looping:.0%} of the completions repeat the same span over and over (half or more of their "
            "4-grams are repeats): the policy is falling into repetition loops. Look at `aha samples RUN_DIR`; "
            "lower optim.lr, penalise length near the limit (algorithm.overlong_buffer), or go back to an "
            "earlier checkpoint"
        )

    def _hacking(self, row: dict[str, float]) -> str | None:
        correct_key = self._correctness_key()
        correct = self._trend(correct_key, self.hacking_window)
        if correct is None or correct >= self.flat_gain:
            return None
        rising = {
            key: up
            for key in sorted(self._history)
            if _is_reward_mean(key) and key != correct_key
            if (up := self._trend(key, self.hacking_window)) is not None and up >= self.hacking_rise
        }
        if not rising:
            return None
        names = ", ".join(f"{k.split('/')[1]} by {up:+.2f}" for k, up in rising.items())
        return (
            f"over the last {self.hacking_window} steps reward {names} while {correct_key} moved by {correct:+.3f}: "
            "the policy is gaming a shaping reward (reward hacking), not getting more right. Read the high-reward "
            "completions (`aha samples RUN_DIR --best`); lower that reward's weight, cap it, or pay it only on "
            "correct answers"
        )

    def _entropy_collapse(self, row: dict[str, float]) -> str | None:
        entropy = row.get("policy/entropy", math.nan)
        low = self.entropy_floor is not None and entropy < self.entropy_floor  # NaN: not low
        self._low_entropy_run = self._low_entropy_run + 1 if low else 0
        if self._low_entropy_run < self.entropy_steps:
            return None
        key = self._correctness_key(fallback="reward/mean")
        gain = self._trend(key, self.entropy_steps)
        if gain is None or gain >= self.flat_gain:
            return None
        return (
            f"policy/entropy has been below {self.entropy_floor} for {self._low_entropy_run} steps (now "
            f"{entropy:.4f}) while {key} moved by {gain:+.3f}: the policy has stopped exploring (entropy "
            "collapse). Raise rollout.temperature, use clip-higher (algorithm.clip_high=0.28) or "
            "algorithm.policy_loss=clip_cov / kl_cov, lower optim.lr, or stop the run here"
        )

    def _ratio_blowup(self, row: dict[str, float]) -> str | None:
        ratio, dropped = (
            row.get("policy/ratio_max", math.nan),
            row.get("rollout/mismatch_masked_frac", math.nan),
        )
        if self.ratio_max is not None and ratio > self.ratio_max:
            what = f"policy/ratio_max reached {ratio:.3g} (alarm above {self.ratio_max:g})"
        elif self.mismatch_frac is not None and dropped > self.mismatch_frac:
            what = f"the mismatch correction dropped {dropped:.1%} of the completion tokens"
        else:
            return None
        return (
            f"{what}: the policy being trained is far from the one that sampled (engine/trainer drift or too much "
            "staleness). Lower optim.lr, algorithm.epochs / minibatches or rollout.max_staleness; with vLLM "
            "check rollout/logprob_diff_mean and set algorithm.mismatch (e.g. sequence_mask, mismatch_high 3)"
        )

    def _check_failed(self, row: dict[str, float], reward_errors: dict[str, str]) -> list[str]:
        """Rewards whose every call failed this step: `reward/<name>/error_frac` + `/timeout_frac` of 1."""
        failed = {}  # name -> (error_frac, timeout_frac)
        for key, value in row.items():
            if key.startswith("reward/") and key.endswith("/error_frac"):
                name = key.removeprefix("reward/").removesuffix("/error_frac")
                timed_out = row.get(f"reward/{name}/timeout_frac", 0.0)
                if value + timed_out >= 1.0 - 1e-9:  # the two fractions of one step's samples
                    failed[name] = (value, timed_out)
        new, self._failed = [n for n in failed if n not in self._failed], tuple(failed)
        if failed:
            row["alarm/reward_failed"] = 1.0
        return [
            f"reward {name} failed every call of step {int(row['step'])} ({failed[name][0]:.0%} raised, "
            f"{failed[name][1]:.0%} timed out); first error: {reward_errors.get(name, 'not reported')}. Its "
            "samples score None (or 0 with on_error: zero): fix the function or what it calls, or raise its "
            "timeout_s"
            for name in new
        ]

    def _check_unscored(self, row: dict[str, float]) -> list[str]:
        """Rewards that scored nothing this step: `reward/<name>/none_frac` of 1 (not those that failed)."""
        names = tuple(
            name
            for key, value in row.items()
            if key.startswith("reward/") and key.endswith("/none_frac") and value == 1.0
            if (name := key.removeprefix("reward/").removesuffix("/none_frac")) not in self._failed
        )
        new, self._unscored = [n for n in names if n not in self._unscored], names
        if names:
            row["alarm/unscored"] = 1.0
        return [
            f"reward {name} returned None for every completion of step {int(row['step'])}: it scores nothing"
            + (
                ", so no sample has a reward and nothing trains"
                if row.get("reward/unscored_frac") == 1.0
                else ""
            )
            + ". Check that the dataset has the columns it needs (e.g. answer) and that it reads the "
            "completions' format; see `aha samples RUN_DIR`"
            for name in new
        ]


def _is_reward_mean(key: str) -> bool:
    """`reward/<name>/mean`, one reward function's mean score."""
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "reward" and parts[2] == "mean"


def rise(values: list[float]) -> float:
    """How much a series rose from its first to its last step along its least-squares line (the slope times
    len - 1): a trend that one noisy step does not make. At least 2 values.

    Example: [0, 1, 2] -> 2; [1, 0, 1] -> 0; [0.2, 0.1, 0.3, 0.6] -> 0.42.
    """
    n = len(values)
    x_mean, y_mean = (n - 1) / 2, sum(values) / n
    covariance = sum((i - x_mean) * (v - y_mean) for i, v in enumerate(values))
    return covariance / sum((i - x_mean) ** 2 for i in range(n)) * (n - 1)


# ----------------------------------------------------------------------------------------------- loggers
class Loggers:
    """metrics.jsonl always; TensorBoard, Weights & Biases and trackio when enabled."""

    def __init__(
        self, run_dir: Path, config: dict, tensorboard: bool, wandb: bool, trackio: bool, project: str
    ) -> None:
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        self.backends: list[Any] = []
        self.warnings: list[str] = []
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.warnings.append(
                    "TensorBoard is not installed (pip install tensorboard): not logging to it"
                )
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
                self.backends.append(("tensorboard", self.tb))
        for name, wanted in (("wandb", wandb), ("trackio", trackio)):
            if not wanted:
                continue
            try:
                module = __import__(name)
            except ImportError:
                raise AhaError(f"track.{name}=true but {name} is not installed: pip install {name}") from None
            run = module.init(project=project, name=run_dir.name, config=config)
            self.backends.append((name, run if name == "wandb" else module))

    @classmethod
    def silent(cls) -> Loggers:
        """Loggers that write nothing (ranks other than 0 of a data-parallel run)."""
        loggers = cls.__new__(cls)
        loggers.jsonl, loggers.backends, loggers.warnings = None, [], []
        return loggers

    def log(self, row: dict[str, float]) -> None:
        if self.jsonl is None:
            return
        append_jsonl(Path(self.jsonl.name), [row], self.jsonl)
        step = int(row["step"])
        for name, backend in self.backends:
            if name == "tensorboard":
                for key, value in row.items():
                    if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                        backend.add_scalar(key, value, step)
            else:
                backend.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        for name, backend in self.backends:
            if name == "tensorboard":
                backend.close()
            elif name == "wandb":
                backend.finish()
            else:
                backend.finish()


# ----------------------------------------------------------------------------------------------- console
class Console:
    """`rich`: a live progress bar with the key numbers; `plain`: one line per logged step; `quiet`: alarms
    and the final summary only. Messages (alarms, notes) always print."""

    def __init__(self, mode: str, total_steps: int, log_every: int = 1) -> None:
        self.mode, self.total, self.log_every = mode, total_steps, log_every
        if mode == "rich" and not sys.stdout.isatty():
            self.mode = "plain"  # a log file or CI: no live display
        self.start = time.perf_counter()
        self.progress = None
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.task = self.progress.add_task("", total=total_steps)
            self.progress.start()

    def step(self, row: dict[str, float]) -> None:
        if self.mode == "rich":
            self.progress.update(self.task, completed=int(row["step"]), description=summary(row, short=True))
        elif self.mode == "plain" and (row["step"] % self.log_every == 0 or row["step"] == self.total):
            elapsed = time.perf_counter() - self.start
            eta = elapsed / row["step"] * (self.total - row["step"])
            print(f"step {int(row['step'])}/{self.total} | {summary(row)} | eta {eta:.0f}s", flush=True)

    def message(self, text: str, style: str = "yellow") -> None:
        if self.progress is not None:
            self.progress.console.print(f"[{style}]{text}[/{style}]")
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def summary(row: dict[str, float], short: bool = False) -> str:
    """The numbers a person watches: reward, accuracy, mean length, truncation, throughput."""
    parts = [f"reward {row['reward/mean']:.3f}"]
    if "reward/accuracy" in row:
        parts.append(f"acc {row['reward/accuracy']:.3f}")
    parts.append(f"len {row['rollout/len_mean']:.1f}")
    if not short:
        parts += [f"trunc {row['rollout/truncated_frac']:.2f}", f"loss {row['loss/policy']:+.4f}"]
    parts += [f"{row['perf/rollout_tok_s']:.0f} tok/s", f"{row['perf/step_s']:.1f} s/step"]
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------- samples
def sample_records(
    step: int, groups: list[list[Trajectory]], judged: bool, num_prompts: int, seed: int
) -> list[dict]:
    """Whole groups of `num_prompts` randomly chosen prompts of a step, as JSON-ready records; `judged`: an
    accuracy reward gave verdicts (else `correct` is None)."""
    chosen = sorted(
        random.Random(seed * 7919 + step).sample(range(len(groups)), min(num_prompts, len(groups)))
    )
    return [
        {
            "step": step,
            "group": g,
            "prompt": t.prompt,
            "completion": t.text,
            "reward": t.reward,
            "correct": t.correct if judged else None,
            "length": len(t.completion_ids),
            "finish_reason": t.finish_reason,
        }
        | ({"error": t.error} if t.error else {})
        for g in chosen
        for t in groups[g]
    ]
