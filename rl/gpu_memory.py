"""What a colocated GPU run holds in memory in each phase, from the model's config: the arithmetic in each GPU
recipe's header, checked by `tests/test_recipes.py` so that a recipe that cannot fit its stated GPU fails in CI.

One step has two phases on one GPU (vLLM colocated, `rollout.vllm.sleep_level` 1 or 2):
    rollout   policy weights + AdamW state + reference model + vLLM's share (gpu_memory_utilization x GPU);
              no gradients: the update sets them to None after its last optimizer step (rl/update.py)
    update    policy weights + gradients + AdamW state + reference model + activations; vLLM asleep
              (level 1 offloads its weights to the CPU and drops the KV cache; level 0 keeps its whole share)
Activations depend on lengths, micro-batch and checkpointing; what is left of the GPU after the static parts
is their headroom, which the check requires to be at least `HEADROOM_FRACTION` of the GPU in both phases.

Bytes per parameter (float32 master weights with bf16 compute, the GPU recipes' setting): weights 4,
gradients 4, AdamW 8 (two moments); the reference model in model.dtype. With LoRA only the adapters have
gradients and AdamW state, and the reference is the base model itself (no copy).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
HEADROOM_FRACTION = 0.1
"""Least share of the GPU left for activations, the CUDA context and allocator fragmentation in each phase."""
GPU_GIB = {"24 GB": 23.6, "40 GB": 39.4, "80 GB": 79.6}
"""Usable memory of the GPU sizes recipes name (what torch.cuda reports as total, e.g. 79.6 GiB on an H100)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


@dataclass
class MemoryPlan:
    """GiB of each part in each phase; `fits` when both phases leave the headroom."""

    gpu_gib: float
    weights: float
    gradients: float
    adamw: float
    reference: float
    vllm: float
    vllm_asleep: float

    @property
    def rollout(self) -> float:
        return self.weights + self.adamw + self.reference + self.vllm

    @property
    def update(self) -> float:
        return self.weights + self.gradients + self.adamw + self.reference + self.vllm_asleep

    @property
    def fits(self) -> bool:
        return max(self.rollout, self.update) <= self.gpu_gib * (1 - HEADROOM_FRACTION)

    def describe(self) -> str:
        return (
            f"weights {self.weights:.1f} + AdamW {self.adamw:.1f} + reference {self.reference:.1f} GiB; rollout "
            f"adds vLLM {self.vllm:.1f} = {self.rollout:.1f} GiB; update adds gradients {self.gradients:.1f} "
            f"(vLLM asleep: {self.vllm_asleep:.1f}) = {self.update:.1f} GiB, of {self.gpu_gib:.1f} GiB"
        )


def plan_memory(
    params: int,
    gpu_gib: float,
    dtype: str = "float32",
    lora_params: int = 0,
    reference: bool = False,
    vllm_utilization: float = 0.3,
    sleep_level: int = 1,
) -> MemoryPlan:
    """The memory of each phase of a colocated run (see the module docstring).

    Example: Qwen2.5-3B in float32 with a reference on an 80 GB GPU at 0.3: rollout 69.9 GiB (weights 11.5,
    AdamW 23.0, reference 11.5, vLLM 23.9), update 57.5 GiB.
    """
    weight_bytes = params * DTYPE_BYTES[dtype]
    trainable = lora_params or params
    vllm = vllm_utilization * gpu_gib
    return MemoryPlan(
        gpu_gib=gpu_gib,
        weights=(weight_bytes + lora_params * 4) / GIB,
        gradients=trainable * 4 / GIB,
        adamw=trainable * 8 / GIB,
        reference=weight_bytes / GIB if reference and not lora_params else 0.0,
        vllm=vllm,
        vllm_asleep=vllm if sleep_level == 0 else 0.0,
    )
