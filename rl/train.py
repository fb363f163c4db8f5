"""The GRPO training loop, top to bottom.

One step:
    1. take prompts_per_step prompts (whole groups: a prompt and its G samples never split)
    2. the rollout engine samples G completions per prompt (token ids, log-probs, finish reasons)
    3. reward functions score every completion
    4. group-relative advantages
    5. policy update (rl/update.py): epochs x mini-batches, accumulated over micro-batches, clipped surrogate (+ KL)
    6. push the new weights to the engine
    7. log metrics to <run>/metrics.jsonl
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewards import RewardScorer
from rl import metrics as M
from rl.checkpoint import load_training_state, replaced_atomically, save_checkpoint
from rl.config import Config, config_yaml, to_dict
from rl.cpu import CpuShare
from rl.data import PromptSampler, PromptSet
from rl.distributed import Distributed
from rl.errors import AhaError
from rl.grpo import (
    group_advantages,
    informative_groups,
    overlong_penalty,
)
from rl.logprobs import CompletionLogprobs
from rl.models import (
    autocast,
    load_policy,
    pick_device,
    prepare_for_training,
    resolve_model_path,
    seed_everything,
)
from rl.report import plot_runs, write_samples_html
from rl.rundir import open_run_dir, plan_run
from rl.tracking import Alarms, Console, Loggers, append_jsonl, sample_records
from rl.update import Sample, lr_factor, update_policy
from rollouts import SHARES_POLICY, SamplingParams, build_engine


@dataclass
class Run:
    """Everything a run holds, built once by `start_run` (fresh or resumed from a checkpoint)."""

    config: Config
    run_dir: Path
    device: torch.device
    tokenizer: Any
    policy: torch.nn.Module
    trainer: torch.nn.Module  # CompletionLogprobs(policy), DDP-wrapped or FSDP-sharded with several ranks
    reference: torch.nn.Module | None  # CompletionLogprobs(reference model), sharded like the policy
    train_set: PromptSet
    eval_set: PromptSet | None
    scorer: RewardScorer
    engine: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: PromptSampler
    loggers: Loggers
    console: Console
    alarms: Alarms
    dist: Distributed
    start_step: int = 1
    skipped_in_a_row: int = 0

    def generation_weights(self) -> contextlib.AbstractContextManager:
        """Around sampling, for engines that sample from the policy module itself: a sharded policy gathered
        whole, under mixed precision's autocast. Engines with their own copy (vLLM) need neither. Every rank
        must enter it."""
        if self.config.rollout.engine not in SHARES_POLICY:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.dist.full_weights(self.trainer))
        stack.enter_context(autocast(self.config.model, self.device))
        return stack

    def close(self) -> None:
        self.console.close()
        self.loggers.close()
        self.engine.close()
        self.scorer.close()


def train(config: Config) -> Path:
    """Run GRPO as configured; returns the run directory."""
    run = start_run(config)
    policy, engine, track, group_size = run.policy, run.engine, config.track, config.rollout.group_size
    if config.model.dtype != "float32" and not config.model.lora.r:
        run.console.message(
            f"model.dtype={config.model.dtype} trains the weights in {config.model.dtype}: AdamW steps smaller "
            "than the weights' rounding step are lost (at lr 1e-6 about 98% of bf16 weights do not move). "
            "For full fine-tuning use model.dtype=float32 model.compute_dtype=bfloat16 (mixed precision)."
        )
    params = SamplingParams(
        n=group_size,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        stop=tuple(config.rollout.stop),
    )
    trainer = run.trainer
    evaluations: dict[str, list[dict]] = {}
    stop = GracefulStop(run.console)
    fixed = config.train.threads or (torch.get_num_threads() if config.train.deterministic else None)
    cpu = CpuShare(fixed if run.device.type == "cpu" else torch.get_num_threads())
    try:
        if run.eval_set is not None and run.start_step == 1:
            with run.generation_weights():  # every rank joins the all-gather, rank 0 evaluates
                if run.dist.is_main:
                    row, evaluations["before"] = evaluate(engine, run.scorer, run.eval_set, config)
                    run.loggers.log({"step": 0, **row})
                    run.console.message(f"held-out before training: {eval_summary(row)}", style="cyan")

        for step in range(run.start_step, config.train.steps + 1):
            step_start = time.perf_counter()
            threads = cpu.adjust()  # the cores other processes leave free (rl/cpu.py)

            # ---- 1-3. prompts -> G completions each -> rewards (+ dynamic sampling rounds) -------------------
            batch = sample_batch(run, params, step)

            # ---- 4. advantages ------------------------------------------------------------------------------
            advantages = rank_advantages(batch, config, run.dist)  # [P, G]
            samples = [
                Sample(g := i // group_size, run.train_set.ids[batch.rows[g]], c.token_ids, c.logprobs, a, t)
                for i, (c, a, t) in enumerate(
                    zip(
                        batch.completions,
                        advantages.flatten().tolist(),
                        batch.trainable.flatten().tolist(),
                        strict=True,
                    )
                )
            ]

            # ---- 5. policy update ---------------------------------------------------------------------------
            t = time.perf_counter()
            engine.sleep()
            update = update_policy(
                trainer, policy, run.reference, run.optimizer, run.scheduler, samples, config,
                run.tokenizer.pad_token_id, run.dist,
            )  # fmt: skip
            update_s = time.perf_counter() - t

            # ---- 6. weight sync -----------------------------------------------------------------------------
            t = time.perf_counter()
            with run.dist.together("syncing the weights into the rollout engine"):
                engine.wake()
                engine.update_weights(policy)
            sync_s = time.perf_counter() - t

            # ---- 7. metrics, alarms, samples, checkpoint ----------------------------------------------------
            step_s = time.perf_counter() - step_start
            first = batch.first_round
            row = {"step": step}
            row.update(M.reward_metrics(first.rewards, first.scored, first.scores))
            row.update(
                M.rollout_metrics(
                    first.completions, first.scores.correct, batch.rollout_s, track.reflection_words
                )
            )
            row.update(batch.metrics())
            row.update(update)
            row.update(
                M.timing_metrics(
                    batch.rollout_s, batch.reward_s, update_s, sync_s, step_s, update["perf/update_tokens"]
                )
            )
            row["perf/peak_mem_gib"] = M.peak_memory_gib(run.device)
            row["perf/threads"] = float(threads)
            row = run.dist.reduce_metrics(row)
            last = step == config.train.steps
            due = last or (config.eval.every and step % config.eval.every == 0)
            if run.eval_set is not None and due:
                with run.generation_weights():
                    if run.dist.is_main:
                        eval_row, evaluations["after"] = evaluate(engine, run.scorer, run.eval_set, config)
                        row.update(eval_row)
            for message in run.alarms.check(row):
                run.console.message(f"alarm: {message}", style="bold red")
            if (step % track.samples_every == 0 or last) and run.dist.is_main:
                write_samples(run.run_dir, step, run.train_set, first, config)
            run.loggers.log(row)
            run.console.step(row)

            run.skipped_in_a_row = run.skipped_in_a_row + 1 if update["optim/skipped_updates"] else 0
            every = config.run.checkpoint_every
            stopping = run.dist.max(float(stop.requested)) > 0  # every rank stops at the same step
            if last or stopping or (every and step % every == 0):
                save_run_checkpoint(run, step, row)  # every rank: sharded state is gathered for rank 0
                run.dist.barrier()
            if run.skipped_in_a_row >= config.train.max_skipped_steps:
                raise AhaError(
                    f"the loss or gradient was NaN/inf in {run.skipped_in_a_row} steps in a row, so their updates "
                    "were skipped; stopping. Likely causes: a learning rate too high (optim.lr), float16 overflow "
                    "(use model.dtype=bfloat16 or float32), or extreme reward values"
                )
            if stopping and not last:
                raise RunStopped(stop.signum or signal.SIGTERM, step, run.run_dir)  # the rank that got it
            if stopping:
                run.console.message("the stop request came during the last step: finishing the run", "yellow")
        # every rank joins; before the engine closes (vLLM's shutdown takes the process group down with it)
        weights = run.dist.full_state_dict(run.policy) if config.run.save_model else None
    finally:
        stop.restore()
        run.close()

    if run.dist.is_main:
        finish_run(run, evaluations, weights)
    return run.run_dir


def start_run(config: Config) -> Run:
    """Build the run: model(s), data, rewards, engine, optimizer; restore a checkpoint when resuming.

    Nothing is written until all of it is built (rl/rundir.py): a start that fails on a bad reward path, data
    file or model leaves every earlier run as it was."""
    device, dist = _runtime(config)
    plan = plan_run(to_dict(config), config.run_dir, config.run.resume, config.run.overwrite)
    dist.barrier()  # every rank has read the run directory before rank 0 may change it (open_run_dir)
    resume_from = plan.resume_from
    scorer = RewardScorer(config.rewards)  # a reward that cannot be imported fails before the model loads
    console = Console(
        config.track.console if dist.is_main else "quiet", config.train.steps, config.track.log_every
    )
    engine = None
    try:
        with dist.together("loading the model and data"):
            tokenizer, policy, reference, policy_path = _load_models(config, device, dist, resume_from)
            train_set, eval_set = _load_data(config, tokenizer)
        with dist.together("starting the rollout engine"):
            engine = _build_engine(config, policy, tokenizer, policy_path)
            if config.model.lora.r and resume_from:
                engine.update_weights(
                    policy
                )  # the engine started from the base weights; give it the adapters
        # DDP over ranks when launched with several, or FSDP2 sharding, which replaces the parameters: the
        # optimizer is built on what this returns.
        trainer = dist.wrap(CompletionLogprobs(policy))
        optimizer, scheduler = _optimizer(config, policy)
        state = None
        if resume_from:
            state = load_training_state(
                resume_from, optimizer, scheduler, lambda saved: dist.shard_optimizer_state(saved, optimizer)
            )
        if dist.is_main:  # the first write of the start
            open_run_dir(plan, config_yaml(config), state["step"] if state else None, console.message)
    except BaseException:
        console.close()
        scorer.close()
        if engine is not None:
            engine.close()
        raise
    run = Run(
        config=config,
        run_dir=config.run_dir,
        device=device,
        tokenizer=tokenizer,
        policy=policy,
        trainer=trainer,
        reference=reference,
        train_set=train_set,
        eval_set=eval_set,
        scorer=scorer,
        engine=engine,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=PromptSampler(len(train_set), config.train.seed),
        loggers=_loggers(config) if dist.is_main else Loggers.silent(),
        console=console,
        alarms=Alarms(
            config.rollout.max_new_tokens, config.track.zero_reward_steps, config.track.truncation_alarm
        ),
        dist=dist,
    )
    if state is not None:
        run.sampler.load_state_dict(state["sampler"])
        run.alarms.load_state_dict(state["alarms"])
        run.start_step, run.skipped_in_a_row = state["step"] + 1, state["skipped_in_a_row"]
        run.console.message(f"resuming from {resume_from} at step {run.start_step}", style="cyan")
    for note in [engine.summary, *run.loggers.warnings]:
        if note:
            run.console.message(note)
    for data_set, name in ((train_set, "training"), (eval_set, "held-out")):
        if data_set is not None and data_set.skipped:
            run.console.message(f"skipped {data_set.skipped} bad {name} rows (data.on_bad_row=skip)")
    return run


def _runtime(config: Config) -> tuple[torch.device, Distributed]:
    """Seeds, threads, determinism, the device and the ranks."""
    seed_everything(config.train.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    device = pick_device(config.train.device)
    dist = Distributed(device, config.train.sharding)
    if dist.enabled:
        device = dist.device
        if config.train.prompts_per_step % dist.world:
            raise AhaError(
                f"train.prompts_per_step={config.train.prompts_per_step} must divide by the {dist.world} ranks: "
                "each rank trains on whole groups"
            )
    return device, dist


def _load_models(
    config: Config, device: torch.device, dist: Distributed, resume_from: Path | None
) -> tuple[Any, torch.nn.Module, torch.nn.Module | None, Path | str]:
    """(tokenizer, policy, reference or None, the path the policy was loaded from)."""
    model_path = resolve_model_path(config.model.path)
    lora = config.model.lora if config.model.lora.r else None
    # A full fine-tuning checkpoint holds the whole policy; a LoRA one holds the adapter, over the base model.
    policy_path = resume_from / "model" if resume_from and not lora else model_path
    tokenizer, policy = load_policy(policy_path, config.model.dtype, device)
    policy = prepare_for_training(
        policy, config.model, resume_from / "model" if resume_from and lora else None
    )
    # R1-Zero default: kl_coef = 0 loads no reference model at all. With LoRA the reference is the base
    # model itself, reached by switching the adapters off, so no second copy is loaded either.
    reference = None
    if config.algorithm.kl_coef and not lora:
        reference = load_policy(model_path, config.model.dtype, device)[1].eval().requires_grad_(False)
        reference = dist.wrap(CompletionLogprobs(reference), trains=False)
    return tokenizer, policy, reference, policy_path


def _load_data(config: Config, tokenizer: Any) -> tuple[PromptSet, PromptSet | None]:
    train_set = PromptSet.load(config, config.data.source, config.data.split, config.data.limit, tokenizer)
    eval_set = None
    if config.eval.size:
        eval_set = PromptSet.load(
            config, config.eval.source or config.data.source, config.eval.split, None, tokenizer,
            exclude=set(train_set.texts), size=config.eval.size,
        )  # fmt: skip
    return train_set, eval_set


def _build_engine(config: Config, policy: torch.nn.Module, tokenizer: Any, policy_path: Path | str) -> Any:
    return build_engine(
        config.rollout.engine,
        policy=policy,
        tokenizer=tokenizer,
        model_path=str(policy_path),
        dtype=config.model.compute_dtype or config.model.dtype,  # vLLM computes in the mixed-precision dtype
        context_len=config.data.max_prompt_tokens + config.rollout.max_new_tokens,
        seed=config.train.seed,
        **dataclasses.asdict(getattr(config.rollout, config.rollout.engine)),
    )


def _optimizer(
    config: Config, policy: torch.nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        weight_decay=config.optim.weight_decay,
    )
    total_updates = config.train.steps * config.algorithm.epochs * config.algorithm.minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, config.optim.warmup_steps, total_updates, config.optim.schedule)
    )
    return optimizer, scheduler


def _loggers(config: Config) -> Loggers:
    track = config.track
    return Loggers(
        config.run_dir, to_dict(config), track.tensorboard, track.wandb, track.trackio, track.project
    )


def save_run_checkpoint(run: Run, step: int, row: dict) -> None:
    """Called on every rank: sharded weights and optimizer state are gathered whole; rank 0 writes them."""
    weights, optimizer_state = (
        run.dist.full_state_dict(run.policy),
        run.dist.full_optimizer_state(run.optimizer),
    )
    if not run.dist.is_main:
        return
    cfg = run.config.run
    state = {
        "sampler": run.sampler.state_dict(),
        "alarms": run.alarms.state_dict(),
        "skipped_in_a_row": run.skipped_in_a_row,
        "best_value": row.get(cfg.keep_best) if cfg.keep_best else None,
        "config": to_dict(run.config),  # a resume checks that it continues the same run (rl/rundir.py)
    }
    save_checkpoint(
        run.run_dir, step, run.policy, run.tokenizer, run.optimizer, run.scheduler, state,
        cfg.keep_last, cfg.keep_best, cfg.best_mode, weights, optimizer_state,
    )  # fmt: skip


def finish_run(
    run: Run, evaluations: dict[str, list[dict]], weights: dict[str, torch.Tensor] | None = None
) -> None:
    """Final model, dashboard, samples page and the before/after view. `weights`: the whole state dict of a
    sharded policy (None: the policy's own)."""
    if run.config.run.save_model:
        policy = run.policy
        if run.config.model.lora.r:  # the adapter in PEFT format, then the merged model
            with replaced_atomically(run.run_dir / "adapter") as tmp:
                policy.save_pretrained(tmp, safe_serialization=True)
            policy = policy.merge_and_unload()
        with replaced_atomically(run.run_dir / "model") as tmp:
            policy.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            run.tokenizer.save_pretrained(tmp)
    if run.config.track.dashboard:
        plot_runs([run.run_dir], run.run_dir / "dashboard.png")
        write_samples_html(run.run_dir)
        run.console.message(
            f"dashboard: {run.run_dir / 'dashboard.png'}, samples: {run.run_dir / 'samples.html'}", "green"
        )
    if "before" in evaluations and "after" in evaluations:
        run.console.message(before_after(evaluations["before"], evaluations["after"]), style="white")


class RunStopped(Exception):
    """The run stopped early on SIGTERM or Ctrl-C, after saving a checkpoint. The CLI says so and exits with
    128 + the signal's number (143, 130), as a process killed by it would, so schedulers see an unfinished
    run."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum, self.step, self.run_dir = signum, step, run_dir
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in {run_dir}. "
            "Continue with: aha train ... resume=auto"
        )


class GracefulStop:
    """First Ctrl-C or SIGTERM: finish the current step, save a checkpoint, stop (RunStopped). Second Ctrl-C:
    now, without saving. A stop asked for during the last step lets the run finish."""

    def __init__(self, console: Console) -> None:
        self.requested = False
        self.signum = 0
        self.console = console
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, self.signum or signum
        self.console.message(
            f"{signal.Signals(signum).name}: saving a checkpoint after this step and stopping "
            "(Ctrl-C again to stop now, without saving)",
            style="yellow",
        )

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Round:
    """One sampling round: prompts, their completions and rewards."""

    rows: list[int]
    completions: list[Any]  # [P * G], prompt-major
    scores: Any  # the RewardResult
    rewards: torch.Tensor  # [P, G] total reward after overlong shaping; NaN where unscored
    scored: torch.Tensor  # [P, G] bool, reward is not NaN
    trainable: torch.Tensor  # [P, G] bool, scored and (with overlong filtering) not truncated


@dataclass
class StepBatch:
    """The groups one step trains on, and the first sampling round (an unfiltered view, for metrics)."""

    rows: list[int]
    completions: list[Any]
    rewards: torch.Tensor  # [P, G]
    scored: torch.Tensor  # [P, G]
    trainable: torch.Tensor  # [P, G]
    first_round: Round
    rounds: int
    dropped_groups: int
    rollout_s: float
    reward_s: float

    def metrics(self) -> dict[str, float]:
        out = {
            "rollout/sampling_rounds": float(self.rounds),
            "rollout/dropped_groups": float(self.dropped_groups),
        }
        out["rollout/trained_groups"] = float(len(self.rows))
        return out


def rank_advantages(batch: StepBatch, config: Config, dist: Distributed) -> torch.Tensor:
    """Group-relative advantages of this rank's groups, over scored samples only (an unscored one gets 0 and
    moves no statistic). Groups never span ranks, so only the batch-std scale needs the other ranks'."""
    algo = config.algorithm
    if algo.scale != "batch" or not dist.enabled:
        return group_advantages(batch.rewards, algo.baseline, algo.scale, scored=batch.scored)  # [P, G]
    per_rank = dist.gather_objects((batch.rewards.cpu(), batch.scored.cpu()))
    rewards, scored = (torch.cat(parts) for parts in zip(*per_rank, strict=True))  # [P * world, G]
    everything = group_advantages(rewards, algo.baseline, algo.scale, scored=scored)
    offset = sum(len(r) for r, _ in per_rank[: dist.rank])
    return everything[offset : offset + len(batch.rewards)]


