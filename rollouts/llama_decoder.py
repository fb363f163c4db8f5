"""KV-cached decoding for Llama-family models (Llama, Qwen2), for the transformers engine.

Why a decoder of its own: transformers' generic forward serves every architecture and every kind of cache, so
each decode step rebuilds the attention mask and appends every layer's keys and values to a cache that grows
by concatenation, a cost that grows with the sequence. What this module does itself, and nothing more:

- the cache: one key and one value tensor per layer, [batch, kv_heads, prompt + max_new, head_dim],
  allocated once and written in place at the current column, with a key mask for left padding;
- one prefill per distinct prompt: the G samples of a group copy its keys and values;
- the attention over that cache: `scaled_dot_product_attention` on its filled columns.

Everything else is the model's own modules, called as modules: the embeddings, the norms, the q/k/v/o
projections, the MLP, the rotary embedding and the LM head (a plain `nn.Linear` head without hooks of its own
is computed as the trainer computes it, `rl.logprobs.head_logits`: float32 logits from compute-dtype
inputs, so sampling and training agree under bf16 autocast; global forward hooks do not see that call). So LoRA adapters, biases, forward hooks on those
modules (global ones too) and in-place weight updates all apply, and the decoder holds no copy of any
weight. The decoder layers and attention modules themselves are not called, nor the model's forward: hooks
registered on those do not run here. A policy whose hooks must see those calls decodes with
`rollout.transformers.fast_decoding=false`, through transformers' forward, as do the models this module does
not cover (`unsupported_reason`). Tests hold the two paths' logits and sampled tokens equal;
`benchmarks/decoder.py` measures their speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rl.logprobs import head_logits, plain_linear
from rl.weights import has_sharded_parameters

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
    """Rotary embedding as transformers applies it: x*cos + rotate_half(x)*sin.
    x [B, H, L, D], cos/sin [B, 1, L, D]."""
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
        self.kv_heads = model.config.num_key_value_heads
        self.gqa = model.config.num_attention_heads != self.kv_heads
        weight = self.inner.embed_tokens.weight
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        device = weight.device.type  # under autocast (mixed precision) keys and values come in its dtype
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        # [B, KV, T, D] per layer
        self.keys = [weight.new_empty(shape, dtype=dtype) for _ in self.inner.layers]
        self.values = [weight.new_empty(shape, dtype=dtype) for _ in self.inner.layers]
        self.valid = torch.zeros((batch, max_len), dtype=torch.bool, device=weight.device)  # key mask
        self.length = 0  # columns filled
        self.positions = torch.zeros(batch, dtype=torch.long, device=weight.device)

    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, copies: int) -> torch.Tensor:
        """Run left-padded prompts [P, L] (attention 1 = token) once; row p fills cache rows p*copies ...
        (p+1)*copies - 1. Returns the last position's logits for every cache row [P*copies, V]."""
        width = input_ids.shape[1]
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [P, L]
        valid = attention.bool()
        causal = torch.ones((width, width), dtype=torch.bool, device=input_ids.device).tril()
        # A query may see earlier tokens of its own row; a padding query sees itself too, so that no row of
        # the attention is empty (an empty row would give NaN and poison the padding's keys downstream).
        mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=input_ids.device)
        hidden = self._layers(input_ids, positions, mask[:, None], slice(0, width), copies)  # [P, L, H]
        self.valid[:, :width] = valid.repeat_interleave(copies, 0)
        self.length = width
        self.positions = positions[:, -1].repeat_interleave(copies, 0) + 1  # [B] of the next token
        return self._head(self.inner.norm(hidden[:, -1])).repeat_interleave(copies, 0)  # [B, V]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (ids [B]); returns the next logits [B, V]."""
        column = self.length
        self.valid[:, column] = True
        mask = self.valid[:, None, None, : column + 1]  # [B, 1, 1, T]: the filled columns that are tokens
        hidden = self._layers(ids[:, None], self.positions[:, None], mask, slice(column, column + 1), None)
        self.length, self.positions = column + 1, self.positions + 1
        return self._head(self.inner.norm(hidden[:, -1]))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, V] logits; a plain linear head computes them as the trainer does (`rl.logprobs.head_logits`:
        compute-dtype inputs, a float32 product), so sampling and training see the same logits."""
        if plain_linear(self.lm_head):
            return head_logits(hidden, self.lm_head.weight, self.lm_head.bias)
        return self.lm_head(hidden)

    def _layers(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        columns: slice,
        copies: int | None,
    ) -> torch.Tensor:
        """Run the layers over `ids` [R, L] at `positions` [R, L] into cache `columns`: a prefill (`copies`
        cache rows per row; `mask` [R, 1, L, L]) or a decode step (`copies` None, L = 1; `mask` [R, 1, 1, T]
        over the cache's filled columns). `mask` is True where a query may attend. Returns [R, L, H]."""
        hidden = self.inner.embed_tokens(ids)  # [R, L, H]
        rows, length = ids.shape
        cos, sin = self.inner.rotary_emb(hidden, positions)  # [R, L, D]
        cos, sin = cos[:, None], sin[:, None]
        for layer, keys, values in zip(self.inner.layers, self.keys, self.values, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q, k, v = (
                proj(x).view(rows, length, -1, self.head_dim).transpose(1, 2)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )  # [R, H, L, D], [R, KV, L, D], [R, KV, L, D]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if copies is None:  # a decode step: append this column, attend over the filled ones
                keys[:, :, columns], values[:, :, columns] = k, v
                k, v = keys[:, :, : columns.stop], values[:, :, : columns.stop]  # [R, KV, T, D] views
            else:  # prefill: the prompt's own keys serve its attention; the cache gets one copy per sample
                keys[:, :, columns] = k.repeat_interleave(copies, 0)
                values[:, :, columns] = v.repeat_interleave(copies, 0)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=self.gqa
            )  # [R, H, L, D]
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(rows, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden
