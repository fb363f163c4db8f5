"""Environments (rollouts/environments.py): one instance per trajectory, stateful multi-turn episodes, their
own rewards, TRL-style tool methods, and failures that end a trajectory but never the run."""

from __future__ import annotations

import json

import pytest

from rewards import RewardScorer, RewardSpec
from rl.config import load_config
from rl.data import PromptSet
from rl.errors import ConfigError
from rl.rollout import generate, resolve_environment, score
from rollouts import Completion, EngineError, SamplingParams
from rollouts.environments import EnvironmentRollout, parse_tool_call, tool_response
from tests import toy_envs
from tests.test_tools import EOS, CharTokenizer

# ------------------------------------------------------------------------------------------- a fake engine


class Scripted:
    """Replays text segments (one per generate row, in order); a segment ends as `stop` when it ends with one
    of the call's stop strings or EOS, and records every prompt it was given."""

    shares_policy, batch_size, standalone, summary = True, None, {}, ""

    def __init__(self, segments: list[str]) -> None:
        self.segments, self.prompts = list(segments), []
        self.tok = CharTokenizer()

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            for _ in range(params.n):
                self.prompts.append(list(p))
                text = self.segments.pop(0)
                ids = [EOS] if text == "<eos>" else self.tok(text)["input_ids"]
                ids = ids[: params.max_new_tokens]
                ended = ids[-1:] == [EOS] or any(text.endswith(s) for s in params.stop)
                out.append(Completion(ids, [-0.5] * len(ids), "stop" if ended else "length", text))
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]


def _prompts(rows: list[dict]) -> PromptSet:
    tok = CharTokenizer()
    texts = [r["prompt"] for r in rows]  # the plain template
    return PromptSet(rows, texts, [tok(t)["input_ids"] for t in texts], ["answer"], tokenizer=tok)


def _rollout(env_class, segments: list[str], rows: list[dict], n: int = 1, **options):
    engine = Scripted(segments)
    rollout = EnvironmentRollout(engine, CharTokenizer(), env_class, options.pop("kwargs", {}), **options)
    params = SamplingParams(n=n, max_new_tokens=400)
    groups = generate(_prompts(rows), rollout, list(range(len(rows))), params)
    return groups, engine


def _inserted_text(t) -> str:
    return CharTokenizer().decode([i for i, m in zip(t.completion_ids, t.inserted or [], strict=False) if m])


# ---------------------------------------------------------------------------------------- the episodes


def test_a_stateful_environment_answers_each_turn_from_its_earlier_turns():
    (group,), engine = _rollout(toy_envs.GuessGame, ["3;", "8;", "6;"], [{"prompt": "1", "answer": "6"}])
    (t,) = group
    assert t.text == "3;[higher, 2 left]8;[lower, 1 left]6;"  # the tries left come from earlier turns
    assert t.turns == 3 and t.tool_calls == 2 and t.error is None
    assert (
        _inserted_text(t) == "[higher, 2 left][lower, 1 left]"
    )  # inserted tokens are marked, out of the loss
    assert [lp for lp, m in zip(t.logprobs, t.inserted, strict=True) if m] == [0.0] * 31
    assert t.env_reward == 1.0 and t.environment.guesses == [3, 8, 6]
    assert engine.prompts[1] == engine.prompts[0] + t.completion_ids[:18]  # continued from the exact tokens


def test_each_trajectory_has_its_own_environment_and_the_episode_ends_when_it_says_so():
    rows = [{"prompt": "1", "answer": "5"}]
    (group,), _ = _rollout(toy_envs.GuessGame, ["5;", "1;", "2;", "3;"], rows, n=2, kwargs={"attempts": 2})
    first, second = group
    assert first.environment is not second.environment
    assert (first.turns, first.env_reward) == (1, 1.0)  # right at once: respond said None, the episode ended
    assert (second.turns, second.env_reward) == (2, 0.0)  # two tries, both wrong: out of attempts
    assert second.text == "1;[higher, 1 left]2;"


def test_async_environment_methods_run_on_the_environments_event_loop():
    (group,), _ = _rollout(toy_envs.AsyncGuessGame, ["3;", "6;"], [{"prompt": "1", "answer": "6"}])
    assert group[0].text == "3;[higher, 2 left]6;" and group[0].env_reward == 1.0


def test_the_turn_limit_ends_an_episode_without_an_error():
    (group,), _ = _rollout(toy_envs.GuessGame, ["1;", "2;"], [{"prompt": "1", "answer": "6"}], max_turns=2)
    assert group[0].turns == 2 and group[0].error is None


def test_reset_text_is_appended_to_each_trajectory_s_own_question():
    toy_envs.Hinted.count = 0
    rows = [{"prompt": "1", "answer": "6"}]
    (group,), engine = _rollout(toy_envs.Hinted, ["6;", "6;"], rows, n=2)
    tok = CharTokenizer()
    assert [tok.decode(t.prompt_ids) for t in group] == ["1 (hint 1)", "1 (hint 2)"]
    assert engine.prompts == [t.prompt_ids for t in group]  # each sampled from its own prompt


@pytest.mark.parametrize(
    "env_class, expected",
    [
        (toy_envs.RaisesInRespond, "ValueError: the game broke"),
        (toy_envs.HangsInRespond, "respond took over 0.5 s"),
        (toy_envs.AnswersNonsense, "respond returned int, not text or None"),
        (toy_envs.RaisesInReset, "KeyError"),
        (toy_envs.RaisesInReward, "get_reward: RuntimeError: scoreboard down"),
    ],
)
def test_an_environment_that_raises_hangs_or_answers_nonsense_ends_its_trajectory_as_an_error(
    env_class, expected
):
    rows = [{"prompt": "1", "answer": "6"}]
    (group,), _ = _rollout(env_class, ["3;", "4;", "5;"], rows, timeout_s=0.5)
    (t,) = group
    assert t.error is not None and expected in t.error, t.error
    with RewardScorer([RewardSpec("environment")]) as scorer:
        score(scorer, group, ["answer"])
    assert not t.scored and t.scores == {"environment": None}  # unscored: the run goes on without it


def test_a_trl_style_environment_runs_with_its_public_methods_as_tools():
    call = '<tool_call>{"name": "increment", "arguments": {"a": 2}}</tool_call>'
    bad = ['<tool_call>{"name": "increment", "arguments": {"a": 2}</tool_call>',
           '<tool_call>{"name": "decrement", "arguments": {}}</tool_call>',
           '<tool_call>{"name": "increment", "arguments": {"b": 1}}</tool_call>']  # fmt: skip
    segments = [call, call, *bad, "done<eos>"]
    (group,), _ = _rollout(toy_envs.Counter, segments, [{"prompt": "1", "answer": "0"}], max_turns=8)
    (t,) = group
    responses = _inserted_text(t).split("</tool_response>")
    assert "\n2\n" in responses[0] and "\n4\n" in responses[1]  # state kept across calls
    assert "not JSON" in responses[2] and "unknown tool 'decrement'" in responses[3]
    assert "TypeError" in responses[4]  # wrong arguments: an error observation the model reads
    assert (t.tool_calls, t.tool_errors, t.turns, t.error) == (5, 3, 6, None)


def test_an_async_tool_called_with_wrong_arguments_is_an_error_observation_not_a_crash():
    calls = ['<tool_call>{"name": "increment", "arguments": {"b": 1}}</tool_call>',
             '<tool_call>{"name": "increment", "arguments": {"a": 3}}</tool_call>', "done<eos>"]  # fmt: skip
    (group,), _ = _rollout(toy_envs.AsyncCounter, calls, [{"prompt": "1", "answer": "0"}], max_turns=8)
    responses = _inserted_text(group[0]).split("</tool_response>")
    assert "TypeError" in responses[0] and "\n3\n" in responses[1]
    assert (group[0].tool_calls, group[0].tool_errors) == (2, 1)


def test_an_environment_with_tools_and_replies_formats_each_as_its_kind():
    call = '<tool_call>{"name": "increment", "arguments": {"a": 2}}</tool_call>'
    (group,), _ = _rollout(toy_envs.CounterWithFeedback, [call, "5;", "6;"], [{"prompt": "1", "answer": "0"}])
    assert _inserted_text(group[0]) == "\n<tool_response>\n2\n</tool_response>\n[again]"
    assert group[0].turns == 3


def test_tool_calls_are_parsed_as_the_qwen_chat_format_writes_them():
    assert parse_tool_call('x <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>') == (
        "f",
        {"a": 1},
    )
    assert parse_tool_call('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>') == (
        "f",
        {"a": 1},
    )
    assert "not JSON" in parse_tool_call("<tool_call>{name: f}</tool_call>")
    assert "name" in parse_tool_call('<tool_call>["f"]</tool_call>')


def test_a_tool_response_follows_the_chat_template_of_the_model(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        assert tool_response(tokenizer, "42") == "<|end|><|tool|>42<|end|><|assistant|>"
    finally:
        tokenizer.chat_template = None
    assert tool_response(tokenizer, "42") == "\n<tool_response>\n42\n</tool_response>\n"


def test_environment_reward_scores_with_the_others_and_reward_functions_receive_the_environments():
    rows = [{"prompt": "1", "answer": "6"}]
    (group,), _ = _rollout(toy_envs.GuessGame, ["6;", "2;", "3;", "4;"], rows, n=2)

    def seen(prompts, completions, environments, **columns):
        return [float(len(e.guesses)) for e in environments]

    from rewards import registry

    registry.register_reward("test_env_seen")(seen)
    try:
        with RewardScorer([RewardSpec("environment"), RewardSpec("test_env_seen", weight=0.1)]) as scorer:
            result = score(scorer, group, ["answer"])
    finally:
        registry._REGISTRY.pop("test_env_seen")
    assert [t.scores for t in group] == [{"environment": 1.0, "test_env_seen": 1.0},
                                         {"environment": 0.0, "test_env_seen": 3.0}]  # fmt: skip
    assert [t.reward for t in group] == pytest.approx([1.1, 0.3])
    assert result.metrics["reward/environment/mean"] == 0.5


# ------------------------------------------------------------------------------------------ configuration


def test_an_environment_is_named_by_import_path_and_refused_where_it_cannot_run():
    assert resolve_environment("tests.toy_envs:GuessGame") is toy_envs.GuessGame
    with pytest.raises(EngineError, match="no reset method"):
        resolve_environment("tests.test_environments:_tok")
    with pytest.raises(ConfigError, match="module:Class"):
        load_config(None, ["environment.name=GuessGame"])
    with pytest.raises(ConfigError, match="asynchronous rollouts"):
        load_config(None, ["environment.name=tests.toy_envs:GuessGame", "rollout.max_staleness=1"])
    with pytest.raises(ConfigError, match="public methods are its tools"):
        load_config(None, ["environment.name=tests.toy_envs:Counter", "tools.use=[{name: calculator}]"])


def test_training_with_an_environment_logs_its_turns_and_reward(tmp_path, tiny_model_dir, toy_data):
    from rl.train import train

    config = load_config(
        None,
        [
            f"model.path={tiny_model_dir}", f"data.source={toy_data}", "rollout.group_size=4",
            "rollout.max_new_tokens=12", "train.steps=2", "train.prompts_per_step=2", "eval.size=0",
            "rewards=[{name: 'tests.toy_rewards:letter_a'}]", "environment.name=tests.toy_envs:Chatter",
            "environment.max_turns=3", f"run.dir={tmp_path}", "track.console=quiet", "track.tensorboard=false",
            "track.dashboard=false", "track.samples_every=1",
        ],
    )  # fmt: skip
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 1 <= row["env/turns_mean"] <= 3 and row["env/error_frac"] == 0.0
        assert "reward/environment/mean" in row  # get_reward joined the recipe's rewards by itself
    assert any(r["env/turns_max"] > 1 for r in rows), rows  # some episodes went on after a reply


# ------------------------------------------------------------------------------------- vLLM, on the CPU


@pytest.fixture(scope="module")
def vllm_engine(tmp_path_factory):
    from tests.test_vllm_engine import _require_vllm, load, make_engine, save_model

    _require_vllm()
    model_dir = save_model(tmp_path_factory.mktemp("vllm-env"))
    engine = make_engine(model_dir, load(model_dir), _tok())
    yield engine, model_dir
    engine.close()


def _tok():
    from tests.conftest import build_tokenizer

    return build_tokenizer()


def test_an_environment_s_episodes_are_the_same_on_vllm_and_the_transformers_engine(vllm_engine):
    """Greedy episodes of a stateful environment on both engines: the same tokens, inserted-token masks and
    turns; the log-probs equal within the engines' float32 tolerance."""
    import torch

    from rollouts.hf_engine import TransformersEngine
    from tests.test_vllm_engine import FP32_TOLERANCE, _prompt_ids, load, perturb

    engine, model_dir = vllm_engine
    tok = _tok()
    policy = perturb(load(model_dir), 0.3, seed=3)
    engine.update_weights(policy)
    params = SamplingParams(n=1, max_new_tokens=24, temperature=0.0)
    prompts = _prompt_ids(tok)
    rows = [{} for _ in prompts]
    got, want = (
        EnvironmentRollout(e, tok, toy_envs.Echo)
        .sample(prompts, rows, params, lambda row, text: [])
        .completions
        for e in (engine, TransformersEngine(policy, tok))
    )
    for g, w in zip(got, want, strict=True):
        assert (g.token_ids, g.tool_mask, g.tool_calls, g.finish_reason) == (
            w.token_ids, w.tool_mask, w.tool_calls, w.finish_reason,
        )  # fmt: skip
        torch.testing.assert_close(
            torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=FP32_TOLERANCE, rtol=0
        )
    assert any(c.tool_calls == 2 for c in got)  # some episodes ran all three turns


# ------------------------------------------------------------------ tools: in the function-calling format


def test_tools_in_the_json_format_are_called_with_their_options_and_the_row_s_columns():
    from rl.rollout import ToolsEnvironment
    from rollouts.tools import Toolbox, calculator

    def lookup(call: str, answer: str, **columns) -> str:
        return f"{call}={answer}"

    toolbox = Toolbox({"calculator": calculator, "lookup": lookup}, timeout_s=5)
    calls = ['<tool_call>{"name": "calculator", "arguments": {"call": "2+3"}}</tool_call>',
             '<tool_call>{"name": "lookup", "arguments": {"call": "x"}}</tool_call>',
             '<tool_call>{"name": "lookup", "arguments": {"code": "x"}}</tool_call>', "ok<eos>"]  # fmt: skip
    (group,), _ = _rollout(lambda: ToolsEnvironment(toolbox), calls, [{"prompt": "1", "answer": "7"}])
    responses = _inserted_text(group[0]).split("</tool_response>")
    assert "\n5\n" in responses[0] and "\nx=7\n" in responses[1]  # the row's answer column reached the tool
    assert "takes one argument, 'call'" in responses[2]  # wrong arguments: an error observation
    assert (group[0].tool_calls, group[0].tool_errors) == (3, 1)


def test_a_chat_template_renders_the_tools_the_model_may_call(tokenizer):
    from rl.rollout import prompt_tools
    from rl.templates import apply_template

    tokenizer.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }}({{ t.function.parameters.required"
        " | join(',') }});{% endfor %}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    try:
        env_tools = prompt_tools(load_config(None, ["environment.name=tests.toy_envs:Counter"]))
        assert apply_template("chat", "Q", tokenizer, env_tools) == "TOOLS:increment(a);Q"  # TRL's schema
        json_tools = load_config(None, ["tools.use=[{name: calculator}]", "tools.format=json"])
        assert apply_template("chat", "Q", tokenizer, prompt_tools(json_tools)) == "TOOLS:calculator(call);Q"
        assert prompt_tools(load_config(None, ["tools.use=[{name: calculator}]"])) is None  # markers: none
    finally:
        tokenizer.chat_template = None
