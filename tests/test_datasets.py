"""Data sources: presets read through the same `hf_load` call as the hub (fed local fixtures in each set's real
schema), gold-answer formats, hash splits that never overlap, and seeded reasoning-gym tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rl import datasets as D
from rl import gym as G
from rl.data import load_rows
from rl.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
# The files each preset reads in place of the hub, keyed by the hub's split names.
PRESET_FILES = {
    "gsm8k": {"train": FIXTURES / "gsm8k_train.jsonl", "test": FIXTURES / "gsm8k_test.jsonl"},
    "math": {"train": FIXTURES / "math_train.jsonl", "test": FIXTURES / "math_test.parquet"},
    "math_l3to5": {"train": FIXTURES / "math_train.jsonl", "test": FIXTURES / "math_test.parquet"},
    "math500": {"test": FIXTURES / "math500_test.jsonl"},
    "aime24": {"train": FIXTURES / "aime24_train.jsonl"},
    "amc23": {"test": FIXTURES / "amc23_test.jsonl"},
    "mbpp": {"test": FIXTURES / "mbpp_test.jsonl"},
}


def _needs(module: str) -> None:
    """Skip when an optional package is missing, except in CI, where it must be installed."""
    if not os.environ.get("CI"):
        pytest.importorskip(module)


@pytest.fixture
def offline_hub(monkeypatch):
    """Route `hf_load` from the hub to the fixture files, recording each (path, config, split) asked for."""
    real = D.hf_load
    calls: list[tuple] = []
    by_hub_id = {D.PRESETS[name].hub_id: files for name, files in PRESET_FILES.items()}

    def fake(path, name=None, split=None, data_files=None):
        calls.append((path, name, split))
        files = by_hub_id[path]
        fmt = D.LOCAL_FORMATS[files[split].suffix]
        return real(fmt, None, split=split, data_files={split: str(files[split])})

    monkeypatch.setattr(D, "hf_load", fake)
    return calls


# ------------------------------------------------------------------------------------------ gold answers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 36 - 5 = <<36-5=31>>31\n#### 31", "31"),
        ("150 * 8 = 1200\n#### 1,200", "1200"),  # thousands commas removed
        ("4 - 11 = -7\n#### -7", "-7"),
        ("#### 5\nthen a correction\n#### 6", "6"),  # the last one
        ("#### 30.", "30"),
        ("no final answer line", None),
        (None, None),
    ],
)
def test_gsm8k_answer_is_the_number_after_the_last_hashes(text, expected):
    assert D.gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x=\\boxed{3}$.", "3"),
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("first \\boxed{1}, finally \\boxed{(3,2)}", "(3,2)"),  # the last box
        ("$\\boxed{\\{\\{1\\},\\{2\\}\\}}$", "\\{\\{1\\},\\{2\\}\\}"),  # escaped braces do not nest
        ("\\boxed {\\dfrac{4}{9}}", "\\dfrac{4}{9}"),
        ("an unclosed \\boxed{\\frac{1}{2}", None),
        ("The answer is 7.", None),
    ],
)
def test_boxed_answer_is_the_content_of_the_last_box(text, expected):
    assert D.boxed_answer(text) == expected


@pytest.mark.parametrize(
    "value, expected", [(27.0, "27"), (3.5, "3.5"), (" 12 ", "12"), (7, "7"), ("", None)]
)
def test_plain_answer_turns_numbers_into_strings(value, expected):
    assert D.plain_answer(value) == expected


def test_answer_key_and_format_map_any_column_to_answer(tmp_path):
    path = tmp_path / "solutions.jsonl"
    rows = [
        {"question": "1+1?", "solution": "so \\boxed{2}"},
        {"question": "2+2?", "solution": "no box here"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = load_rows(str(path), answer_key="solution", answer_format="boxed")
    assert [r["answer"] for r in out] == ["2", None]  # None: data.on_bad_row decides (PromptSet)
    assert out[0]["solution"] == "so \\boxed{2}"  # the source column stays
    with pytest.raises(DataError, match="no column 'solution_text'.*its columns: question, solution"):
        load_rows(str(path), answer_key="solution_text", answer_format="boxed")
    with pytest.raises(DataError, match="no row .* has a '#### N' line in column 'solution'"):
        load_rows(str(path), answer_key="solution", answer_format="gsm8k")


def test_gsm8k_format_on_a_local_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "work\n#### 1,072"}]), path)
    assert load_rows(str(path), answer_format="gsm8k") == [{"question": "q", "answer": "1072"}]


# ---------------------------------------------------------------------------------------------- presets

EXPECTED = {
    ("gsm8k", "train"): ["36", "1200", "25", "-7"],
    ("gsm8k", "test"): ["31", "30"],
    # "Level ?" is kept by math; the row without a \boxed{} is dropped.
    ("math", "train"): ["3", "\\frac{1}{2}", "\\frac{1}{\\sqrt{2}}", "(3,2)", "\\{\\{1\\},\\{2\\}\\}", "6"],
    ("math", "test"): ["9", "5\\sqrt{2}", "\\dfrac{4}{9}"],  # from the parquet fixture
    ("math_l3to5", "train"): ["\\frac{1}{\\sqrt{2}}", "(3,2)", "\\{\\{1\\},\\{2\\}\\}"],
    ("math_l3to5", "test"): ["5\\sqrt{2}", "\\dfrac{4}{9}"],
    ("math500", "test"): ["23", "\\frac{1}{3}", "(-2,2)"],
    ("aime24", "test"): ["99", "24"],
    ("amc23", "test"): ["27", "3.5"],
}

HUB_CALLS = {
    "gsm8k": ("openai/gsm8k", "main"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default"),
    "math_l3to5": ("DigitalLearningGmbH/MATH-lighteval", "default"),
    "math500": ("HuggingFaceH4/MATH-500", None),
    "aime24": ("HuggingFaceH4/aime_2024", None),
    "amc23": ("math-ai/amc23", None),
    "mbpp": ("google-research-datasets/mbpp", "full"),
}


@pytest.mark.parametrize("name, split", sorted(EXPECTED))
def test_presets_normalise_rows_to_prompt_and_answer(name, split, offline_hub):
    rows = load_rows(name, split)
    assert [r["answer"] for r in rows] == EXPECTED[(name, split)]
    assert all(set(r) == {"prompt", "answer"} and r["prompt"] for r in rows)
    hub_split = D.PRESETS[name].splits[split]
    assert offline_hub == [(*HUB_CALLS[name], hub_split)]  # the real hub id, config and split


def test_preset_prompts_come_from_the_question_column(offline_hub):
    first = json.loads((FIXTURES / "gsm8k_train.jsonl").read_text().splitlines()[0])
    assert load_rows("gsm8k", "train")[0] == {"prompt": first["question"], "answer": "36"}
    assert load_rows("amc23", "test")[0]["prompt"] == "What is $6 \\times 4.5$?"


def test_mbpp_rows_carry_their_tests_for_the_code_reward(offline_hub):
    rows = load_rows("mbpp", "test")
    assert set(rows[0]) == {"prompt", "tests"}
    assert rows[0]["tests"] == ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]
    assert rows[1]["tests"][0] == "import math\nassert square(3) == 9"  # test_setup_code runs first
    assert "assert add(1, 2) == 3" in rows[0]["prompt"]  # the asserts name the function


def test_limit_keeps_the_first_rows_after_filtering(offline_hub):
    assert [r["answer"] for r in load_rows("math_l3to5", "train", limit=2)] == [
        "\\frac{1}{\\sqrt{2}}",
        "(3,2)",
    ]


def test_benchmarks_have_only_a_test_split(offline_hub):
    with pytest.raises(
        DataError, match="math500 is an evaluation set with the split\\(s\\) test, not 'train'"
    ):
        load_rows("math500", "train")


def test_presets_refuse_answer_mapping(offline_hub):
    with pytest.raises(DataError, match="leave data.answer_key and data.answer_format"):
        load_rows("gsm8k", "train", answer_format="gsm8k")


def test_data_files_override_reads_a_local_copy_of_a_preset():
    rows = D.load_preset("gsm8k", "test", data_files={"test": str(PRESET_FILES["gsm8k"]["test"])})
    assert [r["answer"] for r in rows] == ["31", "30"]


def test_math_level_parsing():
    assert [D.math_level(v) for v in ("Level 3", 4, "Level ?", None)] == [3, 4, None, None]


# ------------------------------------------------------------------------------------ hub ids and splits


def _rows(n: int) -> list[dict]:
    return [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]


def test_held_out_is_a_deterministic_ten_percent():
    texts = [f"problem number {i}" for i in range(2000)]
    held = [t for t in texts if D.held_out(t)]
    assert 150 < len(held) < 250
    assert held == [t for t in texts if D.held_out("  " + t + "\n")]  # surrounding whitespace ignored
    assert D.held_out("problem number 7") is D.held_out("problem number 7")


def test_single_split_hub_dataset_is_hash_split_without_overlap(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(300)))
    real = D.hf_load
    seen = []

    def fake(hub_id, name=None, split=None, data_files=None):  # a hub dataset with one split, "train"
        seen.append((hub_id, name, split))
        return real("json", None, data_files={"train": str(path)})

    monkeypatch.setattr(D, "hf_load", fake)
    train = load_rows("someone/problems:main", "train", answer_key="answer")
    test = load_rows("someone/problems:main", "test")
    everything = load_rows("someone/problems:main", "all")
    assert seen[0] == ("someone/problems", "main", None)
    train_q, test_q = {r["question"] for r in train}, {r["question"] for r in test}
    assert not train_q & test_q
    assert train_q | test_q == {r["question"] for r in everything} and len(everything) == 300
    assert 10 < len(test) < 60
    assert [r["question"] for r in test] == [r["question"] for r in _rows(300) if D.held_out(r["question"])]
    assert load_rows("someone/problems", "test", limit=3) == test[:3]


def test_hub_dataset_with_splits_uses_the_named_one(tmp_path, monkeypatch):
    files = {}
    for split, n in (("train", 5), ("test", 3)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("\n".join(json.dumps(r) for r in _rows(n)))
    real = D.hf_load
    data_files = {k: str(v) for k, v in files.items()}
    monkeypatch.setattr(D, "hf_load", lambda *a, **k: real("json", None, data_files=data_files))
    assert len(load_rows("someone/two-splits", "train")) == 5
    assert len(load_rows("someone/two-splits", "test")) == 3
    with pytest.raises(DataError, match="has no split 'validation'; its splits: train, test"):
        load_rows("someone/two-splits", "validation")


def test_a_local_file_is_used_whole_whatever_the_split(tmp_path):
    path = tmp_path / "all.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(7)))
    assert load_rows(str(path), "train") == load_rows(str(path), "test") == _rows(7)
    assert load_rows(str(path), "train", limit=2) == _rows(2)


def test_missing_local_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))


ONE_OBJECT = 'each line of a .jsonl file must be one object, such as {"prompt": "...", "answer": "..."}'


@pytest.mark.parametrize(
    "second_line, problem",
    [
        (
            '{"prompt": "b", oops: 1}',
            "not valid JSON (Expecting property name enclosed in double quotes at column 17)",
        ),
        ('{"prompt": "b"', "not valid JSON (Expecting ',' delimiter at column 15)"),  # a truncated line
        ("[1, 2]", f"a list, not a JSON object; {ONE_OBJECT}"),
        ("5", f"a number, not a JSON object; {ONE_OBJECT}"),
        ("null", f"null, not a JSON object; {ONE_OBJECT}"),
        ('{"prompt": "b", "prompt": "c"}', "the key 'prompt' appears twice in one object"),
    ],
)
def test_a_bad_jsonl_line_is_named_by_file_line_and_problem(tmp_path, second_line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n' + second_line + "\n")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(err.value) == f"{path} line 2: {problem}"


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("empty.jsonl", "", "(a .jsonl file holds one JSON object per line)"),
        ("blank.jsonl", "\n  \n\n", "(a .jsonl file holds one JSON object per line)"),
        ("empty.json", "", "(0 bytes)"),
        ("list.json", "[]", ""),
    ],
)
def test_an_empty_file_says_it_is_empty(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(err.value) == f"{path} is empty: it has no rows {why}".strip()


def test_an_empty_parquet_file_says_it_is_empty(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=r"empty.parquet is empty: it has no rows$"):
        load_rows(str(path))


def test_unreadable_json_and_parquet_files_name_the_file_and_the_problem(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"prompt": "a"},\n {"prompt": "b"')
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(err.value) == f"{path}: not valid JSON (Expecting ',' delimiter at line 2 column 16)"
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(err.value).startswith(
        f"could not load dataset {path}: Parquet"
    )  # pyarrow's words under datasets'
    assert "An error occurred while generating the dataset" not in str(err.value)


def test_valid_jsonl_rows_are_what_the_datasets_json_builder_makes_of_them(tmp_path):
    """The line check only looks: `datasets` still builds the rows (missing keys None, one type a column)."""
    import datasets

    rows = [
        {"prompt": "q é 😀", "answer": 3, "tests": ["assert f(1)", "x"], "meta": {"level": 2, "tags": ["a"]}},
        {"prompt": "q2", "answer": 4, "score": 0.5},
        {"answer": 5, "tests": [], "prompt": "q3", "score": 1, "flag": True, "nothing": None},
    ]
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_bytes(("\ufeff" + lines[0] + "\r\n\r\n  " + lines[1] + "\t\n" + lines[2]).encode())
    out = load_rows(str(path))
    assert out == datasets.load_dataset("json", data_files=str(path), split="train").to_list()
    assert [list(r) for r in out] == [list(out[0])] * 3  # every row has every column, in one order
    assert [r["answer"] for r in out] == [3, 4, 5] and all(type(r["answer"]) is int for r in out)
    assert out[0]["tests"] == ["assert f(1)", "x"] and out[0]["meta"] == {"level": 2, "tags": ["a"]}
    assert out[1]["tests"] is None and out[0]["prompt"] == "q é 😀"


def test_builtin_arithmetic_still_loads():
    rows = load_rows("builtin:arithmetic", "test", limit=5)
    assert len(rows) == 5 and {"prompt", "answer"} <= set(rows[0])


# --------------------------------------------------------------------------------------- reasoning-gym


# Countdown with small numbers: its default (4-6 numbers, targets 100-999) takes ~15 ms a problem.
SMALL_COUNTDOWN = "gym:countdown?min_numbers=3&max_numbers=4&max_target=100&min_target=10"


@pytest.mark.parametrize("task", [SMALL_COUNTDOWN, "gym:gsm_symbolic", "gym:chain_sum"])
def test_gym_tasks_are_seeded_and_train_and_test_never_overlap(task):
    _needs("reasoning_gym")
    train = load_rows(task, "train", limit=8, seed=3)
    assert load_rows(task, "train", limit=8, seed=3) == train  # same seed, same rows
    neighbour = load_rows(task, "train", limit=8, seed=4)  # reasoning-gym alone would shift seed 3 by one
    assert not {r["prompt"] for r in neighbour} & {r["prompt"] for r in train}
    test = load_rows(task, "test", limit=8, seed=3)
    assert len(train) == len(test) == 8
    prompts = [r["prompt"] for r in train]
    assert len(set(prompts)) == 8  # no duplicates within a split
    assert not set(prompts) & {r["prompt"] for r in test}
    assert all(not D.held_out(p, G.GYM_HELD_OUT_PERCENT) for p in prompts)
    assert all(r["answer"] for r in train + test)


def test_gym_rows_are_a_prefix_of_a_longer_request():
    _needs("reasoning_gym")
    assert load_rows("gym:chain_sum", "train", limit=5) == load_rows("gym:chain_sum", "train", limit=40)[:5]


def test_countdown_rows_carry_numbers_and_target_that_the_countdown_reward_accepts():
    _needs("reasoning_gym")
    from rewards.countdown import score_countdown

    rows = load_rows(SMALL_COUNTDOWN, "train", limit=6)
    for row in rows:
        assert set(row) == {"prompt", "answer", "numbers", "target"}
        assert 3 <= len(row["numbers"]) <= 4 and 10 <= row["target"] <= 100
        # reasoning-gym's own solution uses every number once and reaches the target
        assert score_countdown(f"<answer>{row['answer']}</answer>", row["target"], row["numbers"]) == 1.0


def test_gym_source_options_and_errors():
    _needs("reasoning_gym")
    assert G.parse_gym_source("gym:countdown?max_numbers=4&operators=['+', '-']&shuffle=false") == (
        "countdown",
        {"max_numbers": 4, "operators": ["+", "-"], "shuffle": False},
    )
    # not YAML: kept as text
    assert G.parse_gym_source("gym:x?a=[1, 2&b=+") == ("x", {"a": "[1, 2", "b": "+"})
    with pytest.raises(DataError, match="unknown reasoning-gym task 'countdwn'; did you mean countdown"):
        load_rows("gym:countdwn")
    with pytest.raises(DataError, match="gym:countdown has no option\\(s\\) max_number; its options: "):
        load_rows("gym:countdown?max_number=3")
    with pytest.raises(DataError, match="splits train and test"):
        load_rows("gym:chain_sum", "validation")
