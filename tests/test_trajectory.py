"""The trajectory as the unit of the rollout path: one record per sample, from the row to a checkpoint."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

from rewards import RewardScorer, RewardSpec
from rl.data import PromptSet
from rl.rollout import generate, score
from rl.schedule import _restore, _Sampled, _saved
from rl.trajectory import Trajectory
from rollouts import SamplingParams
from rollouts.multiturn import ToolRollout
from rollouts.tools import Toolbox
from tests.test_tools import (
    CALL_END,
    CALL_START,
    EOS,
    MARKERS,
    OUT_END,
    OUT_START,
    CharTokenizer,
    Scripted,
    _digits,
)

REPO = Path(__file__).resolve().parent.parent


def _every_field_set() -> Trajectory:
    """A trajectory whose every field differs from its default: tool-inserted tokens, a version, scores."""
    return Trajectory(
        group=3, prompt_ids=[5, 6], completion_ids=[7, 8, 9, 10], logprobs=[-0.5, 0.0, 0.0, -1.25],
        advantage=-0.75, trainable=True, inserted=[False, True, True, False], row_index=12,
        row={"prompt": "1+2", "answer": "3", "tests": ["assert f() == 3"]}, prompt="Q: 1+2", text="<c>x</c>3",
        finish_reason="length", version=4, scores={"math": 1.0, "format": None}, reward=1.0, correct=True,
        turns=2, tool_calls=1, tool_errors=1, error="ValueError: no", env_reward=0.5,
    )  # fmt: skip


def test_a_checkpoint_s_in_flight_trajectories_round_trip_every_field():
    original = _every_field_set()
    defaults = Trajectory(0, [], [], [])
    saved_fields = set(original.to_dict())
    assert saved_fields == {f.name for f in dataclasses.fields(Trajectory)} - {
        "environment"
    }  # live state only
    assert all(getattr(original, f) != getattr(defaults, f) for f in saved_fields)  # every field counts
    saved = json.loads(json.dumps(_saved(7, _Sampled([[original]], 0.5))))  # as state.json holds it
    assert saved["step"] == 7
    (restored,), *_ = _restore(saved, prompts=None).groups
    assert restored == original
    assert restored.inserted == [False, True, True, False]  # the tool mask a checkpoint once dropped


class _Rows:
    """Two rows with the same prompt text and different answers."""

    def __init__(self) -> None:
        self.prompts = PromptSet(
            rows=[{"prompt": "same", "answer": "11"}, {"prompt": "same", "answer": "22"}],
            texts=["same", "same"], ids=[[7, 8], [7, 8]], columns=["answer"],
        )  # fmt: skip


def _answer_tool(call: str, answer: str, **columns) -> str:
    return answer


def test_rows_that_share_a_prompt_reach_their_own_tool_calls():
    call = [CALL_START, *_digits("?"), CALL_END]
    engine = Scripted([call, call, [*_digits("1"), EOS], [*_digits("2"), EOS]])
    rollout = ToolRollout(engine, CharTokenizer(), Toolbox({"t": _answer_tool}), MARKERS, 1)
    groups = generate(_Rows().prompts, rollout, [0, 1], SamplingParams(n=1, max_new_tokens=20))
    observed = [t.completion_ids[len(call) : len(call) + 4] for g in groups for t in g]
    assert observed == [[OUT_START, *_digits("11"), OUT_END], [OUT_START, *_digits("22"), OUT_END]]
    assert [g[0].row["answer"] for g in groups] == ["11", "22"]
    assert [g[0].turns for g in groups] == [2, 2] and groups[0][0].inserted[len(call)] is True


def test_scoring_fills_each_trajectory_s_scores_total_and_verdict():
    prompts = _Rows().prompts
    trajectories = [
        Trajectory(0, [7, 8], [1], [0.0], row=prompts.rows[i], prompt="same", text=text)
        for i, text in enumerate(["<answer>11</answer>", "<answer>11</answer>"])
    ]
    with RewardScorer([RewardSpec("math")]) as scorer:
        score(scorer, trajectories, prompts.columns)
    assert [t.scores for t in trajectories] == [{"math": 1.0}, {"math": 0.0}]  # each against its own row
    assert [(t.reward, t.correct) for t in trajectories] == [(1.0, True), (0.0, False)]


def _imports(path: Path) -> set[str]:
    """The project modules a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.split(".")[0] in ("rl", "rewards", "rollouts")}


def test_no_import_cycle_among_the_project_s_modules():
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for package in ("rl", "rewards", "rollouts")
        for p in (REPO / package).rglob("*.py")
    }
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # packages' __init__ re-export their modules: an import of the package is an import of what it imports
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, module, nxt])
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_each_engine_batch_is_scored_while_the_next_is_generated():
    import threading

    from rewards import registry
    from rl.rollout import sample_and_score
    from rollouts import Completion, SamplingParams

    first_scored = threading.Event()

    class TwoBatches:  # an engine that decodes two prompts at a time, as the transformers engine batches
        shares_policy, batch_size, standalone, summary = True, 2, {}, ""

        def __init__(self) -> None:
            self.calls = 0

        def generate(self, prompts, params):
            self.calls += 1
            if self.calls == 2:  # the first batch's groups must have been scored by now
                assert first_scored.wait(10), "the first batch was not scored beside generation"
            return [[Completion([1], [0.0], "stop", "<answer>11</answer>")] for _ in prompts]

    def marks(prompts, completions, **columns):
        first_scored.set()
        return [float(len(completions))] * len(completions)

    registry.register_reward("test_marks_parts")(marks)
    prompts = PromptSet(
        [{"prompt": "q", "answer": a} for a in ("11", "22", "11", "22")], ["q"] * 4, [[7]] * 4, ["answer"]
    )
    try:
        with RewardScorer([RewardSpec("math"), RewardSpec("test_marks_parts", weight=0.0)]) as scorer:
            rollout = sample_and_score(
                prompts, TwoBatches(), scorer, [0, 1, 2, 3], SamplingParams(n=1, max_new_tokens=4), per_call=2,
                overlap=True,
            )  # fmt: skip
    finally:
        registry._REGISTRY.pop("test_marks_parts")
    assert [t.scores["test_marks_parts"] for t in rollout.trajectories] == [
        2.0
    ] * 4  # called per engine batch
    assert [t.correct for t in rollout.trajectories] == [True, False, True, False]  # each with its own row
    assert rollout.scores.per_function["math"] == [1.0, 0.0, 1.0, 0.0]
