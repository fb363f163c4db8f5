"""KV-cached decoding for Llama-family models (Llama, Qwen2) with a preallocated cache, for the transformers engine.

transformers' generic forward is built for every architecture and every cache: each decode step re-creates
the attention mask, re-concatenates every layer's keys and values (DynamicCache), and passes through layers of
wrappers. On a small model that bookkeeping costs more than the matrix products. This module runs the same
computation with the model's own submodules (embeddings, norms, projections, MLPs, rotary embedding, LM
head: called as modules, so LoRA adapters and biases apply and in-place weight updates are seen), and does
only the cache and the attention itself here:

- one cache tensor per layer for keys and one for values, [batch, kv_heads, prompt + max_new, head_dim],
  written in place at the current column;
- one prefill per distinct prompt; the G samples of a group copy its keys and values;
- attention by `scaled_dot_product_attention` over the filled columns, with a key mask for left padding.

`unsupported_reason(model)` says why a model cannot use it (then the engine uses transformers' forward);
`tests/test_logprobs_and_engine.py` checks its logits against transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rollouts.base import has_sharded_parameters

SUPPORTED_TYPES = ("llama", "qwen2")


def base_model(policy: torch.nn.Module) -> torch.nn.Module:
    """The *ForCausalLM under a PEFT wrapper (or the policy itself)."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def unsupported_reason(policy: torch.nn.Module) -> str | None:
    """None when `policy` can decode here; else why not (architecture, attention variant)."""
    model = base_model(policy)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return f"model type {model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "use_sliding_window", False) or any(
        kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()
    ):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(model).__name__} does not have the Llama module layout"
    if has_sharded_parameters(model):  # FSDP2 shards, not gathered for decoding
        return "sharded (DTensor) parameters"
    return None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it: x*cos + rotate_half(x)*sin. x [B, H, L, D], cos/sin [B, 1, L, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaDecoder:
    """Prefill and decode steps for `batch` sequences of at most `max_len` tokens in all."""

    def __init__(self, policy: torch.nn.Module, batch: int, max_len: int) -> None:
        model = base_model(policy)
        self.inner, self.lm_head = model.model, model.get_output_embeddings()
        attn = self.inner.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        kv_heads = model.config.num_key_value_heads
        weight = self.inner.embed_tokens.weight
        shape = (batch, kv_heads, max_len, self.head_dim)
        device = weight.device.type  # under autocast (mixed precision) keys and values come in its dtype
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        self.keys = [
            weight.new_empty(shape, dtype=dtype) for _ in self.inner.layers
        ]  # [B, KV, T, D] per layer
        self.values = [weight.new_empty(shape, dtype=dtype) for _ in self.inner.layers]
        self.valid = torch.zeros((batch, max_len), dtype=torch.bool, device=weight.device)  # key mask
        self.gqa = model.config.num_attention_heads != kv_heads
        self.length = 0  # columns filled
        self.positions = torch.zeros(batch, dtype=torch.long, device=weight.device)

    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, copies: int) -> torch.Tensor:
        """Run left-padded prompts [P, L] (attention 1 = token) once; row p fills cache rows p*copies ...
        (p+1)*copies - 1. Returns the last position's logits for every cache row [P*copies, V]."""
        prompts, width = input_ids.shape
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [P, L]
        valid = attention.bool()
        causal = torch.ones((width, width), dtype=torch.bool, device=input_ids.device).tril()
        # A query may see earlier tokens of its own row; a padding query sees itself too, so that no row of
        # the attention is empty (an empty row would give NaN and poison the padding's keys downstream).
        mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=input_ids.device)
        hidden = self._layers(input_ids, positions, mask[:, None], slice(0, width), copies)
        self.valid[:, :width] = valid.repeat_interleave(copies, 0)
        self.length = width
        self.positions = positions[:, -1].repeat_interleave(copies, 0) + 1  # [B] of the next token
        logits = self.lm_head(self.inner.norm(hidden[:, -1]))  # [P, V]
        return logits.repeat_interleave(copies, 0)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (ids [B]); returns the next logits [B, V]."""
        column = self.length
        self.valid[:, column] = True
        mask = self.valid[:, None, None, : column + 1]  # [B, 1, 1, T]
        hidden = self._layers(ids[:, None], self.positions[:, None], mask, slice(column, column + 1), 1)
        self.length, self.positions = column + 1, self.positions + 1
        return self.lm_head(self.inner.norm(hidden[:, -1]))

    def _layers(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, columns: slice, copies: int
    ) -> torch.Tensor:
        hidden = self.inner.embed_tokens(ids)  # [R, L, H]
        rows, length = ids.shape
        cos, sin = self.inner.rotary_emb(hidden, positions)  # [R, L, D]
        cos, sin = cos[:, None], sin[:, None]
        for layer, keys, values in zip(self.inner.layers, self.keys, self.values, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(rows, length, -1, self.head_dim).transpose(1, 2)  # [R, H, L, D]
            k = attn.k_proj(x).view(rows, length, -1, self.head_dim).transpose(1, 2)  # [R, KV, L, D]
            v = attn.v_proj(x).view(rows, length, -1, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if copies == 1:
                keys[:, :, columns], values[:, :, columns] = k, v
                k, v = keys[:, :, : columns.stop], values[:, :, : columns.stop]
            else:  # prefill: the prompt's own keys serve its attention; the cache gets one copy per sample
                keys[:, :, columns] = k.repeat_interleave(copies, 0)
                values[:, :, columns] = v.repeat_interleave(copies, 0)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=self.gqa
            )
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(rows, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden
