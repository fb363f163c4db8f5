"""The one typed config of a run: every field documented once, unknown keys are errors.

A recipe (YAML in `recipes/`) holds only overrides of these defaults. `aha train RECIPE key.sub=value ...`
applies command-line overrides on top. Validation names the bad key, suggests the closest valid one, and says
what to change for wrong types and impossible values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rewards import RewardSpec
from rl.errors import ConfigError
from rl.metrics import DEFAULT_REFLECTION_WORDS


@dataclass
class LoRAConfig:
    r: int = 0
    """LoRA rank; 0 = off (full fine-tuning). With LoRA only the adapters train (PEFT), the rollout engine
    receives merged weights, and the run saves the adapter (PEFT format) besides the merged model."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get adapters."""


@dataclass
class ModelConfig:
    path: str = "aha-tiny"
    """HF model directory or hub id, or a small base model shipped with aha: `aha-tiny` (arithmetic) or
    `aha-tiny-tools` (arithmetic with a calculator tool)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for the policy (and the reference model when KL is on), and so the optimizer's. Full
    fine-tuning in bfloat16 loses most small updates: at lr 1e-6 one AdamW step changes about 2% of bf16
    weights (the rest round back); use float32 with compute_dtype: bfloat16 instead."""
    compute_dtype: Literal["bfloat16"] | None = None
    """Mixed precision: forward and backward passes (and transformers-engine sampling) under torch.autocast in
    this dtype, while the weights and optimizer stay in model.dtype (float32 master weights). The vLLM
    engine runs in this dtype. null: everything in model.dtype. With LoRA the frozen base may stay in bfloat16
    (the adapters are float32); autocast then also keeps the adapters' saved inputs in bf16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more update time."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Parameter-efficient fine-tuning with LoRA adapters."""


@dataclass
class DataConfig:
    source: str = "builtin:arithmetic"
    """Where prompts come from: a local .jsonl/.json/.parquet file, a hub dataset id, or `builtin:arithmetic`."""
    split: str = "train"
    """Dataset split used for training (hub datasets)."""
    prompt_key: str = "prompt"
    """Column holding the question text."""
    answer_key: str = "answer"
    """Column holding the gold answer; it reaches the reward functions as the `answer` column."""
    answer_format: Literal["raw", "gsm8k", "boxed"] = "raw"
    """How to read the gold answer: as is, the number after `####` (GSM8K), or the last \\boxed{} (MATH)."""
    template: Literal["plain", "r1_zero", "boxed", "chat", "chat_boxed"] = "plain"
    """How a question becomes a prompt: as is, the R1-Zero template, a \\boxed{} math instruction, or the
    tokenizer's chat template."""
    max_prompt_tokens: int = 512
    """Prompts longer than this (after the template) are an error."""
    limit: int | None = None
    """Use only the first N rows (handy for smoke runs)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A row with a missing or empty field, or a prompt over max_prompt_tokens: stop with an error naming the
    row and field, or skip it (the count is printed)."""


@dataclass
class TransformersEngineConfig:
    max_batch_size: int = 256
    """Most sequences decoded at once."""
    fast_decoding: bool = True
    """Decode Llama/Qwen2-family models with aha's own decoder (rollouts/llama_decoder.py: a preallocated KV
    cache, one prefill per group); false, or another model family, decodes through transformers' forward."""


@dataclass
class VLLMEngineConfig:
    gpu_memory_utilization: float = 0.3
    """Fraction of GPU memory vLLM may take (weights + KV cache) when colocated with the trainer."""
    sleep_level: Literal[0, 1, 2] = 2
    """vLLM's sleep mode during the update: 0 keeps its memory; 1 copies its weights to pinned CPU memory and
    drops the KV cache (the weights come back from the CPU at wake, 2 bytes a parameter of pinned host memory
    per rank); 2 drops both, and the next weight sync refills the weights (TRL's colocate mode). The sync
    overwrites the weights anyway, so level 1 only adds two copies per step. Ignored on CPU (no sleep mode)."""
    max_model_len: int | None = None
    """Context length of the engine (null: data.max_prompt_tokens + rollout.max_new_tokens)."""
    enforce_eager: bool = False
    """Disable CUDA graphs / torch.compile in vLLM (faster start, slower decoding)."""
    cpu_kv_cache_gib: int = 2
    """KV-cache size on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    max_num_seqs: int | None = None
    """Most sequences vLLM decodes at once; null: the sequences of one sampling call on this rank
    (train.prompts_per_step / ranks x rollout.group_size), so a step decodes in one wave. Either way the engine
    caps it at the full-length sequences its KV cache holds (the start-up line says how many)."""
    lora_sync: Literal["adapter", "merged"] = "adapter"
    """How a LoRA policy (model.lora.r > 0) reaches vLLM: `adapter` sends the adapter alone and vLLM applies it
    (its LoRA support, LoRARequest): updates smaller than bf16's rounding step of W are not lost (TRL #5975,
    verl #3516); `merged` sends W + BA, cast to the engine's dtype (also the fallback for a model vLLM cannot
    apply LoRA to, and for FSDP-sharded policies)."""
    process_device: str | None = None
    """With rollout.max_staleness >= 1 on a GPU, the engine process's GPU (`cuda:N`). null: the next visible GPU
    after the trainer's (an error when there is none); the trainer's own GPU only when the memory plan fits with
    the engine awake through the update (rl/gpu_memory.py), since an engine sampling ahead never sleeps."""
    max_num_batched_tokens: int = 4096
    """Most tokens in one vLLM forward (prefill chunks included; TRL's colocate mode uses 4096). Larger
    prefills faster but takes memory from the KV cache at a low gpu_memory_utilization; the start-up line
    `vLLM engine: KV cache N tokens` shows what is left."""
    logits_dtype: Literal["float32", "model"] = "float32"
    """The LM head's output dtype in vLLM: float32 (`hf_overrides={"head_dtype": "float32"}`) matches the
    trainer's float32 log-probs (vLLM calls it required for RL consistency; on CUDA it is the same bf16 GEMM
    with a float32 output); `model` computes logits in the engine's dtype (bf16)."""


@dataclass
class RolloutConfig:
    engine: str = "transformers"
    """Rollout engine: `transformers` (works everywhere) or `vllm`."""
    group_size: int = 8
    """G: completions sampled per prompt, at least 2. A group is the unit of sampling, reward and advantage."""
    max_new_tokens: int = 128
    """Token limit of a completion; completions that hit it count as truncated."""
    temperature: float = 1.0
    """Sampling temperature (the trainer's log-probs use the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the completion ends with (and includes) the first one produced."""
    max_staleness: int = 0
    """0: on-policy, each batch sampled by the weights of the step before. k >= 1: asynchronous rollouts: an
    engine in its own process samples the batch of step s from the policy of step s-1-k while the trainer
    updates on earlier ones; the update's ratio is taken against the engine's own log-probs (docs/async.md).
    One process (no launcher) only."""
    engine_threads: int = 1
    """CPU threads of the engine process when max_staleness >= 1 (the trainer keeps the other cores)."""
    transformers: TransformersEngineConfig = field(default_factory=TransformersEngineConfig)
    """Options of the transformers engine."""
    vllm: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)
    """Options of the vLLM engine."""


