"""Where problems come from: named presets of well-known sets, any hub id or local file, and reasoning-gym.

Every loader returns plain dict rows. Presets and reasoning-gym tasks return them normalised: `prompt` (the
question), `answer` (the gold final answer, ready for the `math` reward) and the task fields a reward needs
(`numbers` and `target` for Countdown, `tests` for MBPP). Local files and other hub datasets come as they
are; `rl.data.load_rows` then applies `data.answer_key` / `data.answer_format`.

Sources (the `data.source` / `eval.source` / `aha eval --data` string):

    gsm8k, math, math_l3to5, math500, aime24, amc23, mbpp   presets (PRESETS below: hub id, config, columns);
    aime25, minerva_math, olympiadbench                     also the evaluation suite's (rl/suite.py)
    gym:countdown  gym:gsm_symbolic  gym:chain_sum          reasoning-gym tasks, generated offline and seeded;
    gym:countdown?min_numbers=3&max_numbers=4               options go to the task's config
    owner/name  or  owner/name:config                       a hub dataset (datasets.load_dataset)
    path/to/file.jsonl | .json | .parquet                   a local file (a bad line or an empty file: an error
                                                            naming the file, the line and the problem)

Held-out splits never overlap with training splits:
- presets use the set's own splits (GSM8K and MATH train/test; the benchmarks are test-only);
- a hub dataset with several splits: the named split; with a single split: a hash split of the prompt text,
  `held_out(text)`: blake2b of the stripped text, the `HELD_OUT_PERCENT`% whose hash falls lowest are `test`,
  the rest `train`; `all` is the whole split. The same text always lands on the same side, so duplicates
  cannot straddle the two;
- reasoning-gym (rl/gym.py): train and test are generated from different seeds, and each keeps only the
  problems that the same hash assigns to it, so an exact duplicate can never appear in both;
- a local file is used whole, whatever the split (give the held-out set its own file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl.errors import DataError

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""Local file suffix -> the `datasets` builder that reads it."""
HELD_OUT_PERCENT = 10
"""Share of a single-split hub dataset that the hash split holds out as `test`."""


# --------------------------------------------------------------------------------------- gold answers


def gsm8k_answer(text: Any) -> str | None:
    """The number after the last `####` of a GSM8K solution, commas removed; None when there is none.

    Example: `gsm8k_answer("48/2 = <<48/2=24>>24 ...\\n#### 1,072")` -> `"1072"`.
    """
    if text is None:
        return None
    found = re.findall(r"####\s*([^\n]*)", str(text))
    answer = found[-1].replace(",", "").strip().rstrip(".").strip() if found else ""
    return answer or None


def boxed_answer(text: Any) -> str | None:
    """The content of the last complete `\\boxed{...}` (nested braces kept), or None.

    Example: `boxed_answer("so $x = \\\\boxed{\\\\frac{1}{\\\\sqrt{2}}}$.")` -> `"\\\\frac{1}{\\\\sqrt{2}}"`.
    """
    from rewards.math import last_boxed  # the reward's own extractor: gold and completions read alike

    return last_boxed(str(text)) if text is not None else None