def sample_batch(run: Run, params: SamplingParams, step: int) -> StepBatch:
    """Prompts -> G completions each -> rewards, with DAPO's options.

    Overlong shaping adds a penalty to completions that run into the token-limit buffer; overlong filtering
    keeps truncated completions out of the loss. Dynamic sampling drops groups whose rewards are all equal
    and samples more prompts, for at most algorithm.dynamic_max_rounds extra rounds. With several ranks,
    every rank draws the same global prompts and keeps its slice; prompt i of a round is sampled with seed
    base + i (its global position), so what a prompt gets is the same on any number of ranks.
    """
    config, algo, dist = run.config, run.config.algorithm, run.dist
    group_size, wanted = config.rollout.group_size, config.train.prompts_per_step // dist.world
    max_rounds = 1 + (algo.dynamic_max_rounds if algo.dynamic_sampling else 0)
    kept: list[tuple[int, list[Any], torch.Tensor, torch.Tensor, torch.Tensor]] = []
    first, rounds, dropped, rollout_s, reward_s = None, 0, 0, 0.0, 0.0
    while rounds < max_rounds:
        missing = int(dist.max(wanted - len(kept)))  # ranks draw in lockstep, so their samplers stay equal
        if missing == 0:
            break
        all_rows = run.sampler.next_batch(missing * dist.world)
        rows = dist.shard(all_rows)[: wanted - len(kept)]
        base = (config.train.seed * 1_000_003 + step * 1_009 + rounds) * 65_536 + dist.rank * missing
        with dist.together("sampling and scoring"):
            t = time.perf_counter()
            with run.generation_weights():
                groups = run.engine.generate(
                    [run.train_set.ids[r] for r in rows], dataclasses.replace(params, seed=base)
                )
            rollout_s += time.perf_counter() - t
            completions = [c for group in groups for c in group]
            t = time.perf_counter()
            scores = run.train_set.score(run.scorer, rows, completions, group_size)
            reward_s += time.perf_counter() - t

        rewards = torch.tensor(scores.total, dtype=torch.float32)  # [P * G]
        truncated = torch.tensor([c.finish_reason == "length" for c in completions])
        if algo.overlong_buffer:
            lengths = torch.tensor([len(c.token_ids) for c in completions])
            rewards = rewards + overlong_penalty(
                lengths, config.rollout.max_new_tokens, algo.overlong_buffer, algo.overlong_penalty
            )
        rewards = rewards.view(-1, group_size)  # [P, G]
        scored = ~torch.isnan(rewards)
        trainable = scored & ~truncated.view(-1, group_size) if algo.overlong_filter else scored
        this = Round(rows, completions, scores, rewards, scored, trainable)
        first = first or this
        keep = (
            informative_groups(rewards, scored)
            if algo.dynamic_sampling
            else torch.ones(len(rows), dtype=torch.bool)
        )
        dropped += int((~keep).sum())
        for g in keep.nonzero().flatten().tolist():
            kept.append(
                (
                    rows[g],
                    completions[g * group_size : (g + 1) * group_size],
                    rewards[g],
                    scored[g],
                    trainable[g],
                )
            )
        rounds += 1

    empty = torch.zeros((0, group_size))
    return StepBatch(
        rows=[k[0] for k in kept],
        completions=[c for k in kept for c in k[1]],
        rewards=torch.stack([k[2] for k in kept]) if kept else empty,
        scored=torch.stack([k[3] for k in kept]) if kept else empty.bool(),
        trainable=torch.stack([k[4] for k in kept]) if kept else empty.bool(),
        first_round=first,
        rounds=rounds,
        dropped_groups=dropped,
        rollout_s=rollout_s,
        reward_s=reward_s,
    )


