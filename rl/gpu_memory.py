"""What a colocated GPU run holds in memory in each phase, from the model's config: the arithmetic in each GPU
recipe's header, checked by `tests/test_recipes.py` so that a recipe that cannot fit its stated GPU fails in CI.

One step has three phases on one GPU (vLLM colocated, `rollout.vllm.sleep_level` 1 or 2):
    rollout   policy weights + AdamW state + reference model + DDP's gradient buckets + vLLM's share
              (gpu_memory_utilization x GPU); no .grad tensors: the update sets them to None after its last
              optimizer step (rl/update.py)
    update    the same without vLLM's share (asleep: what it keeps, below) + gradients + the larger of the
              forward's bf16 weight copies and the optimizer step's temporary; activations come on top
    sync      vLLM's weights awake, its KV cache not yet mapped back, plus the sync's largest temporary;
              below the rollout phase, and the engine empties PyTorch's cache before it maps the KV cache
              back, so the temporaries do not stay beside it
Activations depend on lengths, micro-batch and checkpointing; what is left of the GPU after the static parts
is their headroom, which the check requires to be at least `HEADROOM_FRACTION` of the GPU in each phase.

Bytes per parameter (float32 master weights with bf16 compute, the GPU recipes' setting), each with its source:
    weights 4, AdamW 8 (two float32 moments), gradients 4 (float32, like the weights);
    AdamW step +4 of the trainable: torch's default multi-tensor (foreach) AdamW computes the update in
        temporaries of a whole parameter group (`torch/optim/adamw.py`, `_multi_tensor_adam`: e.g.
        `exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)`), a float32 copy at the step;
    autocast +2 (bf16): autocast keeps a bf16 copy of each float32 weight it casts until the outermost
        autocast region exits, and autograd saves the copies for the backward (`torch.autocast` docs,
        "weight cast cache");
    DDP +4: its gradient buckets (`torch.nn.parallel.DistributedDataParallel`, bucket_cap_mb), allocated
        when the model is wrapped, after vLLM has sized itself, and kept for the whole run. With
        `gradient_as_bucket_view=True` (aha's setting) the .grad tensors are views into them: 4 bytes for
        both, through the rollout too; without it the update holds 8;
    reference: the compute dtype's bytes (rl/run.py loads it in model.compute_dtype: bf16, 2);
    vLLM asleep: sleep frees the weights and KV cache from vLLM's own allocator pool (CuMemAllocator); its
        CUDA-graph pools, the CUDA context and workspaces stay: `VLLM_ASLEEP_GIB` is an estimate until
        `benchmarks/gpu_check.py --only memory_trace` measures it.
With LoRA only the adapters have gradients and AdamW state, and the reference is the base model itself (no copy).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
HEADROOM_FRACTION = 0.1
"""Least share of the GPU left for activations, the CUDA context and allocator fragmentation in each phase."""
GPU_GIB = {"24 GB": 23.6, "40 GB": 39.4, "80 GB": 79.6}
"""Usable memory of the GPU sizes recipes name (what torch.cuda reports as total, e.g. 79.6 GiB on an H100)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
VLLM_ASLEEP_GIB = 1.0
"""What vLLM keeps on the GPU while asleep (CUDA graphs, workspaces): an estimate, not measured (no GPU)."""


