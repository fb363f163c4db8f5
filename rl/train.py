"""The GRPO training loop, top to bottom.

One step:
    1. sample: prompts_per_step prompts (whole groups), G completions each from the rollout engine (rl/batch.py)
    2. score: reward functions score every completion
    3. advantages: group-relative, over the scored samples
    4. update: epochs x mini-batches of optimizer steps over micro-batches (rl/update.py)
    5. sync: the new weights into the engine
    6. log: metrics (rl/metrics.py), alarms, samples, held-out evaluation, checkpoints
Building and ending the run (model, data, rewards, engine, optimizer, resume, final model) is rl/run.py.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from rl import metrics as M
from rl.batch import Sampler, StepBatch, assign_advantages, rank_advantages
from rl.config import Config
from rl.cpu import CpuShare
from rl.errors import AhaError
from rl.evaluate import eval_summary, evaluate_held_out, held_out_params
from rl.run import GracefulStop, Run, RunStopped, finish_run, save_run_checkpoint, start_run
from rl.schedule import Ahead, OnPolicy, Schedule
from rl.tracking import append_jsonl, sample_records
from rl.trajectory import flatten
from rl.update import update_policy
from rollouts import SamplingParams


def train(config: Config) -> Path:
    """Run GRPO as configured; returns the run directory."""
    run = start_run(config)
    warn_low_precision(run)
    params = SamplingParams(
        n=config.rollout.group_size,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        stop=tuple(config.rollout.stop),
    )
    sampler = Sampler(run.engine, run.scorer, run.train_set, run.sampler, run.dist, run.generation_weights)
    evaluations: dict[str, list[dict]] = {}
    stop = GracefulStop(run.console)
    cpu = cpu_share(run)
    try:
        if run.start_step == 1:
            evaluate(run, evaluations, "before", {"step": 0}, log=True)
        schedule = make_schedule(run, sampler, params)  # on-policy, or sampled ahead (rl/schedule.py)
        started = time.perf_counter()
        for step in range(run.start_step, config.train.steps + 1):
            step_start = time.perf_counter()
            threads = cpu.adjust()  # the cores other processes leave free (rl/cpu.py)

            # ---- 1-2. sample and score ----------------------------------------------------------------------
            batch = schedule.batch(step)

            # ---- 3. advantages ------------------------------------------------------------------------------
            advantages = rank_advantages(batch, config.algorithm, run.dist)  # [P, G]

            # ---- 4. update ----------------------------------------------------------------------------------
            t = time.perf_counter()
            run.engine.sleep()
            trajectories = assign_advantages(batch, advantages)
            update = update_policy(run.trainee, run.optimizer, run.scheduler, trajectories, config, run.dist)
            update_s = time.perf_counter() - t

            # ---- 5. sync ------------------------------------------------------------------------------------
            t = time.perf_counter()
            schedule.after_update(step, run.policy)
            sync_s = time.perf_counter() - t

            # ---- 6. log, evaluate, checkpoint ---------------------------------------------------------------
            now = time.perf_counter()
            timing = {"update": update_s, "sync": sync_s, "step": now - step_start, "elapsed": now - started}
            row = step_row(run, step, batch, update, timing, threads)
            end_of_step(run, step, row, batch, evaluations, stop, schedule)
        # every rank joins; before the engine closes (vLLM's shutdown takes the process group down with it)
        weights = run.dist.full_state_dict(run.policy) if config.run.save_model else None
    finally:
        stop.restore()
        run.close()

    if run.dist.is_main:
        finish_run(run, evaluations, weights)
    return run.run_dir


def make_schedule(run: Run, sampler: Sampler, params: SamplingParams) -> Schedule:
    if not run.config.rollout.max_staleness:
        return OnPolicy(sampler, run.config, params)
    return Ahead(sampler, run.engine, run.config, params, run.start_step, run.in_flight)


def cpu_share(run: Run) -> CpuShare:
    """Torch's threads: fixed by train.threads or determinism, else the free cores (rl/cpu.py), less those of
    an engine process."""
    config = run.config
    fixed = config.train.threads or (torch.get_num_threads() if config.train.deterministic else None)
    reserved = config.rollout.engine_threads if config.rollout.max_staleness else 0
    return CpuShare(fixed if run.device.type == "cpu" else torch.get_num_threads(), reserved)


def warn_low_precision(run: Run) -> None:
    model = run.config.model
    if model.dtype != "float32" and not model.lora.r:
        run.console.message(
            f"model.dtype={model.dtype} trains the weights in {model.dtype}: AdamW steps smaller than the "
            "weights' rounding step are lost (at lr 1e-6 about 98% of bf16 weights do not move). For full "
            "fine-tuning use model.dtype=float32 model.compute_dtype=bfloat16 (mixed precision)."
        )


def step_row(
    run: Run, step: int, batch: StepBatch, update: dict[str, float], timing: dict[str, float], threads: int
) -> dict[str, float]:
    """The step's metrics (docs/metrics.md), reduced over ranks: rewards of the first sampling round,
    rollout statistics, the update's, and timings."""
    first, track = batch.first_round, run.config.track
    sampled, judged = flatten(first.groups), first.scores.correct is not None
    row = {"step": step}
    row.update(M.reward_metrics(first.tensor("reward"), first.tensor("scored"), first.scores))
    row.update(M.rollout_metrics(sampled, judged, batch.rollout_s, track.reflection_words))
    row.update(batch.metrics(step - 1 if run.config.rollout.max_staleness else None))
    if run.config.tools.use:
        row.update(M.tool_metrics(sampled, judged))
    if run.config.environment.name:
        row.update(M.environment_metrics(sampled))
    row.update(update)
    row.update(
        M.timing_metrics(
            batch.rollout_s, batch.reward_s, timing["update"], timing["sync"], timing["step"],
            update["perf/update_tokens"],
        )
    )  # fmt: skip
    row["perf/peak_mem_gib"] = M.peak_memory_gib(run.device)
    row["perf/threads"] = float(threads)
    row["perf/elapsed_s"] = timing["elapsed"]
    return run.dist.reduce_metrics(row)