# ------------------------------------------------------------------------------------- eval and samples


def evaluate(
    engine: Any, scorer: RewardScorer, eval_set: PromptSet, config: Config
) -> tuple[dict, list[dict]]:
    """Held-out evaluation with the rollout engine: eval.samples completions per problem, mean accuracy."""
    params = SamplingParams(
        n=config.eval.samples,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.eval.temperature,
        top_p=config.rollout.top_p if config.eval.temperature else 1.0,
        stop=tuple(config.rollout.stop),
        seed=config.train.seed,
        logprobs=False,  # unused here, and they cost vLLM half its throughput at a large vocabulary
    )
    rows = list(range(len(eval_set)))
    completions = [c for group in engine.generate(eval_set.ids, params) for c in group]
    scores = eval_set.score(scorer, rows, completions, config.eval.samples)
    lengths = [len(c.token_ids) for c in completions]
    finite = [r for r in scores.total if r == r]
    out = {
        "eval/reward_mean": sum(finite) / len(finite) if finite else float("nan"),
        "eval/len_mean": sum(lengths) / len(lengths),
        "eval/truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
    }
    if scores.correct is not None:
        judged = [c for c in scores.correct if c is not None]
        out["eval/accuracy"] = sum(judged) / len(judged) if judged else float("nan")
    records = [
        {"prompt": eval_set.texts[i // config.eval.samples], "completion": c.text, "reward": r, "length": n}
        for i, (c, r, n) in enumerate(zip(completions, scores.total, lengths, strict=True))
    ]
    return out, records


def eval_summary(row: dict) -> str:
    acc = f"accuracy {row['eval/accuracy']:.3f}, " if "eval/accuracy" in row else ""
    return f"{acc}reward {row['eval/reward_mean']:.3f}, mean length {row['eval/len_mean']:.1f} tokens"


def before_after(before: list[dict], after: list[dict], count: int = 3) -> str:
    """A few held-out problems with the base model's and the trained model's completions."""
    lines = ["held-out samples, before -> after training:"]
    for b, a in list(zip(before, after, strict=True))[:count]:
        lines.append(f"  prompt: {b['prompt']!r}")
        lines.append(f"    before (reward {b['reward']:.2f}, {b['length']} tokens): {b['completion']!r}")
        lines.append(f"    after  (reward {a['reward']:.2f}, {a['length']} tokens): {a['completion']!r}")
    return "\n".join(lines)


def write_samples(run_dir: Path, step: int, train_set: PromptSet, sampled: Round, config: Config) -> None:
    """Append whole groups of a few of this round's prompts to samples.jsonl."""
    group_size = config.rollout.group_size
    records = sample_records(
        step,
        [train_set.texts[r] for r in sampled.rows for _ in range(group_size)],
        [c.text for c in sampled.completions],
        [len(c.token_ids) for c in sampled.completions],
        [c.finish_reason for c in sampled.completions],
        sampled.rewards.flatten().tolist(),
        sampled.scores.correct,
        group_size,
        config.track.samples_prompts,
        config.train.seed,
    )
    append_jsonl(run_dir / "samples.jsonl", records)
