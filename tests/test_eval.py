"""`aha eval`: the metrics by hand and the command end to end on the tiny model."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml

from rl.cli import main
from rl.evaluate import maj_at_k, majority_answer, normalize_answer, pass_at_k, pass_ks, summarize
from rollouts import Completion

FIXTURES = Path(__file__).parent / "fixtures"
MATH500 = FIXTURES / "math500_test.jsonl"  # golds: 23, \frac{1}{3}, (-2,2)

# ---------------------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (3, 1, 1, 1 / 3),  # pass@1 = c/n
        (8, 0, 4, 0.0),
        (8, 8, 1, 1.0),
        (4, 3, 2, 1.0),  # n - c < k: every pair holds a correct sample
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_counting_subsets():
    """The estimator equals the fraction of k-subsets of the n samples that hold a correct one."""
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_reported_ks():
    assert pass_ks(1) == [1] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(8) == [1, 2, 4, 8]


# ---------------------------------------------------------------------------------------------- maj@k


@pytest.mark.parametrize(
    "raw, expected",
    [
        (" $1,000.50$ ", "1000.5"),
        ("7.0", "7"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\left( -2, 2 \\right)", "(-2,2)"),
        ("90^\\circ", "90"),
        ("\\text{(B)}", "(B)"),
        ("x = 3.", "x=3"),
        ("", None),
        (None, None),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_majority_answer_counts_normalised_votes_and_breaks_ties_by_first_seen():
    assert majority_answer(["2", None, "3", "3", "2"]) == 0  # 2 and 3 tie; 2 came first
    assert majority_answer(["5", "4", "4.0", None]) == 1  # 4 and 4.0 are one answer
    assert majority_answer([None, None]) is None


@pytest.mark.parametrize(
    "answers, correct, expected",
    [
        (["5", "4", "4"], [True, False, False], 0.0),  # the majority (4) is wrong
        (["5", "5", "4"], [True, True, False], 1.0),
        (["\\frac{1}{2}", "\\dfrac{1}{2}", "0.5"], [True, True, True], 1.0),
        ([None, None, "3"], [False, False, True], 1.0),  # no-answer samples do not vote
        ([None, None], [False, False], 0.0),
        (["1", "2"], [False, True], 0.0),  # a tie goes to the first seen
    ],
)
def test_maj_at_k_by_hand(answers, correct, expected):
    assert maj_at_k(answers, correct) == expected


def test_summarize_two_problems_by_hand():
    correct = [[True, False, False, False], [True, True, False, False]]
    answers = [["3", "4", "4", "5"], ["7", "7.0", "8", None]]
    assert summarize(correct, answers) == pytest.approx(
        {
            "pass@1": (1 / 4 + 2 / 4) / 2,
            "pass@2": ((1 - 3 / 6) + (1 - 1 / 6)) / 2,
            "pass@4": 1.0,
            "maj@4": (0.0 + 1.0) / 2,  # problem 1 votes 4 (wrong), problem 2 votes 7 (right)
        }
    )


def test_summarize_skips_problems_without_a_gold_answer():
    assert summarize([[None, None], [True, False]], [["1", "1"], ["2", "3"]]) == {
        "pass@1": 0.5,
        "pass@2": 1.0,
        "maj@2": 1.0,
    }


# ------------------------------------------------------------------------------------------ aha eval


def _eval(*args: str) -> int:
    return main(["eval", *args])


def test_eval_metrics_from_known_completions(tmp_path, tiny_model_dir, monkeypatch):
    """A scripted engine: the metrics must come out as computed by hand, through the real math reward."""
    import rl.evaluate

    scripted = [
        ["\\boxed{23}", "\\boxed{22}", "so \\boxed{22}", "no idea"],  # c=1, majority 22 (wrong)
        ["\\boxed{\\frac{1}{3}}", "\\boxed{\\dfrac{1}{3}}", "<answer>0.5</answer>", "\\boxed{1/3}"],  # c=3
        ["\\boxed{(-2,2)}"] * 4,  # c=4
    ]
    built = {}

    class Scripted:
        shares_policy, batch_size, standalone, summary = True, None, {}, ""  # the engine protocol's

        def __init__(self, **kwargs):
            built.update(kwargs)
            self.next = iter(scripted)

        def generate(self, prompts, params):
            assert params.n == 4 and params.temperature == 0.7 and params.max_new_tokens == 16
            return [
                [
                    Completion([5] * (j + 1), [0.0] * (j + 1), "stop", text)
                    for j, text in enumerate(next(self.next))
                ]
                for _ in prompts
            ]

        def close(self):
            built["closed"] = True

    monkeypatch.setattr(rl.evaluate, "build_engine", lambda name, **kwargs: Scripted(**kwargs))
    out = tmp_path / "out.json"
    code = _eval(
        str(tiny_model_dir), "--data", str(MATH500), "--prompt-key", "problem", "--k", "4",
        "--temperature", "0.7", "--max-new-tokens", "16", "--template", "boxed", "--out", str(out),
    )  # fmt: skip
    assert code == 0 and built["closed"] and built["max_batch_size"] == 64
    result = json.loads(out.read_text())
    assert result["metrics"] == pytest.approx(
        {
            "pass@1": (1 / 4 + 3 / 4 + 1) / 3,
            "pass@2": ((1 - 3 / 6) + 1 + 1) / 3,
            "pass@4": 1.0,
            "maj@4": 2 / 3,
            "len_mean": 2.5,
            "truncated_frac": 0.0,
            "no_answer_frac": 1 / 12,
        }
    )
    first = result["records"][0]
    assert first["correct"] == [True, False, False, False] and first["majority"] == "22"
    assert first["answers"] == ["23", "22", "22", None] and first["gold"] == "23"
    assert result["records"][1]["correct"] == [True, True, False, True]
    assert first["prompt"].startswith(
        "What is the smallest prime greater than $20$?\nPlease reason step by step"
    )


def test_eval_with_vllm_loads_no_policy_and_gives_vllm_the_gpu(tmp_path, tiny_model_dir, monkeypatch):
    """vLLM loads its own copy of the model: only the config is read, and the engine is not colocated."""
    import rl.evaluate

    built = {}

    class Recorder:
        shares_policy, batch_size, standalone, summary = False, None, {}, ""  # the engine protocol's

        def __init__(self, name, **kwargs):
            built.update(kwargs, name=name, calls=0)

        def generate(self, prompts, params):
            built["calls"] += 1
            return [[Completion([5], [0.0], "stop", "\\boxed{23}")] for _ in prompts]

        def close(self):
            pass

    monkeypatch.setattr(rl.evaluate, "build_engine", Recorder)
    args = [
        "--data",
        str(MATH500),
        "--prompt-key",
        "problem",
        "--k",
        "1",
        "--temperature",
        "0",
        "--engine",
        "vllm",
    ]
    assert _eval(str(tiny_model_dir), *args, "--out", str(tmp_path / "o.json")) == 0
    assert built["name"] == "vllm" and built["calls"] == 1  # all problems in one call
    assert (
        not hasattr(built["policy"], "parameters") and built["policy"].config.max_position_embeddings == 512
    )
    assert built["gpu_memory_utilization"] == 0.85 and built["sleep_level"] == 0
    assert built["model_path"] == str(tiny_model_dir)


def test_eval_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "result.json"
    code = _eval(
        str(tiny_model_dir), "--data", str(MATH500), "--prompt-key", "problem", "--k", "2", "--limit", "2",
        "--max-new-tokens", "4", "--temperature", "1.0", "--template", "plain", "--device", "cpu",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert {"model", "data", "split", "problems", "k", "metrics", "settings", "records", "time_s"} <= set(
        result
    )
    assert result["problems"] == 2 and result["k"] == 2 and result["split"] == "test"
    assert set(result["metrics"]) == {
        "pass@1",
        "pass@2",
        "maj@2",
        "len_mean",
        "truncated_frac",
        "no_answer_frac",
    }
    assert result["settings"]["template"] == "plain" and result["settings"]["reward"] == "math"
    assert len(result["records"]) == 2
    for record in result["records"]:
        assert len(record["completions"]) == len(record["correct"]) == len(record["answers"]) == 2
        assert all(n <= 4 for n in record["lengths"])
    flat = [x for r in result["records"] for x in r["correct"]]
    assert result["metrics"]["pass@1"] == pytest.approx(sum(flat) / len(flat))
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "maj@2" in printed and str(out) in printed


def test_eval_of_a_run_directory_uses_its_model_and_settings(tmp_path, tiny_model_dir):
    run = tmp_path / "runs" / "r1"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"data": {"template": "plain"}, "rollout": {"max_new_tokens": 3, "stop": ["</answer>"]}}
        )
    )
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}))
    assert _eval(str(run), "--data", str(data), "--k", "1", "--temperature", "0") == 0
    (written,) = (run / "eval").glob("*.json")
    result = json.loads(written.read_text())
    assert result["model_path"] == str(run / "model")
    assert result["settings"]["max_new_tokens"] == 3 and result["settings"]["stop"] == ["</answer>"]
    assert result["settings"]["template"] == "plain" and result["metrics"].keys() >= {"pass@1", "maj@1"}


def test_eval_refuses_identical_samples(capsys, tiny_model_dir):
    code = _eval(str(tiny_model_dir), "--data", str(MATH500), "--k", "4", "--temperature", "0")
    assert code == 2
    assert "k > 1 samples at temperature 0 are all the same" in capsys.readouterr().err


def test_eval_samples_eight_per_problem_by_default_and_names_its_file_after_model_and_data(
    tmp_path, tiny_model_dir, monkeypatch
):
    import rl.evaluate

    asked = []

    class Recorder:
        shares_policy, batch_size, standalone, summary = True, None, {}, ""  # the engine protocol's

        def __init__(self, name, **kwargs):
            pass

        def generate(self, prompts, params):
            asked.append(params.n)
            return [[Completion([5], [0.0], "stop", "\\boxed{23}")] * params.n for _ in prompts]

        def close(self):
            pass

    monkeypatch.setattr(rl.evaluate, "build_engine", Recorder)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "set.jsonl"
    shutil.copy(MATH500, data)
    assert _eval(str(tiny_model_dir), "--data", str(data), "--prompt-key", "problem") == 0
    assert asked == [8]
    model, source = (rl.evaluate._slug(str(p)) for p in (tiny_model_dir, data))
    assert (tmp_path / f"eval-{model}-{source}-test.json").is_file()
