"""The evaluation suite (`aha eval --suite`), a run's held-out set (`aha eval RUN_DIR`) and eval.suite in a run,
on local files in the Qwen2.5-Math evaluation layout built here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rl.cli import SUITE_NAMES, main
from rl.config import SUITE_BENCHMARKS, ConfigError, config_yaml, load_config
from rl.datasets import load_preset
from rl.errors import AhaError
from rl.suite import BENCHMARKS, SUITES, SuiteOptions, benchmark_rows, suite_plan
from rollouts import Completion

# One problem per benchmark in the fields Qwen2.5-Math's evaluation/data/<name>/test.jsonl uses (its
# parse_question / parse_ground_truth), with the gold answer each should read as.
QWEN_LAYOUT = {
    "aime24": (
        {"id": "60", "problem": "Find 200+4.", "solution": "...", "answer": "204", "url": "u", "question": "Find 200+4."},
        "204",
    ),
    "aime25": ({"problem": "Find 70.", "answer": 70, "id": "0"}, "70"),
    "amc23": ({"id": "0", "problem": "Find 27.", "answer": 27.0, "url": "u", "question": "Find 27."}, "27"),
    "math500": (
        {"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}", "subject": "Algebra",
         "level": 2, "unique_id": "test/algebra/1.json"},
        "\\frac{1}{2}",
    ),
    "minerva_math": (
        {"problem": "Diameter?", "solution": "$s=\\boxed{1.6} \\mathrm{~cm}$", "type": "Astronomy", "idx": "0"},
        "1.6",
    ),
    "olympiadbench": (
        {"id": "1606", "question": "Moves?", "solution": ["..."], "final_answer": ["$2^{1009}$"],
         "is_multiple_answer": False, "unit": None, "answer_type": "Numerical", "context": None},
        "2^{1009}",
    ),
    "gsm8k": ({"question": "Eggs?", "answer": "16 - 3 = <<16-3=13>>13\n#### 1,013", "idx": "0"}, "1013"),
}  # fmt: skip


def write_layout(root: Path, rows: dict[str, list[dict]]) -> Path:
    """DIR/<benchmark>/test.jsonl, one JSON object a line."""
    for name, items in rows.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return root


def arithmetic_layout(root: Path, per_benchmark: int = 2) -> Path:
    """A few sums in each benchmark's field format (the question and gold fields of QWEN_LAYOUT's rows)."""
    rows = {}
    for b, (name, (example, _)) in enumerate(QWEN_LAYOUT.items()):
        rows[name] = []
        for i in range(per_benchmark):
            terms = [10 + b, 20 + i, 30, 40, 50, 60]
            question, total = "+".join(map(str, terms)) + "=", sum(terms)
            row = {**example, **{k: question for k in ("question", "problem") if k in example}}
            row.update(_gold_fields(name, total))
            rows[name].append(row)
    return write_layout(root, rows)


def _gold_fields(name: str, total: int) -> dict:
    if name == "gsm8k":
        return {"answer": f"Add them.\n#### {total}"}
    if name == "olympiadbench":
        return {"final_answer": [f"${total}$"]}
    if name == "minerva_math":
        return {"solution": f"The sum is $\\boxed{{{total}}}$."}
    return {"answer": str(total)}


# ------------------------------------------------------------------------------------------- the data


def test_local_copies_are_read_with_each_benchmark_s_own_fields(tmp_path):
    root = write_layout(tmp_path, {name: [row] for name, (row, _) in QWEN_LAYOUT.items()})
    for name, (row, gold) in QWEN_LAYOUT.items():
        (read,) = benchmark_rows(name, str(root))
        assert read == {"prompt": row.get("question") or row["problem"], "answer": gold}, name


def test_a_yes_no_answer_is_asked_as_qwen2_5_math_asks_it(tmp_path):
    root = write_layout(tmp_path, {"aime24": [{"problem": "Is 7 prime?", "answer": "Yes"}]})
    assert benchmark_rows("aime24", str(root)) == [{"prompt": "Is 7 prime? (Yes or No)", "answer": "Yes"}]


def test_rows_without_a_gold_answer_are_left_out_and_limit_keeps_the_first(tmp_path):
    rows = [{"question": "a", "answer": "no hashes"}] + [
        {"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)
    ]
    root = write_layout(tmp_path, {"gsm8k": rows})
    assert [r["answer"] for r in benchmark_rows("gsm8k", str(root), limit=2)] == ["0", "1"]


def test_the_new_hub_presets_normalise_their_rows(tmp_path):
    """aime25, minerva_math and olympiadbench from files in the hub datasets' own schemas."""
    hub = {
        "aime25": [{"problem": "Find 70.", "answer": 70, "id": "0"}],
        "minerva_math": [{"question": "Diameter?", "answer": "1.6"}],
        "olympiadbench": [{"question": "Moves?", "final_answer": ["$2$"], "id": 1606}],
    }
    for name, rows in hub.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (row,) = load_preset(name, "test", data_files=str(path))
        assert row == {"prompt": rows[0].get("question") or rows[0]["problem"], "answer": {"aime25": "70",
                       "minerva_math": "1.6", "olympiadbench": "2"}[name]}  # fmt: skip


