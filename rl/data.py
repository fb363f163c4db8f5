"""The prompts a run trains and evaluates on: `PromptSet` (rows checked, templated and encoded once) and
`PromptSampler` (shuffled passes, resumable); rl/rollout.py turns rows into scored trajectories. Where rows come from (local
files, hub presets, reasoning-gym, the built-in generator) is rl/datasets.py.

A row is a dict: the prompt column plus any other fields (answer, tests, target, ...), which are passed to
the reward functions as columns. Sampling is by whole prompts; each prompt becomes one group of G samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rl.config import DataConfig
from rl.datasets import LOCAL_FORMATS, PRESETS, load_preset, load_table, read_answers
from rl.errors import DataError
from rl.gym import load_gym
from rl.templates import apply_template
from rl.tiny import arithmetic, tools_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rl.config import Config

__all__ = [
    "LOCAL_FORMATS",
    "PromptSampler",
    "PromptSet",
    "check_column",
    "load_rows",
    "train_and_held_out",
]


def load_rows(
    source: str,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    answer_key: str = "answer",
    answer_format: str = "raw",
    *,
    prompt_key: str | None = None,
) -> list[dict]:
    """Rows of a dataset as plain dicts (see rl/datasets.py and docs/datasets.md).

    source: `builtin:arithmetic` or `builtin:tool_arithmetic` (the tiny models' synthetic tasks; train and
            test never overlap),
            a preset (`gsm8k`, `math`, `math_l3to5`, `math500`, `aime24`, `aime25`, `amc23`, `minerva_math`,
            `olympiadbench`, `mbpp`), a reasoning-gym
            task (`gym:countdown`, `gym:gsm_symbolic?difficulty=2`, ...), a hub dataset id (`owner/name`,
            `owner/name:config`) or a local .jsonl/.json/.parquet file.
    Presets and gym tasks come normalised to `prompt` + `answer` (+ task fields). For hub ids and files,
    column `answer_key` read with `answer_format` (raw | gsm8k | boxed) becomes `answer`; `prompt_key` names
    the text a single-split hub dataset is hash-split by (default: the first of prompt, question, problem...).
    `limit` keeps the first N rows of the split; `seed` seeds generated tasks.
    """
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN:
            raise DataError(f"unknown built-in dataset {name!r}; the built-in ones: {', '.join(BUILTIN)}")
        if split not in ("train", "test"):
            raise DataError(f"{source} has splits train and test, not {split!r}")
        return BUILTIN[name](split, limit or 20_000, seed=seed)

    if source.startswith("gym:") or source in PRESETS:
        if (answer_key, answer_format) != ("answer", "raw"):
            raise DataError(
                f"{source} already reads its gold answer into the answer column: leave data.answer_key and "
                "data.answer_format at their defaults (answer, raw)"
            )
        if source.startswith("gym:"):
            rows = load_gym(source, split, limit, seed)
        else:
            rows = load_preset(source, split, limit)
    else:
        rows = read_answers(load_table(source, split, limit, prompt_key), answer_key, answer_format, source)
    if not rows:
        raise DataError(f"dataset {source!r} has no rows (split {split!r})")
    return rows


BUILTIN: dict[str, Callable[..., list[dict]]] = {
    "arithmetic": arithmetic.make_problems,
    "tool_arithmetic": tools_task.make_problems,
}
"""The tiny models' synthetic tasks (rl/tiny/): sums of six two-digit numbers, and sums of three 4-5 digit
numbers that a calculator call gets right (the tool-use demo); train and test never overlap."""


def check_column(rows: list[dict], key: str, source: str) -> None:
    """Fail early, naming the columns there are, when the prompt column is missing."""
    columns = sorted(rows[0].keys()) if rows else []
    if key not in columns:
        raise DataError(
            f"dataset {source!r} has no column {key!r} (its columns: {', '.join(columns) or 'none'}); "
            f"set data.prompt_key to the column that holds the question"
        )


class PromptSampler:
    """Endless shuffled passes over row indices; its state is (epoch, position), so it can be resumed."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(self.num_rows))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, k: int) -> list[int]:
        batch = []
        while len(batch) < k:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self._order[self.position])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, str | list | dict) and len(value) == 0)