def count_params(hf: dict) -> int:
    """Parameters of a Llama/Qwen2-style decoder from its config.json fields.

    Example: Qwen2.5-3B (hidden 2048, 36 layers, intermediate 11008, 16 heads, 2 KV heads, vocab 151936,
    tied) -> 3,085,938,688.
    """
    hidden, layers, inter = hf["hidden_size"], hf["num_hidden_layers"], hf["intermediate_size"]
    head_dim = hf.get("head_dim") or hidden // hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads", hf["num_attention_heads"]) * head_dim
    qkv_bias = hf.get("model_type") == "qwen2"
    attention = hidden * hidden * 2 + hidden * kv * 2 + ((hidden + 2 * kv) if qkv_bias else 0)
    per_layer = attention + 3 * hidden * inter + 2 * hidden  # q, k, v, o; gate, up, down; two norms
    embeddings = hf["vocab_size"] * hidden * (1 if hf.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + hidden  # + the final norm


def largest_tensor(hf: dict) -> int:
    """Elements of the model's largest weight (the embedding: vocab x hidden), the sync's largest temporary."""
    return max(hf["vocab_size"] * hf["hidden_size"], hf["hidden_size"] * hf["intermediate_size"])


@dataclass
class MemoryPlan:
    """GiB of each part in each phase; `fits` when every phase leaves the headroom."""

    gpu_gib: float
    weights: float
    gradients: float
    adamw: float
    adamw_step: float
    autocast_copies: float
    ddp_buckets: float
    reference: float
    vllm: float
    vllm_asleep: float
    vllm_weights: float
    sync_temporary: float

    @property
    def static(self) -> float:
        """What every phase holds: the trainer's weights and optimizer state, the reference, DDP's buckets."""
        return self.weights + self.adamw + self.reference + self.ddp_buckets

    @property
    def rollout(self) -> float:
        return self.static + self.vllm

    @property
    def update(self) -> float:
        peak = max(self.autocast_copies, self.adamw_step)  # the forward's copies or the step's temporary
        return self.static + self.gradients + peak + self.vllm_asleep

    @property
    def sync(self) -> float:
        return self.static + self.vllm_weights + self.sync_temporary

    @property
    def fits(self) -> bool:
        return max(self.rollout, self.update, self.sync) <= self.gpu_gib * (1 - HEADROOM_FRACTION)

    def describe(self) -> str:
        ddp = f" + DDP buckets {self.ddp_buckets:.1f}" if self.ddp_buckets else ""
        gradients = "gradients in the buckets" if self.ddp_buckets else f"gradients {self.gradients:.1f}"
        return (
            f"weights {self.weights:.1f} + AdamW {self.adamw:.1f} + reference {self.reference:.1f}{ddp} GiB; "
            f"rollout adds vLLM {self.vllm:.1f} = {self.rollout:.1f} GiB; update adds {gradients}, the larger of bf16 weight copies {self.autocast_copies:.1f} and the AdamW "
            f"step's temporary {self.adamw_step:.1f}, vLLM asleep {self.vllm_asleep:.1f} = {self.update:.1f} "
            f"GiB, of {self.gpu_gib:.1f} GiB"
        )


def plan_memory(
    params: int,
    gpu_gib: float,
    dtype: str = "float32",
    lora_params: int = 0,
    reference: bool = False,
    vllm_utilization: float = 0.3,
    sleep_level: int = 2,
    compute_dtype: str | None = None,
    ddp: bool = False,
    largest: int = 0,
) -> MemoryPlan:
    """The memory of each phase of a colocated run (see the module docstring). `ddp`: launched on several
    GPUs with DistributedDataParallel; `largest`: elements of the largest weight (`largest_tensor`).

    Example: Qwen2.5-3B, float32 master weights, bf16 compute, a reference, on an 80 GB GPU at 0.3: rollout
    64.1 GiB (weights 11.5, AdamW 23.0, bf16 reference 5.7, vLLM 23.9), update 64.3 GiB (+ gradients 11.5,
    AdamW step 11.5, vLLM asleep 1.0); with DDP its buckets add 11.5 GiB to both: 75.6, more than 90% of 79.6.
    """
    weight_bytes = params * DTYPE_BYTES[dtype]
    compute = compute_dtype or dtype
    trainable = lora_params or params
    cast = params * DTYPE_BYTES[compute] if compute != dtype and not lora_params else 0  # the frozen base
    gradients = trainable * 4 / GIB
    return MemoryPlan(
        gpu_gib=gpu_gib,
        weights=(weight_bytes + lora_params * 4) / GIB,
        gradients=0.0 if ddp else gradients,  # under DDP the .grad tensors are views into its buckets
        adamw=trainable * 8 / GIB,
        adamw_step=trainable * 4 / GIB,
        autocast_copies=cast / GIB,
        ddp_buckets=gradients if ddp else 0.0,
        reference=params * DTYPE_BYTES[compute] / GIB if reference and not lora_params else 0.0,
        vllm=vllm_utilization * gpu_gib,
        vllm_asleep=vllm_utilization * gpu_gib if sleep_level == 0 else VLLM_ASLEEP_GIB,
        vllm_weights=params * DTYPE_BYTES[compute] / GIB,
        sync_temporary=largest * (DTYPE_BYTES[compute] + 4) / GIB,  # the cast copy (+ a gathered fp32 whole)
    )