def test_the_suite_s_names_agree_across_config_cli_and_suite():
    assert tuple(BENCHMARKS) == SUITE_BENCHMARKS
    assert tuple(SUITES) == SUITE_NAMES


# ------------------------------------------------------------------------------------------ the plan


def test_each_benchmark_has_its_own_k_and_every_k_can_be_overridden():
    plan = suite_plan(SuiteOptions(model="m"))
    assert plan == {"aime24": 32, "aime25": 32, "amc23": 32, "math500": 4, "minerva_math": 4,
                    "olympiadbench": 4, "gsm8k": 4}  # fmt: skip
    assert set(suite_plan(SuiteOptions(model="m", k=8)).values()) == {8}
    chosen = SuiteOptions(model="m", benchmark=["gsm8k", "aime24"], k_for=["aime24=64"])
    assert suite_plan(chosen) == {"aime24": 64, "gsm8k": 4}  # in the suite's order


@pytest.mark.parametrize(
    "options, message",
    [
        ({"benchmark": ["aime"]}, "not in the reasoning suite"),
        ({"k_for": ["aime24"]}, "give NAME=K"),
        ({"k_for": ["mmlu=4"]}, "give NAME=K"),
        ({"temperature": 0.0}, "k > 1 samples at temperature 0 are all the same"),
        ({"suite": "coding"}, "unknown suite"),
    ],
)
def test_a_bad_plan_is_refused_before_anything_loads(options, message):
    with pytest.raises(AhaError, match=message):
        suite_plan(SuiteOptions(model="m", **options))


# ---------------------------------------------------------------------------------------- the command


class Scripted:
    """An engine that answers every prompt with the same completions; records the sample counts asked for."""

    shares_policy, batch_size, standalone, summary = True, None, {}, ""

    def __init__(self, texts: list[str], **kwargs) -> None:
        self.texts, self.ns, self.closed = texts, [], False

    def generate(self, prompts, params):
        self.ns.append(params.n)
        assert params.temperature == 0.6 and params.top_p == 0.95  # DeepSeek-R1's sampling, the defaults
        texts = (self.texts * params.n)[: params.n]
        return [[Completion([5] * (j + 1), [0.0] * (j + 1), "length" if j == 0 else "stop", t)
                 for j, t in enumerate(texts)] for _ in prompts]  # fmt: skip

    def close(self):
        self.closed = True


