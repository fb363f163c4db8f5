"""Tool calls in rollouts: the calculator, running calls safely, multi-turn rollouts exact to the token, and the
update leaving tool-inserted tokens out."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from rollouts.base import Completion, SamplingParams
from rollouts.multiturn import Markers, ToolRollout
from rollouts.tools import Toolbox, ToolError, calculator, resolve_tool


# ------------------------------------------------------------------------------------------- calculator
@pytest.mark.parametrize(
    "call, value",
    [("12345+6789+54321", "73455"), (" (2+3)*4 ", "20"), ("7/2", "3.5"), ("2**10", "1024"), ("-3+1", "-2")],
)
def test_calculator_does_arithmetic(call, value):
    assert calculator(call) == value


@pytest.mark.parametrize(
    "call", ["__import__('os').system('true')", "x + 1", "print(1)", "2**1000000", "[1]*9"]
)
def test_calculator_refuses_everything_but_arithmetic(call):
    with pytest.raises((ValueError, SyntaxError)):
        calculator(call)


def test_unknown_tools_are_clear_errors():
    with pytest.raises(ToolError, match="unknown tool 'calc'; built-in tools: calculator, python"):
        resolve_tool("calc")
    assert resolve_tool("tests.test_tools:echo") is echo


def echo(call: str, **columns) -> str:
    """A user tool (`tests.test_tools:echo`): the call and the row's answer column."""
    return f"{call}|{columns.get('answer')}"


# ------------------------------------------------------------------------------------------ running calls
def _raises(call: str, **columns) -> str:
    raise RuntimeError("boom")


def _not_text(call: str, **columns) -> int:
    return 42


def _hangs(call: str, **columns) -> str:
    time.sleep(30)
    return "late"


@pytest.mark.parametrize(
    "fn, expected",
    [
        (_raises, "error: RuntimeError: boom"),
        (_not_text, "error: the t tool returned int, not text"),
        (_hangs, "error: the t tool took over 0.5 s"),
    ],
)
def test_a_failing_tool_is_an_error_observation_and_never_stops_the_run(fn, expected):
    toolbox = Toolbox({"t": fn}, timeout_s=0.5)
    (observation,) = toolbox.run_calls([("x", {})])
    assert observation.text == expected and observation.error


def test_long_observations_are_cut_and_columns_reach_the_tool():
    toolbox = Toolbox({"echo": echo}, max_chars=8)
    (observation,) = toolbox.run_calls([("abcdef", {"answer": "42"})])
    assert observation.text == "abcdef|4..." and not observation.error


