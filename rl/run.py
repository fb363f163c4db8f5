"""A run's life around the loop: `start_run` builds it (model, data, rewards, engine, optimizer; restored from a
checkpoint when resuming), `save_run_checkpoint` saves it, `finish_run` writes the final model and dashboard,
and `GracefulStop` turns SIGTERM / Ctrl-C into a checkpoint and a `RunStopped`.

Nothing is written until the run is built (rl/rundir.py): a start that fails on a bad reward path, data file
or model leaves every earlier run as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewards import RewardScorer, RewardSpec
from rl.checkpoint import load_training_state, replaced_atomically, save_checkpoint
from rl.config import Config, config_yaml, to_dict
from rl.data import PromptSampler, PromptSet, train_and_held_out
from rl.distributed import Distributed
from rl.errors import AhaError
from rl.evaluate import before_after
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
from rl.rollout import prompt_tools, resolve_environment, tool_context, with_environment, with_tools
from rl.rundir import open_run_dir, plan_run
from rl.tracking import Alarms, Console, Loggers
from rl.update import Trainee, lr_factor
from rollouts import RolloutEngine, build_engine


@dataclass
class Run:
    """Everything a run holds, built once by `start_run` (fresh or resumed from a checkpoint)."""

    config: Config
    run_dir: Path
    device: torch.device
    tokenizer: Any  # a transformers tokenizer
    policy: torch.nn.Module
    trainer: torch.nn.Module  # CompletionLogprobs(policy), DDP-wrapped or FSDP-sharded with several ranks
    reference: torch.nn.Module | None  # CompletionLogprobs(reference model), sharded like the policy
    train_set: PromptSet
    eval_set: PromptSet | None
    scorer: RewardScorer
    engine: RolloutEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: PromptSampler
    loggers: Loggers
    console: Console
    alarms: Alarms
    dist: Distributed
    start_step: int = 1
    skipped_in_a_row: int = 0
    in_flight: list[dict] = dataclasses.field(
        default_factory=list
    )  # batches sampled ahead, from a checkpoint

    def generation_weights(self) -> contextlib.AbstractContextManager:
        """Around sampling, for engines that sample from the policy module itself: a sharded policy gathered
        whole, under mixed precision's autocast. Engines with their own copy (vLLM) need neither. Every rank
        must enter it."""
        if not self.engine.shares_policy:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.dist.full_weights(self.trainer))
        stack.enter_context(autocast(self.config.model, self.device))
        return stack

    @property
    def trainee(self) -> Trainee:
        return Trainee(self.trainer, self.policy, self.reference, self.tokenizer.pad_token_id)

    def close(self) -> None:
        self.console.close()
        self.loggers.close()
        self.engine.close()
        self.scorer.close()


def start_run(config: Config) -> Run:
    """Build the run: model(s), data, rewards, engine, optimizer; restore a checkpoint when resuming.

    Nothing is written until all of it is built (rl/rundir.py): a start that fails on a bad reward path, data
    file or model leaves every earlier run as it was."""
    device, dist = _runtime(config)
    plan = plan_run(to_dict(config), config.run_dir, config.run.resume, config.run.overwrite)
    dist.barrier()  # every rank has read the run directory before rank 0 may change it (open_run_dir)
    resume_from = plan.resume_from
    # a reward (or an environment) that cannot be imported fails before the model loads
    scorer = RewardScorer(reward_specs(config))
    console = Console(
        config.track.console if dist.is_main else "quiet", config.train.steps, config.track.log_every
    )
    engine = None
    try:
        with dist.together("loading the model and data"):
            tokenizer, policy, reference, policy_path = _load_models(config, device, dist, resume_from)
            train_set, eval_set = _load_data(config, tokenizer)
        with dist.together("starting the rollout engine"):
            engine = _build_engine(config, policy, tokenizer, policy_path, dist)
            if config.model.lora.r and resume_from:  # it started from the base weights: give it the adapters
                engine.update_weights(policy)
            if config.tools.use:
                engine = with_tools(engine, tokenizer, config)
            if config.environment.name:
                engine = with_environment(engine, tokenizer, config)
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
        alarms=Alarms.from_track(config.track, config.rollout.max_new_tokens),
        dist=dist,
    )
    if state is not None:
        run.sampler.load_state_dict(state["sampler"])
        run.alarms.load_state_dict(state["alarms"])
        run.start_step, run.skipped_in_a_row = state["step"] + 1, state["skipped_in_a_row"]
        run.in_flight = state.get("in_flight", [])
        run.console.message(f"resuming from {resume_from} at step {run.start_step}", style="cyan")
    for note in [engine.summary, *run.loggers.warnings]:
        if note:
            run.console.message(note)
    for data_set, name in ((train_set, "training"), (eval_set, "held-out")):
        if data_set is not None and data_set.skipped:
            run.console.message(f"skipped {data_set.skipped} bad {name} rows (data.on_bad_row=skip)")
    return run


def reward_specs(config: Config) -> list[RewardSpec]:
    """The recipe's rewards, and the environment's own (`environment`, weight 1) when its class defines
    get_reward and the recipe does not list it."""
    specs = list(config.rewards)
    if config.environment.name and all(spec.name != "environment" for spec in specs):
        if callable(getattr(resolve_environment(config.environment.name), "get_reward", None)):
            specs.append(RewardSpec("environment"))
    return specs


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
    if config.model.compute_dtype:  # FSDP2 gathers in it, before any wrap (rl/distributed.py)
        dist.compute_dtype = getattr(torch, config.model.compute_dtype)
    if config.algorithm.kl_coef and not lora:
        # Frozen, it runs under autocast anyway: loaded in the compute dtype it takes half the memory (5.7 GiB
        # less at 3B) and gives the same bf16 products.
        ref_dtype = config.model.compute_dtype or config.model.dtype
        reference = load_policy(model_path, ref_dtype, device)[1].eval().requires_grad_(False)
        reference = dist.wrap(CompletionLogprobs(reference), trains=False)
    return tokenizer, policy, reference, policy_path


def _load_data(config: Config, tokenizer: Any) -> tuple[PromptSet, PromptSet | None]:
    """The training prompts, and the held-out ones (none of which is a training prompt), with the tools a chat
    template renders into each prompt for the model to call."""
    return train_and_held_out(config, tokenizer, prompt_tools(config))


def _build_engine(
    config: Config, policy: torch.nn.Module, tokenizer: Any, policy_path: Path | str, dist: Distributed
) -> RolloutEngine:
    """The rollout engine; with rollout.max_staleness >= 1, the same engine in its own process."""
    options = dict(
        dtype=config.model.compute_dtype or config.model.dtype,  # vLLM computes in the mixed-precision dtype
        context_len=config.data.max_prompt_tokens + config.rollout.max_new_tokens + tool_context(config),
        seed=config.train.seed,
        **dataclasses.asdict(getattr(config.rollout, config.rollout.engine)),
    )
    if config.rollout.engine == "vllm":
        options["lora_rank"] = config.model.lora.r  # rollout.vllm.lora_sync: the adapter alone, or merged
    if options.get("max_num_seqs", 0) is None:  # vLLM: a step's sequences on this rank, in one wave
        options["max_num_seqs"] = config.train.prompts_per_step // dist.world * config.rollout.group_size
    if not config.rollout.max_staleness:
        return build_engine(
            config.rollout.engine, policy=policy, tokenizer=tokenizer, model_path=str(policy_path), **options
        )
    if dist.enabled:
        raise AhaError("rollout.max_staleness >= 1 (asynchronous rollouts) runs in one process for now")
    from rl.weights import merged_weights
    from rollouts.process_engine import ProcessEngine, engine_device

    lora = bool(config.model.lora.r)
    plan = dict(
        dtype=config.model.dtype,
        reference=bool(config.algorithm.kl_coef) and not lora,
        lora=lora,
        vllm_utilization=config.rollout.vllm.gpu_memory_utilization,
        compute_dtype=config.model.compute_dtype,
    )
    setting = config.rollout.vllm.process_device if config.rollout.engine == "vllm" else None
    device = engine_device(next(policy.parameters()).device, setting, policy, plan)
    return ProcessEngine(
        config.rollout.engine, policy, str(policy_path), merged_weights(policy), config.rollout.engine_threads,
        config.model.compute_dtype, options, device,
    )  # fmt: skip


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


def save_run_checkpoint(run: Run, step: int, row: dict, in_flight: list[dict] | None = None) -> None:
    """Called on every rank: sharded weights and optimizer state are gathered whole; rank 0 writes them.
    `in_flight`: the batches sampled ahead (asynchronous rollouts), so a resume trains on exactly them."""
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
        "in_flight": in_flight or [],
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
