"""TRL's side of benchmarks/bench_vs_trl.py: GRPOTrainer configured to match aha's settings, timed per step.

Runs only in the benchmark's TRL environment (benchmarks/requirements-trl.txt), started by bench_vs_trl.py
as `python bench_vs_trl.py --worker trl ...`; aha's environment never imports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bench_vs_trl import Workload, digit_reward


def trl_worker(
    w: Workload,
    model_dir: Path,
    data: Path,
    steps: int,
    out_dir: Path,
    step_hook: Callable[[], None] | None = None,
) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    trl.GRPOTrainer  # noqa: B018  (TRL's lazy import pulls in vLLM when installed; do it before timing)
    if w.threads:
        torch.set_num_threads(w.threads)
    batch = w.prompts * w.group
    args = trl.GRPOConfig(
        output_dir=str(out_dir / "trl"),
        num_generations=w.group,
        per_device_train_batch_size=w.micro_batch,
        gradient_accumulation_steps=batch // w.micro_batch,  # one optimizer step per generation batch
        max_completion_length=w.max_new_tokens,
        max_steps=steps,
        learning_rate=w.lr,
        lr_scheduler_type="constant",
        beta=0.0,
        num_iterations=1,
        loss_type="grpo",  # aha's default aggregation: mean over each sequence's tokens, then over sequences
        scale_rewards="group",
        temperature=w.temperature,
        top_p=1.0,
        top_k=0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=w.dtype == "bfloat16",
        use_cpu=w.device == "cpu",
        model_init_kwargs={"dtype": w.dtype},
        use_vllm=w.engine == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=w.vllm_memory,
        vllm_max_model_length=w.prompt_tokens + w.max_new_tokens,
        vllm_enable_sleep_mode=False,  # aha runs with rollout.vllm.sleep_level=0 here too
        vllm_importance_sampling_correction=False,  # aha's tis_cap=None: no extra forward for old log-probs
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=w.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    dataset = datasets.load_dataset("json", data_files=str(data), split="train")
    clock = {"rollout": 0.0, "prepare": 0.0, "gen_tokens": 0, "prompt_lens": []}
    records: list[dict] = []

    class Timer(transformers.TrainerCallback):
        begin = end = None

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()
            clock.update(rollout=0.0, prepare=0.0, gen_tokens=0)

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            step_s = now - self.begin
            records.append(
                {
                    "step": state.global_step,
                    "interval_s": now - self.end if self.end is not None else None,
                    "step_s": step_s,
                    "rollout_s": clock["rollout"],
                    "update_s": step_s - clock["prepare"],  # all but sampling, rewards and advantages
                    "gen_tokens": clock["gen_tokens"],
                    "update_tokens": clock["gen_tokens"],  # every completion token is trained on, once
                    "samples": batch,
                }
            )
            self.end = now
            if step_hook:  # bench_vs_trl's operator profile
                step_hook()

    trainer = trl.GRPOTrainer(
        model=str(model_dir),
        reward_funcs=[digit_reward],
        args=args,
        train_dataset=dataset,
        callbacks=[Timer()],
    )
    generate, prepare = trainer._generate_single_turn, trainer._generate_and_score_completions

    def timed_generate(prompt_ids, *a, **kw):
        t = time.perf_counter()
        completion_ids, logprobs = generate(prompt_ids, *a, **kw)
        clock["rollout"] += time.perf_counter() - t
        clock["gen_tokens"] += sum(len(c) for c in completion_ids)
        clock["prompt_lens"] += [len(p) for p in prompt_ids]
        return completion_ids, logprobs

    def timed_prepare(*a, **kw):
        t = time.perf_counter()
        out = prepare(*a, **kw)
        clock["prepare"] += time.perf_counter() - t
        return out

    trainer._generate_single_turn, trainer._generate_and_score_completions = timed_generate, timed_prepare
    start = time.perf_counter()
    trainer.train()
    lens = clock["prompt_lens"]
    cuda_peak = torch.cuda.max_memory_allocated() / 2**30 if w.device == "cuda" else None
    return {
        "steps": records,
        "total_s": time.perf_counter() - start,
        "cuda_peak_gib": cuda_peak,
        "threads": torch.get_num_threads(),
        "prompt_tokens_seen": [min(lens), max(lens)] if lens else None,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