@dataclass
class AlgorithmConfig:
    advantage: Literal["grpo", "passk"] = "grpo"
    """Advantage estimator: grpo (baseline and scale below) or passk (Chen et al. 2025, "Pass@k Training":
    each sample's share of the group's analytic pass@k; needs 0/1 rewards)."""
    passk_k: int = 4
    """k of algorithm.advantage=passk, at most rollout.group_size."""
    baseline: Literal["mean", "loo"] = "mean"
    """Advantage baseline: group mean (GRPO) or leave-one-out mean (RLOO)."""
    scale: Literal["group", "batch", "batch_centered", "none"] = "group"
    """Advantage scaling: / group std (GRPO), / batch std of the rewards (Lite PPO), / batch std of the
    group-centred rewards (REINFORCE++-baseline), or none (Dr. GRPO)."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "seq_mean_token_mean"
    """Loss aggregation: token_mean (DAPO), seq_mean_token_mean (GRPO), seq_mean_token_sum_norm (Dr. GRPO)."""
    clip_low: float | None = None
    """Clip range below 1: the ratio is clipped at 1 - clip_low. null: the policy loss's own, 0.2 (PPO) or, for
    cispo, no lower bound (MiniMax-M1; cispo also takes values >= 1, verl's way of saying none)."""
    clip_high: float | None = None
    """Clip range above 1: at 1 + clip_high (DAPO clip-higher uses 0.28). null: the policy loss's own, 0.2 (PPO)
    or 4 for cispo (a weight of at most 5: TRL's recommended epsilon_high, from ScaleRL)."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 on the loss of negative-advantage tokens; null = off."""
    ratio_level: Literal["token", "sequence", "sequence_token"] = "token"
    """Importance ratio per token (PPO/GRPO), per sequence (GSPO, Zheng et al. 2025: the geometric mean of the
    token ratios, clipped per sequence), or GSPO-token (the sequence's ratio with each token's gradient). A
    sequence ratio stays within ~1e-3 of 1: GSPO uses clip_low 3e-4, clip_high 4e-4 and several mini-batches
    per rollout; with one update per rollout the ratio is exactly 1 and the clip never acts."""
    policy_loss: Literal["ppo_clip", "cispo", "kl_cov", "clip_cov"] = "ppo_clip"
    """ppo_clip (clipped surrogate), cispo (MiniMax-M1: REINFORCE with the ratio clipped to [1 - clip_low,
    1 + clip_high] and detached, so clipped tokens still get a gradient; by default no lower bound and
    clip_high 4), kl_cov or clip_cov (Cui et al. 2025: a penalty on, or removal of, the few tokens whose
    log-prob/advantage covariance is highest, against entropy collapse; over each micro-batch's tokens)."""
    cov_frac: float | None = None
    """Fraction of tokens kl_cov / clip_cov act on; null = the paper's (kl_cov 2e-3, clip_cov 2e-4)."""
    kl_cov_coef: float = 1.0
    """Weight of kl_cov's |log r| penalty on its tokens: 1 in verl's recipe/entropy (Qwen2.5-7B), 0.1 is verl's
    config default (ppo_kl_coef)."""
    entropy_top_frac: float | None = None
    """Train only on each micro-batch's highest-entropy completion tokens, this fraction of them (Wang et al.
    2025, "Beyond the 80/20 rule": 0.2); the rest get no policy gradient. null = off."""
    mismatch: Literal["none", "tis", "token_mask", "sequence_mask"] = "none"
    """Rollout/trainer mismatch correction by rho = pi_trainer / pi_engine (Yao et al. 2025): tis weights each
    token by min(rho, mismatch_high); token_mask drops tokens, sequence_mask whole sequences (rho the product
    of the token ratios), whose rho leaves [mismatch_low, mismatch_high], keeping the others' weight rho.
    TRL's default is sequence_mask with mismatch_high 3."""
    mismatch_low: float | None = None
    """Lower bound of rho for token_mask / sequence_mask (null: none)."""
    mismatch_high: float | None = None
    """Upper bound of rho: the cap for tis (e.g. 2), the bound for the masks (e.g. 3)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference policy. 0 = no reference model is loaded (R1-Zero)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (Schulman 2020)."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token's loss by min(pi_train / pi_rollout, tis_cap) to correct
    for the rollout engine's numerics differing from the trainer's (Yao et al. 2025). null = off. Short for
    mismatch: tis with mismatch_high: tis_cap."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage) and sample more prompts
    to refill the batch."""
    dynamic_max_rounds: int = 3
    """Most extra sampling rounds per step for dynamic sampling; the batch may stay short after that."""
    overlong_filter: bool = False
    """Mask truncated completions (hit max_new_tokens) out of the loss (DAPO overlong filtering)."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: the last N tokens before max_new_tokens get a linear reward penalty,
    reaching -overlong_penalty at the limit. 0 = off."""
    overlong_penalty: float = 1.0
    """Size of the soft overlong punishment at the token limit."""
    epochs: int = 1
    """Passes over each generation batch (PPO inner epochs)."""
    minibatches: int = 1
    """Optimizer steps per pass: the batch's groups are split into this many mini-batches."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to lr."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Training steps (one step = one generation batch)."""
    prompts_per_step: int = 16
    """Prompts (groups) per step; the step samples prompts_per_step * group_size completions."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass; gradients accumulate over a mini-batch."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the policy runs: auto picks CUDA when available."""
    threads: int | None = None
    """CPU threads for torch. null: as many as the cores other processes leave free, re-checked every step
    (at most torch's default; rl/cpu.py), so a busy machine slows the run in proportion, not 8x. A number fixes
    the count (as does train.deterministic, whose results depend on it)."""
    sharding: Literal["ddp", "fsdp"] = "ddp"
    """With several ranks: `ddp` keeps a full copy of the policy, its gradients and AdamW state on every rank
    and averages gradients (DistributedDataParallel); `fsdp` shards all three over the ranks (FSDP2,
    `fully_shard` per decoder layer), as it does the reference model when algorithm.kl_coef > 0. Same
    update either way; see docs/distributed.md. Ignored in a single process."""
    max_skipped_steps: int = 3
    """Stop the run after this many consecutive steps whose updates were skipped for a NaN/inf loss."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): bit-identical reruns and resumes on the same hardware, slower
    on GPU."""


@dataclass
class EvalConfig:
    source: str | None = None
    """Held-out data (same forms as data.source); null = data.source. Rows whose prompt also appears in the
    training data are dropped, so the evaluation never sees a training problem."""
    split: str = "test"
    """Split of the held-out data."""
    size: int = 200
    """Held-out problems evaluated (0 = no evaluation)."""
    every: int = 0
    """Also evaluate every N steps (0 = only before the first and after the last step)."""
    samples: int = 1
    """Completions per problem; accuracy is their mean (pass@1)."""
    temperature: float = 0.0
    """Sampling temperature of the evaluation (0 = greedy)."""
    suite: list[str] = field(default_factory=list)
    """Benchmarks of the evaluation suite (rl/suite.py, docs/evaluation.md) also evaluated whenever the held-out
    set is, with eval.samples and eval.temperature, and logged as eval/<name>/accuracy, e.g. [aime24, math500].
    Empty (the default): none."""
    suite_dir: str | None = None
    """Local copies of the suite's benchmarks in the Qwen2.5-Math layout (DIR/<name>/test.jsonl); null = the
    hub presets."""
    suite_limit: int | None = None
    """Evaluate only the first N problems of each suite benchmark (null = all)."""


SUITE_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k")
"""The benchmarks eval.suite takes: those of rl/suite.py's BENCHMARKS (a test keeps them equal)."""


@dataclass
class TrackConfig:
    console: Literal["rich", "plain", "quiet"] = "rich"
    """Console display: a live progress bar (rich), a line per step (plain), or alarms and summary only (quiet).
    rich falls back to plain when stdout is not a terminal."""
    log_every: int = 1
    """Plain console: print a line every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to <run>/tensorboard (needs the tensorboard package; skipped if absent)."""
    wandb: bool = False
    """Log to Weights & Biases (needs wandb installed)."""
    trackio: bool = False
    """Log to trackio (needs trackio installed)."""
    project: str = "aha"
    """Project name for W&B / trackio."""
    reflection_words: list[str] = field(default_factory=lambda: list(DEFAULT_REFLECTION_WORDS))
    """Words whose use is counted as reflection (rollout/reflection_frac), case-insensitive, whole words."""
    samples_every: int = 10
    """Write whole groups of a few prompts to samples.jsonl every N steps (and at the last step)."""
    samples_prompts: int = 2
    """Prompts (each with its whole group) written per sampled step."""
    zero_reward_steps: int = 5
    """Alarm when every reward is 0 for this many steps in a row."""
    truncation_alarm: float = 0.5
    """Alarm when more than this fraction of completions hit rollout.max_new_tokens."""
    repetition_alarm: float | None = 0.3
    """Alarm when more than this fraction of completions loop (rollout/repetition_frac: half or more of their
    4-grams of tokens repeat an earlier one); null = off."""
    hacking_window: int = 10
    """Reward-hacking alarm: over this many steps, a shaping reward (any but the correctness one) rising by
    track.hacking_rise or more while correctness rises by less than track.flat_gain; 0 = off."""
    hacking_rise: float = 0.1
    """Rise of a shaping reward's mean (its least-squares trend over the window) that counts as rising."""
    flat_gain: float = 0.02
    """Correctness counts as flat (not improving) below this rise over an alarm's window (hacking, entropy)."""
    correctness_reward: str | None = None
    """The reward whose mean is correctness for the alarms (e.g. a user's `my_pkg.rewards:passes_tests`); null
    = reward/accuracy (the first accuracy reward); without either, no reward-hacking alarm."""
    entropy_floor: float | None = 0.01
    """Entropy-collapse alarm: policy/entropy below this (nats per token) for track.entropy_steps steps while
    correctness (else reward/mean) is not improving; null = off."""
    entropy_steps: int = 10
    """Steps in a row below track.entropy_floor before the entropy-collapse alarm."""
    ratio_alarm: float | None = 20.0
    """Ratio blow-up alarm: policy/ratio_max above this; null = off."""
    mismatch_alarm: float | None = 0.05
    """Ratio blow-up alarm: the mismatch correction (algorithm.mismatch) dropping more than this fraction of the
    completion tokens (rollout/mismatch_masked_frac); null = off."""
    dashboard: bool = True
    """Write dashboard.png and samples.html at the end of the run."""


@dataclass
class RunConfig:
    name: str = "aha"
    """Run name; the run directory is <dir>/<name>."""
    dir: str = "runs"
    """Parent directory of run directories."""
    save_model: bool = True
    """Save the final policy with save_pretrained into <run>/model."""
    checkpoint_every: int = 0
    """Save a checkpoint (policy, optimizer, scheduler, RNG, data position) every N steps; 0 = only at the end.
    Ctrl-C / SIGTERM also saves one at the next step boundary."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted); 0 = keep all."""
    keep_best: str | None = None
    """Also keep the checkpoint with the best value of this metric (e.g. eval/accuracy); null = off."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger or smaller keep_best metric is better."""
    resume: str | None = None
    """`auto`: continue from the newest intact checkpoint of this run (a damaged newer one is set aside with a
    warning); or a checkpoint directory path. The checkpoint's config must equal this one, except train.steps
    and where and how the run is written and shown (rl/rundir.py, RESUMABLE_CHANGES)."""
    overwrite: bool = False
    """Start a new run in a directory that already holds one, deleting that run's records (metrics, samples,
    checkpoints, model). Without it such a start is refused: a run is never overwritten by accident."""


@dataclass
class ToolSpec:
    name: str
    """`calculator`, `python` (the code sandbox), a registered name, or `module:function` (rollouts/tools.py)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Options passed to the tool on every call, e.g. {timeout_s: 5} for python."""
    call_start: str | None = None
    """This tool's own call_start (several tools in a run: each needs its own); null: the section's."""
    call_end: str | None = None
    """This tool's own call_end; null: the section's."""


@dataclass
class ToolsConfig:
    use: list[ToolSpec] = field(default_factory=list)
    """The tools a completion may call: [{name: python}]. Empty: no tool calls, the rollouts of today. With
    any, rollouts are multi-turn (rollouts/multiturn.py; docs/tools.md); several tools each need their own
    call_start, e.g. [{name: python}, {name: calculator, call_start: "<calc>", call_end: "</calc>"}]."""
    format: Literal["markers", "json"] = "markers"
    """How the model calls a tool: `markers`, between call_start and call_end (base models); `json`, in the
    function-calling format of instruct models, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
    with the tools' descriptions rendered into the prompt by the chat template (template: chat)."""
    max_calls: int = 4
    """Most tool calls a completion may make; later calls get an error observation (json: the episode ends)."""
    call_start: str = "```python\n"
    """Text that opens a call; what follows, up to call_end, is the call."""
    call_end: str = "\n```"
    """Text that closes a call: sampling stops there, the tool runs, its output is appended."""
    output_start: str = "\n```output\n"
    """Text put before the tool's output (not sampled: out of the loss)."""
    output_end: str = "\n```\n"
    """Text put after the tool's output."""
    timeout_s: float = 30.0
    """A call still running after this many seconds gives an error observation (the run does not wait)."""
    max_output_chars: int = 2000
    """Longer observations are cut here."""
    max_output_tokens: int = 1024
    """Context an engine reserves per call for its observation (vLLM's max_model_len grows by max_calls x
    this); observations count toward the context, not toward rollout.max_new_tokens."""


@dataclass
class EnvironmentConfig:
    name: str = ""
    """`module:Class`: the environment, one instance per trajectory (rollouts/environments.py,
    docs/environments.md). Empty: none, the rollouts of today."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the class on every instance: Class(**kwargs)."""
    max_turns: int = 4
    """Most model turns in one episode; the episode ends after the last."""
    timeout_s: float = 30.0
    """An environment method (reset, respond, a tool, get_reward) still running after this many seconds ends
    its trajectory as an error (a tool method: an error observation)."""
    max_output_tokens: int = 512
    """Context an engine reserves per turn for what the environment inserts (not counted toward
    rollout.max_new_tokens)."""


@dataclass
class Config:
    description: str = ""
    """One line shown by `aha recipes`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="math")])
    """Reward functions with weights: [{name: math, weight: 1.0}, {name: format, weight: 0.1}]."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    """Tool calls in the middle of completions (multi-turn rollouts); off unless `tools.use` names a tool."""
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    """A stateful environment per trajectory (multi-turn, its own tools and reward); off unless named."""
    track: TrackConfig = field(default_factory=TrackConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


# --------------------------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (int -> float, mapping -> dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}{extra}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in the config classes, not the recipe


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            extra = f"; did you mean {(prefix + '.' if prefix else '') + hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown config key {full!r}{extra} (valid keys here: {', '.join(names)})")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """`train.steps=10` -> {"train": {"steps": 10}}; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.steps=10)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from None
    nested: dict = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- recipe file <- `key=value` overrides, validated into a Config."""
    values: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path} (see `aha recipes` for the shipped ones)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: a recipe must be a mapping of config sections, got {type(loaded).__name__}"
            )
        values = loaded or {}
    values = _tools_shorthand(values)
    for text in overrides:
        values = _deep_merge(values, _tools_shorthand(parse_override(text)))
    return config_from_dict(values)


def _tools_shorthand(values: dict) -> dict:
    """`tools: [{name: python}]` is short for `tools: {use: [{name: python}]}`."""
    if isinstance(values.get("tools"), list):
        return {**values, "tools": {"use": values["tools"]}}
    return values


def config_from_dict(values: dict) -> Config:
    """A validated Config from nested values (a recipe's, or a saved config.yaml's): defaults filled in."""
    config = _build(Config, _tools_shorthand(values))
    validate(config)
    return config


def validate(config: Config) -> None:
    """Impossible combinations, each with what to change."""
    algo, rollout, train = config.algorithm, config.rollout, config.train
    if rollout.group_size < 2:
        raise ConfigError(
            f"rollout.group_size={rollout.group_size}: a group-relative advantage compares a sample with the "
            "other samples of its prompt, so with fewer than 2 every advantage is 0 and nothing trains; use "
            "rollout.group_size >= 2 (GRPO uses 8 or more)"
        )
    for name in ("steps", "prompts_per_step", "micro_batch_size"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1")
    if rollout.max_new_tokens < 1:
        raise ConfigError("rollout.max_new_tokens must be at least 1")
    if rollout.temperature < 0:
        raise ConfigError("rollout.temperature must be >= 0")
    if not 0 < rollout.top_p <= 1:
        raise ConfigError("rollout.top_p must be in (0, 1]")
    if algo.epochs < 1 or algo.minibatches < 1:
        raise ConfigError("algorithm.epochs and algorithm.minibatches must be at least 1")
    if train.prompts_per_step % algo.minibatches:
        raise ConfigError(
            f"train.prompts_per_step={train.prompts_per_step} is not divisible by algorithm.minibatches="
            f"{algo.minibatches}: whole groups make up a mini-batch, so pick a divisor"
        )
    _resolve_clip_range(algo)
    if algo.dual_clip is not None and algo.dual_clip <= 1:
        raise ConfigError("algorithm.dual_clip must be > 1 (or null to switch it off)")
    if algo.overlong_buffer < 0 or algo.overlong_buffer > rollout.max_new_tokens:
        raise ConfigError(
            f"algorithm.overlong_buffer={algo.overlong_buffer} must be between 0 (off) and "
            f"rollout.max_new_tokens={rollout.max_new_tokens}"
        )
    if algo.dynamic_max_rounds < 0:
        raise ConfigError("algorithm.dynamic_max_rounds must be >= 0")
    _validate_loss_menu(config)
    if rollout.max_staleness < 0 or rollout.engine_threads < 1:
        raise ConfigError("rollout.max_staleness must be >= 0 and rollout.engine_threads >= 1")
    _validate_tools(config)
    if algo.kl_coef < 0:
        raise ConfigError("algorithm.kl_coef must be >= 0")
    if config.optim.lr <= 0:
        raise ConfigError("optim.lr must be > 0")
    if len(config.optim.betas) != 2:
        raise ConfigError("optim.betas must be two numbers, e.g. [0.9, 0.999]")
    if config.eval.size < 0 or config.eval.samples < 1 or config.eval.every < 0:
        raise ConfigError("eval.size and eval.every must be >= 0 and eval.samples >= 1")
    _validate_suite(config.eval)
    if config.model.compute_dtype and config.model.dtype != "float32" and not config.model.lora.r:
        raise ConfigError(
            f"model.compute_dtype={config.model.compute_dtype} is mixed precision over float32 master weights: "
            f"set model.dtype=float32 (got {config.model.dtype}); with LoRA the frozen base may stay in "
            f"{config.model.dtype} (the adapters are float32)"
        )
    if config.model.lora.r < 0:
        raise ConfigError("model.lora.r must be >= 0 (0 = full fine-tuning)")
    if config.model.lora.r and train.sharding == "fsdp":
        raise ConfigError(
            "model.lora.r > 0 with train.sharding=fsdp is not supported: with LoRA only the adapters train, so "
            "gradients and optimizer state are already small; use train.sharding=ddp"
        )
    if config.run.checkpoint_every < 0 or config.run.keep_last < 0:
        raise ConfigError("run.checkpoint_every and run.keep_last must be >= 0")
    if config.track.samples_every < 1 or config.track.log_every < 1:
        raise ConfigError("track.samples_every and track.log_every must be at least 1")
    _validate_alarms(config.track)
    if not config.rewards:
        raise ConfigError("rewards is empty: list at least one reward, e.g. rewards: [{name: math}]")


def _validate_suite(eval_config: EvalConfig) -> None:
    """eval.suite names known benchmarks, once each; eval.suite_limit is positive."""
    unknown = [name for name in eval_config.suite if name not in SUITE_BENCHMARKS]
    if unknown:
        raise ConfigError(
            f"eval.suite: unknown benchmark(s) {', '.join(map(repr, unknown))}; the suite's: "
            + ", ".join(SUITE_BENCHMARKS)
        )
    if len(set(eval_config.suite)) < len(eval_config.suite):
        raise ConfigError("eval.suite names a benchmark twice")
    if eval_config.suite_limit is not None and eval_config.suite_limit < 1:
        raise ConfigError("eval.suite_limit must be >= 1 (or null for every problem)")


def _validate_alarms(track: TrackConfig) -> None:
    """The quiet-degeneration alarms' thresholds (rl/tracking.py Alarms)."""
    for name in ("repetition_alarm", "mismatch_alarm"):
        value = getattr(track, name)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"track.{name} is a fraction in [0, 1] (or null to switch it off), got {value}")
    if track.hacking_window < 0 or track.hacking_window == 1 or track.entropy_steps < 1:
        raise ConfigError(
            "track.hacking_window must be 0 (off) or at least 2, track.entropy_steps at least 1"
        )
    if track.hacking_rise <= 0 or track.flat_gain < 0:
        raise ConfigError("track.hacking_rise must be > 0 and track.flat_gain >= 0")
    if (track.entropy_floor is not None and track.entropy_floor < 0) or (
        track.ratio_alarm is not None and track.ratio_alarm <= 1
    ):
        raise ConfigError("track.entropy_floor must be >= 0 and track.ratio_alarm > 1 (or null: off)")