@dataclass
class PromptSet:
    """Rows of a dataset with their templated prompt texts and token ids, encoded once."""

    rows: list[dict]
    texts: list[str]
    ids: list[list[int]]
    columns: list[str]  # fields passed to reward functions: every field but the prompt
    skipped: int = 0  # bad rows dropped (data.on_bad_row=skip)
    template: str = "plain"  # how a question became its prompt text (rl/templates.py)
    prompt_key: str = "prompt"
    tokenizer: PreTrainedTokenizerBase | None = None
    tools: list | None = None  # the tools a chat template renders into each prompt (function-calling format)

    def encode(self, row: dict, extra: str = "") -> list[int]:
        """Prompt ids of `row` with `extra` appended to its question (an environment's reset text), templated
        and encoded as the set's own prompts are."""
        text = apply_template(self.template, str(row[self.prompt_key]) + extra, self.tokenizer, self.tools)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def load(
        cls,
        data: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        source: str | None = None,
        split: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        exclude: set[str] = frozenset(),
        size: int | None = None,
        tools: list | None = None,
    ) -> PromptSet:
        """Load, check and encode a dataset as the `data` section says (columns, template, prompt limit): the
        section's own source, split and row limit, or, when `source` is given (a held-out set, `aha eval`),
        that source with `split` and `limit` as given (None: every row). `seed` seeds generated tasks.

        Bad rows (a missing or empty field, a prompt over data.max_prompt_tokens) stop with an error that names
        the row and the field, or are skipped and counted (data.on_bad_row). Rows whose prompt is in
        `exclude` are dropped (held-out sets); `size` keeps the first that many of the rest. `tools`: rendered
        into each prompt by a chat template (rl/rollout.py `prompt_tools`).
        """
        if source is None:
            source, split, limit = data.source, data.split, data.limit
        raw = load_rows(
            source,
            split or "train",
            limit,
            seed,
            data.answer_key,
            data.answer_format,
            prompt_key=data.prompt_key,
        )
        check_column(raw, data.prompt_key, source)
        fields = sorted({k for row in raw for k in row})
        rows, texts, ids, skipped = [], [], [], 0
        for i, row in enumerate(raw):
            problem = next((f"field {f!r} is missing or empty" for f in fields if _empty(row.get(f))), None)
            if problem is None:
                text = apply_template(data.template, str(row[data.prompt_key]), tokenizer, tools)
                if text in exclude:
                    continue
                tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(tokens) > data.max_prompt_tokens:
                    problem = f"the prompt has {len(tokens)} tokens, over data.max_prompt_tokens={data.max_prompt_tokens}"
            if problem is not None:
                if data.on_bad_row == "error":
                    raise DataError(
                        f"row {i} of {source!r} ({split}): {problem}. Fix the data, or set data.on_bad_row=skip "
                        "to skip such rows"
                    )
                skipped += 1
                continue
            rows.append(row)
            texts.append(text)
            ids.append(tokens)
            if size is not None and len(rows) == size:
                break
        if not rows:
            excluded = len(raw) - skipped
            raise DataError(
                f"no usable rows in {source!r} ({split}): {skipped} bad, {excluded} also in the training data. "
                "A held-out set needs problems the run does not train on: set eval.source to other data "
                "(or eval.size=0 for no evaluation)"
            )
        columns = sorted(k for k in fields if k != data.prompt_key)
        return cls(rows, texts, ids, columns, skipped, data.template, data.prompt_key, tokenizer, tools)


def train_and_held_out(
    config: Config, tokenizer: PreTrainedTokenizerBase, tools: list | None = None
) -> tuple[PromptSet, PromptSet | None]:
    """A run's training prompts, and its held-out ones (none of which is a training prompt; None when
    eval.size=0), as the run builds them and `aha eval RUN_DIR` rebuilds them. `tools`: rendered into each
    prompt by a chat template (rl/rollout.py `prompt_tools`)."""
    train_set = PromptSet.load(config.data, tokenizer, seed=config.train.seed, tools=tools)
    eval_set = None
    if config.eval.size:
        eval_set = PromptSet.load(
            config.data, tokenizer, source=config.eval.source or config.data.source, split=config.eval.split,
            seed=config.train.seed, exclude=set(train_set.texts), size=config.eval.size, tools=tools,
        )  # fmt: skip
    return train_set, eval_set