def test_the_suite_s_table_from_known_completions(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Every benchmark answers 204 (right only for aime24) then 5: the table's figures as computed by hand."""
    import rl.evaluate

    engines = []
    monkeypatch.setattr(rl.evaluate, "build_engine", lambda name, **kw: engines.append(Scripted(
        ["\\boxed{204}", "\\boxed{5}", "</think> \\boxed{204}", "no answer"], **kw)) or engines[-1])  # fmt: skip
    root = write_layout(tmp_path / "data", {name: [row] for name, (row, _) in QWEN_LAYOUT.items()})
    out = tmp_path / "suite.json"
    code = main(["eval", str(tiny_model_dir), "--suite", "reasoning", "--data-dir", str(root), "--template",
                 "plain", "--k-for", "math500=8", "--out", str(out)])  # fmt: skip
    assert code == 0 and len(engines) == 1 and engines[0].closed  # one engine for the whole suite
    assert engines[0].ns == [32, 32, 32, 8, 4, 4, 4]
    result = json.loads(out.read_text())
    aime = result["benchmarks"]["aime24"]
    assert aime["problems"] == 1 and aime["k"] == 32
    # 32 samples cycling 204, 5, </think> 204, none: 16 right; the majority (204, 16 votes) is right
    assert aime["metrics"]["pass@1"] == pytest.approx(0.5) and aime["metrics"]["pass@32"] == 1.0
    assert aime["metrics"]["maj@32"] == 1.0 and aime["metrics"]["truncated_frac"] == pytest.approx(1 / 32)
    assert result["benchmarks"]["gsm8k"]["metrics"]["pass@1"] == 0.0  # its gold is 1013
    assert result["skipped"] == {} and result["average_avg@k"] == pytest.approx(0.5 / 7)
    samples = [json.loads(line) for line in Path(result["samples"]).read_text().splitlines()]
    assert [s["benchmark"] for s in samples] == list(BENCHMARKS)
    assert samples[0]["gold"] == "204" and len(samples[0]["completions"]) == 32
    printed = capsys.readouterr().out
    for header in ("benchmark", "problems", "avg@k (pass@1)", "pass@k", "maj@k", "mean length", "truncated"):
        assert header in printed
    assert "aime24" in printed and "50.0" in printed and str(out) in printed


def test_a_missing_or_broken_benchmark_is_skipped_with_one_line(tmp_path, tiny_model_dir, capsys):
    root = arithmetic_layout(tmp_path / "data")
    shutil.rmtree(root / "aime25")
    (root / "amc23" / "test.jsonl").write_text('{"question": "1+1=", "answer": 2}\n{"question": oops}\n')
    code = main(["eval", str(tiny_model_dir), "--suite", "reasoning", "--data-dir", str(root), "--template",
                 "plain", "--k", "2", "--max-new-tokens", "3", "--device", "cpu",
                 "--out", str(tmp_path / "s.json")])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    skips = [line for line in captured.err.splitlines() if "skipping" in line]
    assert len(skips) == 2
    assert "aime25" in skips[0] and "not found" in skips[0]
    assert "amc23" in skips[1] and "line 2" in skips[1]
    result = json.loads((tmp_path / "s.json").read_text())
    assert list(result["benchmarks"]) == ["aime24", "math500", "minerva_math", "olympiadbench", "gsm8k"]
    assert set(result["skipped"]) == {"aime25", "amc23"}


def test_no_benchmark_at_all_is_an_error_not_a_traceback(tmp_path, tiny_model_dir, capsys):
    code = main(["eval", str(tiny_model_dir), "--suite", "reasoning", "--data-dir", str(tmp_path / "none")])
    assert code == 2 and "no benchmark of the reasoning suite could be loaded" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "math500", "--suite", "reasoning"], "--data and --suite are alternatives"),
        (["--data", "math500", "--data-dir", "x"], "--data-dir go(es) with --suite"),
        ([], "name the data to evaluate on with --data"),
    ],
)
def test_eval_flags_that_do_not_go_together(args, message, tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_the_suite_runs_the_shipped_tiny_model_on_arithmetic(tmp_path, capsys):
    """aha-tiny on sums written in every benchmark's format: it answers most of them (docs/tiny-model.md)."""
    root = arithmetic_layout(tmp_path / "data", per_benchmark=3)
    code = main(["eval", "aha-tiny", "--suite", "reasoning", "--data-dir", str(root), "--template", "plain",
                 "--limit", "2", "--k", "4", "--max-new-tokens", "64", "--device", "cpu",
                 "--out", str(tmp_path / "tiny.json")])  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert all(r["problems"] == 2 and r["problems_unscored"] == 0 for r in result["benchmarks"].values())
    assert result["average_avg@k"] > 0.0  # graded: some sums are right in every benchmark's format


# ------------------------------------------------------------------------------ a run's held-out set


def _run_dir(tmp_path: Path, model_dir: Path, *overrides: str) -> Path:
    """A run directory as training leaves it: RUN/model and RUN/config.yaml."""
    config = load_config(None, [f"model.path={model_dir}", "data.source=builtin:arithmetic", "data.limit=300",
                                "data.template=plain", "eval.size=6", *overrides])  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    (run / "config.yaml").write_text(config_yaml(config))
    return run


def test_a_run_directory_without_data_is_evaluated_on_its_own_held_out_set(tmp_path, tiny_model_dir):
    from rl.data import PromptSet
    from rl.run import _load_data

    run = _run_dir(tmp_path, tiny_model_dir)
    code = main(
        ["eval", str(run), "--k", "1", "--temperature", "0", "--max-new-tokens", "3", "--device", "cpu"]
    )
    assert code == 0
    result = json.loads((run / "eval" / "held-out-test.json").read_text())
    assert result["data"] == "held-out" and result["problems"] == 6
    config = load_config(run / "config.yaml")
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(run / "model")
    train_set, eval_set = _load_data(config, tokenizer)  # as the run built it
    assert [r["prompt"] for r in result["records"]] == eval_set.texts
    assert not set(eval_set.texts) & set(PromptSet.load(config.data, tokenizer).texts)


def test_the_held_out_set_is_rebuilt_as_the_run_builds_it(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from rl.evaluate import train_and_held_out
    from rl.run import _load_data

    config = load_config(None, [f"model.path={tiny_model_dir}", "data.source=builtin:arithmetic",
                                "data.limit=200", "eval.size=10", "data.template=plain"])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours, theirs = train_and_held_out(config, tokenizer), _load_data(config, tokenizer)
    assert [s.texts for s in ours] == [s.texts for s in theirs]


def test_a_run_without_a_held_out_set_asks_for_data(tmp_path, tiny_model_dir, capsys):
    run = _run_dir(tmp_path, tiny_model_dir, "eval.size=0")
    assert main(["eval", str(run), "--k", "1", "--temperature", "0"]) == 2
    assert "the run has no held-out set (eval.size=0)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ eval.suite in a run


def test_eval_suite_is_validated():
    assert load_config(None, []).eval.suite == []  # off by default: the default run is unchanged
    with pytest.raises(ConfigError, match="unknown benchmark"):
        load_config(None, ["eval.suite=[aime]"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["eval.suite=[aime24, aime24]"])
    with pytest.raises(ConfigError, match="suite_limit"):
        load_config(None, ["eval.suite_limit=0"])


def test_a_run_logs_accuracy_curves_of_its_suite_benchmarks(tmp_path, tiny_model_dir):
    from rl.train import train

    root = arithmetic_layout(tmp_path / "data", per_benchmark=3)
    config = load_config(None, [
        f"model.path={tiny_model_dir}", "data.source=builtin:arithmetic", "data.limit=50", "data.template=plain",
        "rewards=[{name: math}]", "train.steps=2", "train.prompts_per_step=2", "train.micro_batch_size=4",
        "rollout.group_size=2", "rollout.max_new_tokens=4", f"run.dir={tmp_path / 'runs'}", "run.name=s",
        "run.save_model=false", "track.console=quiet", "track.dashboard=false", "eval.size=2", "eval.every=1",
        "eval.suite=[aime24, gsm8k]", f"eval.suite_dir={root}", "eval.suite_limit=2",
    ])  # fmt: skip
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "eval/aime24/accuracy" in r]
    assert [r["step"] for r in evaluated] == [0, 1, 2]  # before training, then every step
    for row in evaluated:
        assert 0.0 <= row["eval/gsm8k/accuracy"] <= 1.0 and row["eval/aime24/len_mean"] <= 4
        assert "eval/gsm8k/truncated_frac" in row and "eval/accuracy" in row  # beside the held-out set