def _validate_tools(config: Config) -> None:
    """Tool calls (docs/tools.md) and environments (docs/environments.md): not with asynchronous rollouts, sane
    limits, non-empty markers, a call_start of its own for each of several tools."""
    rollout, tools, env = config.rollout, config.tools, config.environment
    if (tools.use or env.name) and rollout.max_staleness:
        raise ConfigError(
            "tool calls and environments with asynchronous rollouts (rollout.max_staleness >= 1) are not "
            "supported yet: a multi-turn episode runs its turns in the trainer's process, the asynchronous "
            "engine samples whole batches in its own (docs/environments.md)"
        )
    if tools.use and env.name:
        raise ConfigError(
            "tools.use and environment.name together: an environment's public methods are its tools; "
            "give the environment the tools it needs"
        )
    if (
        tools.max_calls < 0
        or tools.timeout_s <= 0
        or tools.max_output_chars < 1
        or tools.max_output_tokens < 1
    ):
        raise ConfigError("tools.max_calls must be >= 0, tools.timeout_s > 0, tools.max_output_* >= 1")
    if env.max_turns < 1 or env.timeout_s <= 0 or env.max_output_tokens < 1:
        raise ConfigError(
            "environment.max_turns and max_output_tokens must be >= 1, environment.timeout_s > 0"
        )
    if env.name and ":" not in env.name:
        raise ConfigError(f"environment.name={env.name!r}: name the class as module:Class")
    if tools.use and not all((tools.call_start, tools.call_end, tools.output_start, tools.output_end)):
        raise ConfigError("tools.call_start, call_end, output_start and output_end must not be empty")
    starts = [spec.call_start or tools.call_start for spec in tools.use]
    if len(set(starts)) < len(starts) or any(spec.call_end == "" for spec in tools.use):
        raise ConfigError(
            "several tools need a call_start each (tools.use: [{name: ..., call_start: ..., call_end: ...}]) "
            "so that a call names its tool; call_end must not be empty"
        )