def plain_answer(value: Any) -> str | None:
    """A gold answer as a string: `27.0` -> `"27"`, `"  5 "` -> `"5"`, None or "" -> None."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


ANSWER_FORMATS: dict[str, Callable[[Any], str | None]] = {
    "raw": plain_answer,
    "gsm8k": gsm8k_answer,
    "boxed": boxed_answer,
}


def read_answers(rows: list[dict], answer_key: str, answer_format: str, source: str) -> list[dict]:
    """Copy column `answer_key` into `answer`, read with `answer_format` (raw | gsm8k | boxed).

    A row whose answer cannot be read gets `answer: None`, which `data.on_bad_row` then handles; when no row
    at all can be read the format is wrong, and that is an error.
    """
    if answer_key == "answer" and answer_format == "raw":
        return rows
    if answer_format not in ANSWER_FORMATS:
        raise DataError(f"unknown answer_format {answer_format!r}; use one of: {', '.join(ANSWER_FORMATS)}")
    if rows and answer_key not in rows[0]:
        raise DataError(
            f"dataset {source!r} has no column {answer_key!r} (its columns: {', '.join(sorted(rows[0]))}); "
            "set data.answer_key to the column that holds the gold answer"
        )
    read = ANSWER_FORMATS[answer_format]
    out = [{**row, "answer": read(row.get(answer_key))} for row in rows]
    if out and answer_format != "raw" and all(row["answer"] is None for row in out):
        what = "a '#### N' line" if answer_format == "gsm8k" else "a \\boxed{...}"
        raise DataError(
            f"no row of {source!r} has {what} in column {answer_key!r}: is data.answer_format={answer_format} "
            "right for this dataset?"
        )
    return out


# ------------------------------------------------------------------------------------------ splitting


def held_out(text: str, percent: int = HELD_OUT_PERCENT) -> bool:
    """Whether `text` belongs to the held-out (`test`) side of the hash split.

    blake2b (8 bytes) of the stripped UTF-8 text, as an integer mod 100, below `percent`. Deterministic across
    runs, machines and Python versions (no `hash()` randomisation).
    """
    digest = hashlib.blake2b(text.strip().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < percent


PROMPT_COLUMNS = ("prompt", "question", "problem", "query", "input", "instruction", "text")
"""Columns tried, in order, as the text a hash split hashes, when the caller names none."""


def split_key(row: dict, prompt_key: str | None = None) -> str:
    """The text a row is hash-split by: its prompt column (`prompt_key`, else the first of PROMPT_COLUMNS
    present), else the whole row as canonical JSON."""
    for key in ([prompt_key] if prompt_key else []) + list(PROMPT_COLUMNS):
        if key in row and row[key] is not None:
            return str(row[key])
    return json.dumps(row, sort_keys=True, default=str)


def hash_split(rows: list[dict], split: str, prompt_key: str | None, percent: int) -> list[dict]:
    """The rows of `split` (train | test) under the hash split of their prompt text."""
    want_test = split == "test"
    return [row for row in rows if held_out(split_key(row, prompt_key), percent) == want_test]


# --------------------------------------------------------------------------------- hub and local files


def hf_load(
    path: str,
    name: str | None = None,
    split: str | None = None,
    data_files: Any = None,
    label: str | None = None,
) -> Any:
    """`datasets.load_dataset(path, name, split=split, data_files=data_files)`, failures as DataError.

    The one call every hub and file source goes through: presets with their hub id, tests with the `json` or
    `parquet` builder and a fixture file. The error names `label` (default: the hub id, config and split) and
    the problem under `datasets`' wrapper (`root_cause`), e.g. `could not load dataset owner/name: ...`.
    """
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split, data_files=data_files)
    except Exception as err:  # datasets raises many types: missing files, no network, bad split names
        where = label or (
            f"{path}" + (f" ({name})" if name else "") + (f", split {split!r}" if split else "")
        )
        raise DataError(f"could not load dataset {where}: {root_cause(err)}") from None


def root_cause(err: BaseException) -> str:
    """The message of the error that `datasets` wrapped: "An error occurred while generating the dataset"
    says nothing, the pyarrow or json error under it does; an error with no message gives its type's name.

    Example: a DatasetGenerationError caused by `ArrowInvalid("JSON parse error: ...")` ->
    `"JSON parse error: ..."`.
    """
    while type(err).__name__ == "DatasetGenerationError" and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    return str(err) or type(err).__name__


def load_table(
    source: str, split: str, limit: int | None = None, prompt_key: str | None = None
) -> list[dict]:
    """Rows of a local file (whole, whatever `split`) or of a hub dataset (`owner/name` or `owner/name:config`).

    A hub dataset's split is taken as named; a dataset with a single split is hash-split into train and test
    (`all`: the whole of it).
    """
    path = Path(source).expanduser()
    if path.suffix in LOCAL_FORMATS:
        return load_file(path, limit)
    hub_id, _, name = source.partition(":")
    splits = hf_load(hub_id, name or None)
    return select_split(splits, split, source, limit, prompt_key)


def load_file(path: Path, limit: int | None = None) -> list[dict]:
    """The first `limit` rows (all when None) of a local .jsonl, .json or .parquet file.

    `datasets`' json or parquet builder reads the rows, so they are what that builder makes of the file (a key
    missing from a line is None in that row; a column mixing ints and floats holds floats). A .jsonl file is
    first checked line by line (`check_jsonl`), so a bad line is named by its number; any other failure, and
    an empty file, is a DataError that names the file and the problem.
    """
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    if path.suffix == ".jsonl":
        check_jsonl(path)
    try:
        dataset = hf_load(LOCAL_FORMATS[path.suffix], split="train", data_files=str(path), label=str(path))
    except DataError:
        problem = file_problem(path)
        if problem is None:
            raise
        raise DataError(problem) from None
    if len(dataset) == 0:
        raise DataError(f"{path} is empty: it has no rows")
    return _head(dataset, limit)


class _DuplicateKey(Exception):
    """A JSON object that names the same key twice (pyarrow, under `datasets`, refuses those)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """`json.loads` object hook: the object as a dict, or _DuplicateKey naming a key given twice."""
    row = dict(pairs)
    if len(row) < len(pairs):
        keys = [key for key, _ in pairs]
        raise _DuplicateKey(next(key for key in keys if keys.count(key) > 1))
    return row


JSON_KINDS = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
"""How a JSON value that is not an object is named in errors (anything else: null)."""


