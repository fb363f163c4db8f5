"""KV-cached decoding for Llama-family models (Llama, Qwen2) with a preallocated cache, for the transformers engine.

transformers' generic forward is built for every architecture and every cache: each decode step re-creates
the attention mask, re-concatenates every layer's keys and values (DynamicCache), and passes through layers of
wrappers. On a small model that bookkeeping costs more than the matrix products. This module runs the same
computation with the model's own submodules (embeddings, norms, projections, the MLP's activation, rotary
embedding, LM head: LoRA adapters, biases and hooks apply, and in-place weight updates are seen), and does
only the cache, the attention and the MLP's gating itself here (and, where that is exact, the norms and the
rotary table):

- one cache tensor per layer for keys and one for values, [batch, kv_heads, prompt + max_new, head_dim],
  written in place at the current column;
- one prefill per distinct prompt; the G samples of a group copy its keys and values;
- on a CPU, each plain `nn.Linear` multiplies by a transposed copy of its weight made once per decoder
  (`x @ W^T` as an [in, out] matrix): MKL's small-batch product is faster in that layout, 11% of the whole
  rollout on the benchmark model, for one extra copy of the weights while the decoder lives (up to 1 GiB of
  weights, TRANSPOSE_MAX_BYTES). LoRA layers, layers with forward hooks and other modules are called as
  they are. A layer whose q, k and v projections all have copies gets them side by side instead: one
  product, and one rotation of the q and k heads together;
- fewer small calls per step, with the same arithmetic: the rotary cos/sin come from a table made once (for
  the rope types that depend on the position alone), and on a CPU transformers' float32 RMS norms run as
  one `rms_norm` call each. A decode step of 32 rows runs about 200 operators, so on a CPU the calls
  themselves cost as much as some of the products: together with the fused q/k/v, 1.04-1.06x the rollout of
  the benchmark model, logits bitwise equal;
- the prefill attends with `scaled_dot_product_attention`. A decode step (one query per row) with a float32
  cache uses two batched matrix products over the filled columns of the cache, seen as
  [rows x kv_heads, columns, head_dim] without a copy, and an additive key mask for left padding: on a CPU
  85 us where `scaled_dot_product_attention` takes 200 us (32 rows, 96 columns), as its kernel copies the
  strided cache slice and runs a loop built for long queries. A bf16/fp16 cache (autocast, half weights)
  keeps `scaled_dot_product_attention`, which accumulates in float32 as the trainer's attention does;
  products in half precision would put the sampler's log-probs 2e-2 away from the trainer's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    """Rotary embedding as transformers applies it: x*cos + rotate_half(x)*sin. x [B, H, L, D], cos/sin [B, 1, L, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


TRANSPOSE_MAX_BYTES = 2**30
"""Above this many bytes of linear weights (a 268M-parameter float32 model) the decoder does not make its
transposed copies: the extra memory would outweigh a 10% faster rollout."""


def _transposed_weights(
    model: torch.nn.Module,
) -> dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor | None]]:
    """{layer: (W^T contiguous [in, out], bias)} for every plain nn.Linear of `model`: not LoRA layers, whose
    adapters must apply, nor subclasses, nor a layer with forward hooks (they must see the call). Empty when
    the weights are larger than TRANSPOSE_MAX_BYTES."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return {}
    linears = [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)
    ]
    if sum(m.weight.numel() * m.weight.element_size() for m in linears) > TRANSPOSE_MAX_BYTES:
        return {}
    return {
        m: (m.weight.detach().t().contiguous(), None if m.bias is None else m.bias.detach()) for m in linears
    }


def _fused_qkv(
    layers: torch.nn.ModuleList, transposed: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor | None]]
) -> dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor | None]]:
    """{attention: ([in, (H + 2KV) * D] weight, bias)}: the q, k and v projections side by side, for the layers
    whose three projections all have transposed copies (and all or none have a bias). Their copies move out
    of `transposed`, so the fused weight costs no memory of its own."""
    fused = {}
    for layer in layers:
        attn = layer.self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        if not all(p in transposed for p in projections):
            continue
        biases = [transposed[p][1] for p in projections]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            continue
        weights = [transposed.pop(p)[0] for p in projections]
        fused[attn] = (torch.cat(weights, 1), None if biases[0] is None else torch.cat(biases))
    return fused


def _product(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight_t (+ bias) over x's last dimension; weight_t is [in, out]."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ weight_t if bias is None else torch.addmm(bias, flat, weight_t)
    return out.view(*x.shape[:-1], weight_t.shape[1])


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
        self.product_attention = dtype == torch.float32  # see the module docstring
        self.kv_heads = kv_heads
        self.gqa = model.config.num_attention_heads != kv_heads
        self.length = 0  # columns filled
        self.positions = torch.zeros(batch, dtype=torch.long, device=weight.device)
        self.transposed = _transposed_weights(model) if weight.device.type == "cpu" else {}
        self.fused_qkv = _fused_qkv(self.inner.layers, self.transposed)  # takes their parts out of transposed
        rotary = self.inner.rotary_emb
        self.rotary_table = None  # (cos, sin) [max_len, D] when they depend on the position alone
        if getattr(rotary, "rope_type", "default") in ("default", "linear", "llama3", "yarn"):
            cos, sin = rotary(weight.new_empty(()), torch.arange(max_len, device=weight.device)[None])
            self.rotary_table = (cos[0], sin[0])  # in the embeddings' dtype, as the layers get them
        # On a CPU, transformers' RMS norms as one rms_norm call: the same float32 arithmetic (checked bitwise).
        # Not under autocast, which may run rms_norm in another dtype than the module's explicit float32, nor
        # on a GPU, where rms_norm is a fused kernel that may sum in another order than the trainer's norm.
        self.plain_norms = set()
        if weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            self.plain_norms = {
                m
                for m in model.modules()
                if type(m).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm")
                and m.weight.dtype == torch.float32
                and not (m._forward_hooks or m._forward_pre_hooks)
            }

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
        logits = self._linear(self.lm_head, self._norm(self.inner.norm, hidden[:, -1]))  # [P, V]
        return logits.repeat_interleave(copies, 0)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (ids [B]); returns the next logits [B, V]."""
        column = self.length
        self.valid[:, column] = True
        mask = self.valid[:, None, None, : column + 1]  # [B, 1, 1, T]
        if self.product_attention:  # additive [B * KV, 1, T]: a row per (sequence, kv head), as in the cache
            bias = torch.zeros(mask.shape, dtype=self.keys[0].dtype, device=mask.device)
            bias = bias.masked_fill_(~mask, -torch.inf).expand(-1, self.kv_heads, -1, -1)
            mask = bias.reshape(-1, 1, column + 1)
        hidden = self._layers(ids[:, None], self.positions[:, None], mask, slice(column, column + 1), None)
        self.length, self.positions = column + 1, self.positions + 1
        return self._linear(self.lm_head, self._norm(self.inner.norm, hidden[:, -1]))

    def _layers(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        columns: slice,
        copies: int | None,
    ) -> torch.Tensor:
        """Run the layers over `ids` [R, L] into cache `columns`: a prefill (`copies` cache rows per row, `mask`
        [R, 1, L, L] bool) or a decode step (`copies` None, L = 1, `mask` the additive key bias, or the bool key
        mask [R, 1, 1, T] for scaled_dot_product_attention)."""
        hidden = self.inner.embed_tokens(ids)  # [R, L, H]
        rows, length = ids.shape
        cos, sin = self._rotary(hidden, positions)  # [R, L, D]
        cos, sin = cos[:, None], sin[:, None]
        for layer, keys, values in zip(self.inner.layers, self.keys, self.values, strict=True):
            attn = layer.self_attn
            x = self._norm(layer.input_layernorm, hidden)
            if attn in self.fused_qkv:  # one product, then one rotation of the q and k heads together
                qkv = _product(x, *self.fused_qkv[attn])  # [R, L, (H + 2KV) * D]
                qkv = qkv.view(rows, length, -1, self.head_dim).transpose(1, 2)  # [R, H + 2KV, L, D]
                qk = _rotate(qkv[:, : -self.kv_heads], cos, sin)  # [R, H + KV, L, D]
                q, k, v = qk[:, : -self.kv_heads], qk[:, -self.kv_heads :], qkv[:, -self.kv_heads :]
            else:
                heads = [
                    self._linear(proj, x).view(rows, length, -1, self.head_dim).transpose(1, 2)
                    for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
                ]
                q, k, v = heads  # [R, H, L, D], [R, KV, L, D], [R, KV, L, D]
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if copies is None:  # a decode step: append this column, attend over the filled ones
                keys[:, :, columns], values[:, :, columns] = k, v
                if self.product_attention:
                    out = self._decode_attention(q, keys, values, columns.stop, mask)
                else:
                    out = self._sdpa(q, keys[:, :, : columns.stop], values[:, :, : columns.stop], mask)
            else:  # prefill: the prompt's own keys serve its attention; the cache gets one copy per sample
                keys[:, :, columns] = k.repeat_interleave(copies, 0)
                values[:, :, columns] = v.repeat_interleave(copies, 0)
                out = self._sdpa(q, k, v, mask)
            hidden = hidden + self._linear(attn.o_proj, out.transpose(1, 2).reshape(rows, length, -1))
            x, mlp = self._norm(layer.post_attention_layernorm, hidden), layer.mlp  # down(act(gate) * up)
            gated = mlp.act_fn(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x)
            hidden = hidden + self._linear(mlp.down_proj, gated)
        return hidden

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=self.gqa
        )

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's (cos, sin) at `positions` [R, L], each [R, L, D]: rows of a table made once
        for positions 0 .. max_len - 1 when the embedding does not depend on the sequence length."""
        if self.rotary_table is None:
            return self.inner.rotary_emb(hidden, positions)
        cos, sin = self.rotary_table
        return cos[positions], sin[positions]

    def _norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x); a plain float32 RMS norm as one `rms_norm` call (the same arithmetic, fewer calls)."""
        if module in self.plain_norms and x.dtype == torch.float32:
            return F.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)
        return module(x)

    def _linear(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x), by the transposed weight when there is one."""
        if module not in self.transposed:
            return module(x)
        return _product(x, *self.transposed[module])

    def _decode_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, filled: int, bias: torch.Tensor
    ) -> torch.Tensor:
        """One query per row: q [B, H, 1, D] against the first `filled` columns of the cache [B, KV, T, D].
        bias [B * KV, 1, filled] (0 or -inf). Returns [B, H, 1, D].

        The g = H / KV query heads that share a kv head (transformers' repeat_kv order) form the rows of one
        small matrix product against that head's keys, so the cache is read in place, once per kv head."""
        rows, heads, _, dim = q.shape
        max_len = keys.shape[2]
        q = q.reshape(rows * self.kv_heads, heads // self.kv_heads, dim)  # [B*KV, g, D]
        k = keys.view(rows * self.kv_heads, max_len, dim)[:, :filled]  # [B*KV, T, D], a view
        v = values.view(rows * self.kv_heads, max_len, dim)[:, :filled]
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.scaling)  # [B*KV, g, T]
        out = torch.bmm(torch.softmax(scores, dim=-1), v)  # [B*KV, g, D]
        return out.view(rows, heads, 1, dim)