CLIP_DEFAULTS = {"cispo": (None, 4.0)}
"""(clip_low, clip_high) of a policy loss when the recipe sets none; the others take PPO's (0.2, 0.2)."""


def _resolve_clip_range(algo: AlgorithmConfig) -> None:
    """Fill an unset clip bound with the policy loss's own (CLIP_DEFAULTS) and check the range."""
    low, high = CLIP_DEFAULTS.get(algo.policy_loss, (0.2, 0.2))
    algo.clip_low = low if algo.clip_low is None else algo.clip_low
    algo.clip_high = high if algo.clip_high is None else algo.clip_high
    if algo.policy_loss == "cispo":
        if (algo.clip_low is not None and algo.clip_low < 0) or algo.clip_high < 0:
            raise ConfigError("algorithm.clip_low and clip_high must be >= 0 (clip_low null: no lower bound)")
    elif algo.clip_low < 0 or algo.clip_low >= 1 or algo.clip_high < 0:
        raise ConfigError(
            f"algorithm.clip_low must be in [0, 1) and algorithm.clip_high >= 0 for policy_loss="
            f"{algo.policy_loss} (only cispo takes no lower bound)"
        )


def _validate_loss_menu(config: Config) -> None:
    """The loss menu's knobs (rl/losses.py): ranges, and the combinations that cannot work, each with why."""
    algo = config.algorithm
    if algo.tis_cap is not None:
        if algo.tis_cap <= 0:
            raise ConfigError("algorithm.tis_cap must be > 0 (e.g. 2.0), or null to switch it off")
        if algo.mismatch not in ("none", "tis") or algo.mismatch_high not in (None, algo.tis_cap):
            raise ConfigError(
                "algorithm.tis_cap is short for mismatch=tis with mismatch_high=tis_cap: set one or the other"
            )
        algo.mismatch, algo.mismatch_high = "tis", algo.tis_cap
    if algo.mismatch == "tis" and (algo.mismatch_high is None or algo.mismatch_high <= 0):
        raise ConfigError("algorithm.mismatch=tis needs mismatch_high > 0, the cap on the weight (e.g. 2.0)")
    if (
        algo.mismatch in ("token_mask", "sequence_mask")
        and algo.mismatch_low is None
        and algo.mismatch_high is None
    ):
        raise ConfigError(
            f"algorithm.mismatch={algo.mismatch} needs mismatch_low and/or mismatch_high (e.g. 3)"
        )
    bounds = [b for b in (algo.mismatch_low, algo.mismatch_high) if b is not None]
    if any(b <= 0 for b in bounds) or (len(bounds) == 2 and bounds[0] > bounds[1]):
        raise ConfigError("algorithm.mismatch_low and mismatch_high must be > 0 and low <= high")
    if algo.mismatch == "none" and bounds:
        raise ConfigError(
            "algorithm.mismatch_low/high are set but algorithm.mismatch is none: choose a mismatch"
        )
    if algo.entropy_top_frac is not None and not 0 < algo.entropy_top_frac <= 1:
        raise ConfigError("algorithm.entropy_top_frac must be in (0, 1] (e.g. 0.2), or null to switch it off")
    if algo.cov_frac is not None and not 0 < algo.cov_frac <= 1:
        raise ConfigError("algorithm.cov_frac must be in (0, 1] (e.g. 2e-3), or null for the paper's")
    if algo.cov_frac is not None and algo.policy_loss not in ("kl_cov", "clip_cov"):
        raise ConfigError("algorithm.cov_frac is for policy_loss kl_cov or clip_cov")
    if algo.kl_cov_coef < 0:
        raise ConfigError("algorithm.kl_cov_coef must be >= 0 (1 in verl's recipe, 0.1 its default)")
    if algo.ratio_level != "token" and algo.loss_agg != "seq_mean_token_mean":
        warnings.warn(
            f"algorithm.ratio_level={algo.ratio_level} (GSPO) with loss_agg={algo.loss_agg} weights each sequence "
            "by its length, not by the paper's 1/G: set algorithm.loss_agg=seq_mean_token_mean for GSPO's "
            "objective",
            stacklevel=2,
        )
    if algo.ratio_level != "token" and algo.policy_loss != "ppo_clip":
        raise ConfigError(
            f"algorithm.ratio_level={algo.ratio_level} is GSPO's clipped sequence ratio: it replaces the "
            f"ppo_clip loss, so it cannot combine with policy_loss={algo.policy_loss}"
        )
    if algo.dual_clip is not None and (algo.ratio_level != "token" or algo.policy_loss not in ("ppo_clip",)):
        raise ConfigError(
            "algorithm.dual_clip bounds PPO's token-level clipped loss: use it with ppo_clip, token"
        )
    if algo.advantage == "passk" and not 1 <= algo.passk_k <= config.rollout.group_size:
        raise ConfigError(
            f"algorithm.passk_k={algo.passk_k} must be between 1 and rollout.group_size={config.rollout.group_size}"
        )


def to_dict(config: Config) -> dict:
    """Plain dict of the resolved config (what is written to <run>/config.yaml)."""
    return dataclasses.asdict(config)


def config_yaml(config: Config) -> str:
    """The resolved config as YAML (what is written to <run>/config.yaml)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