def check_jsonl(path: Path) -> None:
    """Check that every non-blank line of a .jsonl file is one JSON object, and that there is at least one.

    DataError names the file, the line and the problem, e.g. `data.jsonl line 2: not valid JSON (Expecting
    property name enclosed in double quotes at column 19)`, `data.jsonl line 3: a list, not a JSON object ...`,
    or `data.jsonl is empty ...` when no line holds anything. Blank lines are skipped, as `datasets` skips them.
    """
    count = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            where = f"{path} line {number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip(
                    "\r\n"
                )  # an error's column: on this line
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{where}: not UTF-8 text (byte {raw[err.start]:#04x} at position {err.start + 1})"
                ) from None
            if not text.strip(" \t\r\n"):  # JSON's own whitespace: a form feed is an error, not a blank
                continue
            try:
                value = json.loads(text, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            except _DuplicateKey as err:
                raise DataError(f"{where}: the key {str(err)!r} appears twice in one object") from None
            if not isinstance(value, dict):
                kind = JSON_KINDS.get(type(value), "null")
                raise DataError(
                    f"{where}: {kind}, not a JSON object; each line of a .jsonl file must be one object, "
                    'such as {"prompt": "...", "answer": "..."}'
                )
            count += 1
    if count == 0:
        raise DataError(f"{path} is empty: it has no rows (a .jsonl file holds one JSON object per line)")


def file_problem(path: Path) -> str | None:
    """Why `datasets` could not read a local file, when a plain look finds it: an empty file or an empty list,
    a .json file that is not valid JSON (line and column). None when the look finds nothing wrong."""
    if path.stat().st_size == 0:
        return f"{path} is empty: it has no rows (0 bytes)"
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            empty = pq.read_metadata(path).num_rows == 0
        except Exception:  # noqa: BLE001 - not a parquet file at all: datasets' own error says so
            return None
        return f"{path} is empty: it has no rows" if empty else None
    if path.suffix != ".json":
        return None
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        return f"{path}: not UTF-8 text ({err.reason} at byte position {err.start + 1})"
    except json.JSONDecodeError as err:
        if not err.doc.strip():
            return f"{path} is empty: it has no rows (only whitespace)"
        if err.msg == "Extra data":  # one object per line, which datasets reads too: check it as JSON Lines
            check_jsonl(path)
            return None
        return f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    return f"{path} is empty: it has no rows" if value in ([], {}) else None


def select_split(
    splits: Any, split: str, source: str, limit: int | None, prompt_key: str | None
) -> list[dict]:
    """Pick `split` out of a DatasetDict (see `load_table`); `limit` keeps the first N rows of the result."""
    names = list(splits)
    if split == "all":
        rows = [row for name in names for row in splits[name].to_list()]
    elif len(names) == 1 and split in ("train", "test"):
        rows = hash_split(splits[names[0]].to_list(), split, prompt_key, HELD_OUT_PERCENT)
    elif split in names:
        return _head(splits[split], limit)
    else:
        raise DataError(f"dataset {source!r} has no split {split!r}; its splits: {', '.join(names)} (or all)")
    return rows[:limit] if limit is not None else rows


def _head(dataset: Any, limit: int | None) -> list[dict]:
    """The first `limit` rows (all when None) of a `datasets.Dataset`, as dicts."""
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list()


# -------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A well-known dataset: where it lives on the hub and how its rows become prompt + answer (+ fields)."""

    hub_id: str
    config: str | None
    splits: dict[str, str]
    """Split name asked for -> the hub's split. Benchmarks offer only `test`."""
    row: Callable[[dict], dict | None]
    """Normalise one hub row; None drops it (no readable gold answer)."""
    columns: str
    """The hub columns used, for the docs and error messages."""
    levels: tuple[int, ...] = field(default=())
    """Keep only these MATH difficulty levels (empty: all)."""


def math_level(value: Any) -> int | None:
    """MATH's level as an int: `"Level 3"` -> 3, `4` -> 4, `"Level ?"` -> None."""
    if isinstance(value, int):
        return value
    found = re.search(r"\d+", str(value or ""))
    return int(found.group()) if found else None


def _gsm8k_row(row: dict) -> dict | None:
    answer = gsm8k_answer(row["answer"])
    return {"prompt": row["question"], "answer": answer} if answer else None


def _math_row(row: dict) -> dict | None:
    answer = boxed_answer(row["solution"])
    return {"prompt": row["problem"], "answer": answer} if answer else None


def _answer_row(question: str) -> Callable[[dict], dict | None]:
    def normalise(row: dict) -> dict | None:
        answer = plain_answer(row["answer"])
        return {"prompt": row[question], "answer": answer} if answer else None

    return normalise


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    """The value of the first of `keys` that the row has and that is not None (None when none is)."""
    return next((row[key] for key in keys if row.get(key) is not None), None)


def _question_answer_row(row: dict) -> dict | None:
    """A benchmark row that names its question `question` or `problem` and its gold answer `answer`."""
    answer = plain_answer(row.get("answer"))
    return {"prompt": _first(row, ("question", "problem")), "answer": answer} if answer else None


def olympiad_answer(value: Any) -> str | None:
    """OlympiadBench's `final_answer`, a list: its first item without `$` (as Qwen2.5-Math's evaluation reads
    it). Example: `olympiad_answer(["$2^{1009}$"])` -> `"2^{1009}"`."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return plain_answer(str(value).strip().strip("$")) if value is not None else None


def _olympiad_row(row: dict) -> dict | None:
    answer = olympiad_answer(row.get("final_answer"))
    return {"prompt": _first(row, ("question", "problem")), "answer": answer} if answer else None


MBPP_PROMPT = "{text}\nWrite the Python function in a ```python code block. Your code should pass these tests:\n\n{tests}"


def _mbpp_row(row: dict) -> dict | None:
    """MBPP's usual prompt (the task and its asserts, which name the function); `tests`: one case per assert."""
    setup = (row.get("test_setup_code") or "").strip()
    tests = [f"{setup}\n{t}" if setup else t for t in row["test_list"]]
    prompt = MBPP_PROMPT.format(text=row["text"].strip(), tests="\n".join(row["test_list"]))
    return {"prompt": prompt, "tests": tests} if tests else None


TRAIN_TEST = {"train": "train", "test": "test"}

PRESETS: dict[str, Preset] = {
    "gsm8k": Preset("openai/gsm8k", "main", TRAIN_TEST, _gsm8k_row, "question, answer (solution ending in '#### N')"),
    "math": Preset(
        "DigitalLearningGmbH/MATH-lighteval", "default", TRAIN_TEST, _math_row,
        "problem, solution (answer in the last \\boxed{}), level ('Level 1'..'Level 5'), type",
    ),
    "math_l3to5": Preset(
        "DigitalLearningGmbH/MATH-lighteval", "default", TRAIN_TEST, _math_row,
        "as math, levels 3-5 only", levels=(3, 4, 5),
    ),
    "math500": Preset("HuggingFaceH4/MATH-500", None, {"test": "test"}, _answer_row("problem"), "problem, answer"),
    "aime24": Preset("HuggingFaceH4/aime_2024", None, {"test": "train"}, _answer_row("problem"), "problem, answer"),
    "amc23": Preset("math-ai/amc23", None, {"test": "test"}, _answer_row("question"), "question, answer"),
    "aime25": Preset("math-ai/aime25", None, {"test": "test"}, _question_answer_row, "problem, answer"),
    "minerva_math": Preset(
        "math-ai/minervamath", None, {"test": "test"}, _question_answer_row, "question, answer",
    ),
    "olympiadbench": Preset(
        "math-ai/olympiadbench", None, {"test": "test"}, _olympiad_row, "question, final_answer (a list)",
    ),
    "mbpp": Preset(
        "google-research-datasets/mbpp", "full", {**TRAIN_TEST, "validation": "validation"}, _mbpp_row,
        "text, test_list, test_setup_code",
    ),
}  # fmt: skip


def load_preset(name: str, split: str, limit: int | None = None, data_files: Any = None) -> list[dict]:
    """Rows of a preset, normalised. `data_files` ({hub split: file}) reads local files in the hub schema
    instead of the hub (through the same `hf_load` call, with the json/parquet builder): for tests, and for
    offline copies of the sets."""
    preset = PRESETS[name]
    if split not in preset.splits:
        kind = "an evaluation set" if list(preset.splits) == ["test"] else "a dataset"
        raise DataError(f"{name} is {kind} with the split(s) {', '.join(preset.splits)}, not {split!r}")
    hub_split = preset.splits[split]
    if data_files is None:
        dataset = hf_load(preset.hub_id, preset.config, split=hub_split)
    else:
        files = data_files if isinstance(data_files, dict) else {hub_split: data_files}
        if hub_split not in files:
            raise DataError(f"no data file given for {name}'s split {hub_split!r}")
        builder = LOCAL_FORMATS.get(Path(str(files[hub_split])).suffix, "json")
        dataset = hf_load(builder, None, split=hub_split, data_files={hub_split: files[hub_split]})
    rows, dropped = [], 0
    for raw in dataset:
        if preset.levels and math_level(raw.get("level")) not in preset.levels:
            continue
        row = preset.row(raw)
        if row is None:
            dropped += 1
            continue
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if dropped:
        log.warning("%s (%s): dropped %d rows without a readable gold answer", name, split, dropped)
    return rows