HOSTILE = {
    "fork bomb": "import os\nwhile True: os.fork()",
    "memory bomb": "x = bytearray(1 << 40)",
    "infinite loop": "while True: pass",
    "write outside": "open('/etc/aha-escape', 'w').write('x')",
    "network": "import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)",
    "huge output": "print('x' * (1 << 25))",
    "signals": "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_through_the_python_tool_are_contained(name):
    pytest.importorskip("rewards.sandbox")
    from rewards.sandbox import bwrap_path

    if bwrap_path() is None:
        pytest.skip("bubblewrap is not installed (CI installs it)")
    toolbox = Toolbox({"python": resolve_tool("python")}, {"python": {"timeout_s": 3}}, timeout_s=30)
    (observation,) = toolbox.run_calls([(HOSTILE[name], {})])
    assert isinstance(observation.text, str)  # the call came back as an observation; this process lives on
    assert not Path("/etc/aha-escape").exists()
    if name in ("infinite loop", "fork bomb"):
        assert "error" in observation.text or "Error" in observation.text


# ------------------------------------------------------------------------------------- multi-turn rollouts
class Scripted:
    """An engine that replays token segments and records every prompt it was given, exactly."""

    shares_policy, batch_size, standalone, summary = True, None, {}, ""

    def __init__(self, segments: list[list[int]]) -> None:
        self.segments, self.prompts = list(segments), []

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            self.prompts.append(list(p))
            ids = self.segments.pop(0)[: params.max_new_tokens]
            finish = "stop" if ids and ids[-1] in (CALL_END, EOS) else "length"
            out.append([Completion(ids, [-0.5] * len(ids), finish, "")])
        return out


class CharTokenizer:
    """Token i is chr(i + 32) except the markers; encoding the observation is what the rollout does."""

    def decode(self, ids, skip_special_tokens=False):
        names = {CALL_START: "<c>", CALL_END: "</c>", OUT_START: "<o>", OUT_END: "</o>", EOS: ""}
        return "".join(names.get(i, chr(i + 32)) for i in ids)

    def __call__(self, text, add_special_tokens=False):
        text = text.replace("<o>", "\x01").replace("</o>", "\x02")
        return {"input_ids": [{"\x01": OUT_START, "\x02": OUT_END}.get(ch, ord(ch) - 32) for ch in text]}


CALL_START, CALL_END, OUT_START, OUT_END, EOS = 200, 201, 202, 203, 204
MARKERS = Markers("<c>", "</c>", "<o>", "</o>")


def _digits(text: str) -> list[int]:
    return [ord(ch) - 32 for ch in text]


def _rollout(segments, max_calls=2, tool=calculator):
    engine = Scripted(segments)
    rollout = ToolRollout(engine, CharTokenizer(), Toolbox({"t": tool}), MARKERS, max_calls)
    return rollout, engine


def test_the_trained_sequence_is_the_sampled_ids_plus_the_tool_output_ids_exactly():
    first = [CALL_START, *_digits("2+3"), CALL_END]
    second = [*_digits("5"), EOS]
    rollout, engine = _rollout([first, second])
    (completion,) = rollout.generate([[7, 8]], SamplingParams(n=1, max_new_tokens=20))[0]
    inserted = [OUT_START, *_digits("5"), OUT_END]
    assert completion.token_ids == first + inserted + second  # never decoded and re-encoded
    assert completion.tool_mask == [False] * len(first) + [True] * len(inserted) + [False] * len(second)
    assert completion.logprobs == [-0.5] * len(first) + [0.0] * len(inserted) + [-0.5] * len(second)
    assert engine.prompts == [[7, 8], [7, 8, *first, *inserted]]  # the continuation's exact token prefix
    assert completion.tool_calls == 1 and completion.tool_errors == 0 and completion.finish_reason == "stop"


def test_observations_count_toward_the_context_and_not_the_budget():
    first = [CALL_START, *_digits("1+1"), CALL_END]  # 5 model tokens
    rollout, _ = _rollout([first, _digits("123456789")])
    (completion,) = rollout.generate([[7]], SamplingParams(n=1, max_new_tokens=8))[0]
    model = [t for t, tool in zip(completion.token_ids, completion.tool_mask, strict=True) if not tool]
    assert len(model) == 8 and completion.finish_reason == "length"  # 5 + 3 of the 9 offered


def test_calls_past_max_calls_get_an_error_observation_and_the_sequence_goes_on():
    call = [CALL_START, *_digits("1"), CALL_END]
    rollout, _ = _rollout([call, call, [*_digits("x"), EOS]], max_calls=1)
    (completion,) = rollout.generate([[7]], SamplingParams(n=1, max_new_tokens=30))[0]
    text = CharTokenizer().decode(completion.token_ids)
    assert text.startswith("<c>1</c><o>1</o><c>1</c><o>error: no more tool calls (at most 1)</o>x")
    assert completion.tool_calls == 2 and completion.tool_errors == 1


def test_an_unclosed_call_is_text_and_a_stop_that_closes_nothing_continues():
    rollout, _ = _rollout([[CALL_START, *_digits("2+2"), EOS]])
    (unclosed,) = rollout.generate([[7]], SamplingParams(n=1, max_new_tokens=30))[0]
    assert unclosed.tool_calls == 0 and unclosed.tool_mask is None
    rollout, engine = _rollout([[*_digits("a"), CALL_END], [*_digits("b"), EOS]])
    (false_stop,) = rollout.generate([[7]], SamplingParams(n=1, max_new_tokens=30))[0]
    assert false_stop.tool_calls == 0 and false_stop.token_ids == [
        *_digits("a"),
        CALL_END,
        *_digits("b"),
        EOS,
    ]
    assert len(engine.prompts) == 2  # it continued, with nothing inserted


def test_an_empty_call_is_run_and_its_error_is_the_observation():
    rollout, _ = _rollout([[CALL_START, CALL_END], [EOS]])
    (completion,) = rollout.generate([[7]], SamplingParams(n=1, max_new_tokens=30))[0]
    assert completion.tool_calls == 1 and completion.tool_errors == 1
    assert "<o>error: SyntaxError" in CharTokenizer().decode(completion.token_ids)


# ----------------------------------------------------------------------------------------------- update
def test_tool_tokens_are_left_out_of_the_loss_and_its_normaliser():
    from rl.trajectory import Trajectory
    from rl.update import _model_token_mask

    sample = Trajectory(0, [1], [5, 6, 7, 8], [0.0] * 4, 1.0, True, [False, True, True, False])
    assert sample.model_tokens == 2
    mask = _model_token_mask([sample], torch.ones(1, 5))
    assert mask.tolist() == [
        [1.0, 0.0, 0.0, 1.0, 1.0]
    ]  # column 4 is padding's in a real batch: untouched here


def test_tool_tokens_get_no_gradient_from_the_loss_or_the_kl_and_are_never_picked_as_high_entropy():
    from rl.config import load_config
    from rl.trajectory import Trajectory
    from rl.update import MicroBatch, _model_token_mask, micro_batch_loss

    # one completion of 4 tokens, the middle two inserted by a tool; wildly off log-probs and entropies there
    sample = Trajectory(0, [1], [5, 6, 7, 8], [0.0] * 4, 1.0, True, [False, True, True, False])
    mask = _model_token_mask([sample], torch.ones(1, 4))  # [1, 4]
    logprobs = torch.tensor([[-1.0, -9.0, -9.0, -1.0]], requires_grad=True)
    mb = MicroBatch(
        logprobs=logprobs, old_logprobs=torch.tensor([[-1.05, -0.1, -0.1, -0.8]]),
        rollout_logprobs=torch.tensor([[-1.05, 0.0, 0.0, -0.8]]), advantages=torch.tensor([1.0]), mask=mask,
        entropy=torch.tensor([[0.5, 9.0, 9.0, 0.1]]), ref_logprobs=torch.tensor([[-1.3, -0.5, -0.5, -1.3]]),
    )  # fmt: skip
    algo = load_config(None, ["algorithm.kl_coef=0.5", "algorithm.entropy_top_frac=0.5"]).algorithm
    parts = micro_batch_loss(mb, algo, {"max_len": 4, "num_seqs": 1, "num_tokens": 2})
    parts.loss.backward()
    assert logprobs.grad[0, 1:3].tolist() == [0.0, 0.0]  # neither the policy loss nor the KL reaches them
    assert logprobs.grad[0, 0] != 0.0  # the model's highest-entropy token is the one kept
    assert parts.counts["policy/entropy_kept_frac"] == (1.0, 2.0)  # of the 2 model tokens, not the 4


def test_several_tools_need_a_call_start_each_and_no_tools_with_asynchronous_rollouts():
    from rl.config import load_config
    from rl.errors import ConfigError

    with pytest.raises(ConfigError, match="call_start each"):
        load_config(None, ["tools.use=[{name: calculator}, {name: python}]"])
    two = load_config(
        None, ['tools.use=[{name: python}, {name: calculator, call_start: "<c>", call_end: "</c>"}]']
    )
    assert [t.call_start for t in two.tools.use] == [None, "<c>"]
    with pytest.raises(ConfigError, match="not supported yet"):
        load_config(None, ["tools.use=[{name: calculator}]", "rollout.max_staleness=1"])


# ------------------------------------------------------------------------------------- the recipe, end to end
def test_tools_recipe_trains_on_the_shipped_tools_model_and_aha_eval_uses_the_runs_tool(tmp_path):
    """Two steps of `aha train tools`: the rollouts call the calculator, the tools/* metrics are logged, the
    dashboard has the tool panels; then `aha eval` on the run directory samples with the run's tool."""
    import json

    from rl.cli import shipped_recipes
    from rl.config import load_config
    from rl.evaluate import EvalOptions, run_eval
    from rl.train import train

    overrides = ["train.steps=2", "eval.size=8", f"run.dir={tmp_path}", "track.console=quiet"]
    run_dir = train(load_config(shipped_recipes()["tools"], overrides + ["track.tensorboard=false"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        for key in ("tools/calls_mean", "tools/call_frac", "tools/error_frac", "tools/output_tokens_mean"):
            assert 0.0 <= row[key] < 3.0, (key, row[key])
    assert "eval/tool_call_frac" in rows[0] and "eval/tool_call_frac" in rows[-1]
    calls = sum(r["tools/calls_mean"] for r in rows[1:])
    assert calls > 0  # the base model calls the calculator now and then: 2 x 128 samples saw some calls
    assert (run_dir / "dashboard.png").is_file()

    result = run_eval(
        EvalOptions(model=str(run_dir), data="builtin:tool_arithmetic", limit=8, k=1, temperature=0.0),
        progress=False,
    )
    assert result["settings"]["tools"] == ["calculator"] and "tool_call_frac" in result["metrics"]


def test_a_bare_list_of_tools_is_short_for_tools_use():
    from rl.config import load_config

    config = load_config(None, ["tools=[{name: calculator}]", "tools.max_calls=2"])
    assert [t.name for t in config.tools.use] == ["calculator"] and config.tools.max_calls == 2
    assert load_config(None, []).tools.use == []  # no tools: the rollouts of today


# ----------------------------------------------------------------------- calls overlap the other samples' decoding
class Streaming(Scripted):
    """A Scripted engine that reports each sample that stops at call_end as it goes (`on_stop`), then goes on
    "decoding" the rest; `busy` is True while it does."""

    busy = False

    def generate(self, prompts, params):
        self.busy = True
        out = super().generate(prompts, dataclasses.replace(params, on_stop=None))
        for i, group in enumerate(out):
            if params.on_stop and group[0].token_ids[-1:] == [CALL_END]:
                params.on_stop(i, group[0].token_ids)
        self.busy = False
        return out


def test_a_call_starts_as_its_sample_stops_while_the_others_still_decode():
    segments = [[CALL_START, *_digits("2+3"), CALL_END], [*_digits("no call"), EOS], [*_digits("5"), EOS]]
    engine = Streaming([list(s) for s in segments])
    started_while_busy = []

    class Recording(Toolbox):
        def start(self, call, columns, name=None):
            started_while_busy.append(engine.busy)
            return super().start(call, columns, name)

    rollout = ToolRollout(engine, CharTokenizer(), Recording({"t": calculator}), MARKERS, 2)
    got = rollout.generate([[7], [8]], SamplingParams(n=1, max_new_tokens=20))
    assert started_while_busy == [True]  # started by on_stop, inside the engine's generate, once
    want = _rollout([list(s) for s in segments])[0].generate(
        [[7], [8]], SamplingParams(n=1, max_new_tokens=20)
    )
    assert [g[0].token_ids for g in got] == [w[0].token_ids for w in want]  # the same rollouts either way


def test_the_transformers_engine_reports_each_stop_as_it_happens_and_rollouts_do_not_depend_on_it():
    from transformers import AutoModelForCausalLM

    from rl.models import load_tokenizer, resolve_model_path
    from rl.tiny.tools_task import make_problems
    from rollouts.hf_engine import TransformersEngine

    path = resolve_model_path("aha-tiny-tools")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    engine = TransformersEngine(model, tokenizer, max_batch_size=4)  # 2 prompts x 2 samples a chunk
    rows = make_problems("test", 16, seed=5)
    # the engine alone: a prompt that opens a call makes the model write the expression and stop at </calc>
    prompts = [
        tokenizer.encode(row["prompt"] + ("<calc>" if i % 2 else "")) for i, row in enumerate(rows[:4])
    ]
    reported = {}
    params = SamplingParams(n=2, max_new_tokens=24, temperature=0.0, stop=("</calc>",))
    groups = engine.generate(
        prompts, dataclasses.replace(params, on_stop=lambda i, ids: reported.update({i: ids}))
    )
    flat = [c for group in groups for c in group]
    by_stop_string = {i for i, c in enumerate(flat) if c.token_ids[-1] != tokenizer.eos_token_id}
    assert set(reported) == by_stop_string == {2, 3, 6, 7}  # the samples of prompts 1 and 3
    assert all(reported[i] == flat[i].token_ids for i in reported)

    # through the rollout: the same completions whether calls start on the engine's report or after the turn
    class Batched:  # the engine, without reports (as vLLM's LLM.generate)
        shares_policy, batch_size, standalone, summary = True, None, {}, ""

        def generate(self, prompts, params):
            return engine.generate(prompts, dataclasses.replace(params, on_stop=None))

    markers = Markers("<calc>", "</calc>", "<out>", "</out>")
    prompts = [tokenizer.encode(row["prompt"]) for row in rows]
    sampling = SamplingParams(n=8, max_new_tokens=48, temperature=1.0, seed=3)
    runs = [
        ToolRollout(e, tokenizer, Toolbox({"calculator": calculator}), markers, 2).generate(prompts, sampling)
        for e in (engine, Batched())
    ]
    streamed, batched = ([(c.token_ids, c.tool_mask, c.tool_calls) for g in run for c in g] for run in runs)
    assert streamed == batched
    assert sum(calls for _, _, calls in streamed) > 0  # ~1 in 10 samples calls: 128 samples call some


def test_finish_waits_for_each_call_until_its_own_deadline_only():
    """Calls started together share one wait: a call whose deadline has passed is not waited for again (with
    waits of timeout_s each, two hung calls took twice the timeout; here an hour each would hang the test)."""
    toolbox = Toolbox({"t": _hangs}, timeout_s=3600.0)
    expired = [toolbox.start("x", {}) for _ in range(2)]
    for pending in expired:  # as if an hour had passed
        pending.deadline = time.monotonic() - 1.0
    observations = toolbox.finish(expired)
    assert [o.error for o in observations] == [True, True]
    assert observations[0].text == "error: the t tool took over 3600 s"


def test_several_tools_each_called_between_their_own_markers():
    from rollouts.multiturn import Markers

    def shout(call: str, **columns) -> str:
        return call.upper()

    from tests.test_environments import Scripted as TextScripted  # a turn ends at the call's stop strings

    markers = {"t": MARKERS, "shout": Markers("{", "}", "<o>", "</o>")}
    engine = TextScripted(["<c>2+3</c>", "{ab}", "<eos>"])
    rollout = ToolRollout(engine, CharTokenizer(), Toolbox({"t": calculator, "shout": shout}), markers, 4)
    (completion,) = rollout.generate([[7]], SamplingParams(n=1, max_new_tokens=30))[0]
    text = CharTokenizer().decode(completion.token_ids)
    assert text == "<c>2+3</c><o>5</o>{ab}<o>AB</o>"  # each call ran its own tool
    assert completion.tool_calls == 2 and completion.tool_errors == 0