def end_of_step(
    run: Run,
    step: int,
    row: dict,
    batch: StepBatch,
    evaluations: dict,
    stop: GracefulStop,
    schedule: Schedule,
) -> None:
    """Held-out evaluation when due, alarms, samples, the metrics line, a checkpoint when due; stops the run on
    repeated NaN steps (AhaError) or a stop signal (RunStopped)."""
    config = run.config
    last = step == config.train.steps
    if last or (config.eval.every and step % config.eval.every == 0):
        evaluate(run, evaluations, "after", row)
    for message in run.alarms.check(row, batch.first_round.scores.errors):
        run.console.message(f"alarm: {message}", style="bold red")
    if (step % config.track.samples_every == 0 or last) and run.dist.is_main:
        write_samples(run, step, batch)
    run.loggers.log(row)
    run.console.step(row)
    run.skipped_in_a_row = run.skipped_in_a_row + 1 if row["optim/skipped_updates"] else 0
    stopping = run.dist.max(float(stop.requested)) > 0  # every rank stops at the same step
    every = config.run.checkpoint_every
    if last or stopping or (every and step % every == 0):
        save_run_checkpoint(
            run, step, row, schedule.in_flight()
        )  # every rank: sharded state gathered for rank 0
        run.dist.barrier()
    if run.skipped_in_a_row >= config.train.max_skipped_steps:
        raise AhaError(
            f"the loss or gradient was NaN/inf in {run.skipped_in_a_row} steps in a row, so their updates were "
            "skipped; stopping. Likely causes: a learning rate too high (optim.lr), float16 overflow (use "
            "model.dtype=bfloat16 or float32), or extreme reward values"
        )
    if stopping and not last:
        raise RunStopped(stop.signum or signal.SIGTERM, step, run.run_dir)  # the rank that got it
    if stopping:
        run.console.message("the stop request came during the last step: finishing the run", "yellow")


def evaluate(run: Run, evaluations: dict, when: str, row: dict, log: bool = False) -> None:
    """The held-out evaluation and the eval.suite benchmarks (rank 0 evaluates; every rank joins the gathering
    of sharded weights): their metrics go into `row`, the held-out records into evaluations[when]."""
    suite = run.config.eval.suite
    if run.eval_set is None and not suite:
        return
    with run.generation_weights():
        if run.dist.is_main:
            params = held_out_params(run.config)
            if run.eval_set is not None:
                metrics, evaluations[when] = evaluate_held_out(
                    run.engine, run.scorer, run.eval_set, params, tools=bool(run.config.tools.use)
                )
                row.update(metrics)
            if suite:  # benchmarks of the evaluation suite, e.g. AIME and MATH-500 curves (rl/suite.py)
                from rl.suite import evaluate_suite_in_run

                row.update(evaluate_suite_in_run(run.engine, run.tokenizer, run.config, params))
    if log and run.dist.is_main:
        run.loggers.log(row)
        summary = [eval_summary(row)] if run.eval_set is not None else []
        if suite:
            from rl.suite import suite_summary

            summary.append(suite_summary(row, suite))
        run.console.message(f"held-out {when} training: {'; '.join(summary)}", style="cyan")


def write_samples(run: Run, step: int, batch: StepBatch) -> None:
    """Append whole groups of a few of the step's first-round prompts to samples.jsonl."""
    first = batch.first_round
    records = sample_records(
        step, first.groups, first.scores.correct is not None, run.config.track.samples_prompts,
        run.config.train.seed,
    )  # fmt: skip
    append_jsonl(run.run_dir / "samples.jsonl", records)
