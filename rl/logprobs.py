"""Log-probs of sampled completion tokens under a causal LM, without a [batch, seq, vocab] log-softmax.

The model body runs once on prompt+completion; the LM head, the log-softmax and the gather then run on
chunks of completion positions only. When several completions share a prompt (a GRPO group), the prompt runs
once: its keys and values, still differentiable, are indexed to each of its completions, which then run
attending to them. Gradients reach the prompt's weights through both paths, exactly as in the full forward,
while its tokens are computed 1 time instead of G. With gradients on, no chunk's logits are kept for the
backward pass: `HeadLogprobs` recomputes them there (a plain nn.Linear head), or the chunk is checkpointed
(any other head): peak memory holds one chunk's [chunk, vocab] logits, not the whole batch's. At a 152k vocabulary and 8k completion tokens that is the difference between 5 GB
and a few hundred MB.

The head's logits are float32 under every compute dtype (`head_logits`): bf16 inputs under autocast, a float32
product and output, as vLLM (`head_dtype: float32`) and the transformers engine compute them. A bf16 output
would put an error of about |z| x 2^-9 on each logit, as large as the engine mismatch TIS corrects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from rl.weights import has_sharded_parameters, is_sharded


@dataclass
class PackedBatch:
    """Sequences laid out for one forward pass. Completion tensors are left-aligned: [:, j] is token j."""

    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L]
    prompt_lens: torch.Tensor  # [B]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] 1 on real completion tokens
    prompt_ids: torch.Tensor  # [U, P] the distinct prompts, left-padded
    prompt_attention: torch.Tensor  # [U, P]
    prompt_index: torch.Tensor  # [B] which distinct prompt each sequence continues


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution, H = logsumexp(z) - sum softmax(z) * z.

    Args:
        logits: [..., V]
    Returns:
        [...] entropy in nats.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> PackedBatch:
    """Lay out (prompt, completion) token lists as right-padded tensors."""
    batch = len(prompts)
    seq_len = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    comp_len = max(max((len(c) for c in completions), default=1), 1)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, seq_len), dtype=torch.long)
    completion_ids = torch.full((batch, comp_len), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((batch, comp_len), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        attention[i, :n] = 1
        if c:
            completion_ids[i, : len(c)] = torch.tensor(c)
            completion_mask[i, : len(c)] = 1
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    position = {p: i for i, p in enumerate(dict.fromkeys(tuple(p) for p in prompts))}
    distinct = list(position)
    prompt_index = torch.tensor([position[tuple(p)] for p in prompts], dtype=torch.long)
    width = max((len(p) for p in distinct), default=1)
    prompt_ids = torch.full((len(distinct), width), pad_id, dtype=torch.long)
    prompt_attention = torch.zeros((len(distinct), width), dtype=torch.long)
    for i, p in enumerate(distinct):
        prompt_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        prompt_attention[i, width - len(p) :] = 1
    return PackedBatch(
        input_ids,
        attention,
        prompt_lens,
        completion_ids,
        completion_mask,
        prompt_ids,
        prompt_attention,
        prompt_index,
    )


def completion_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each completion token under softmax(logits / temperature).

    Returns (logprobs [B, T], entropy [B, T] or None), zero where completion_mask is 0. Entropy is detached
    (a metric). Gradients flow into logprobs when grad mode is on. `share_prompts`: run each distinct prompt
    once (used when prompts repeat and the model allows it, see `_can_share_prompts`).
    """
    device = next(model.parameters()).device
    body = model.get_decoder()
    mask = batch.completion_mask.to(device).bool()  # [B, T]
    if share_prompts and len(batch.prompt_ids) < len(batch.input_ids) and _can_share_prompts(model):
        selected = _shared_prompt_hidden(body, batch, device)[mask]  # [N, H] only real completion tokens
    else:
        input_ids = batch.input_ids.to(device)
        hidden = body(
            input_ids=input_ids, attention_mask=batch.attention_mask.to(device)
        ).last_hidden_state  # [B,L,H]
        comp_len = batch.completion_ids.shape[1]
        # Hidden state at position p predicts token p+1: completion token j sits at prompt_len + j.
        positions = batch.prompt_lens[:, None] - 1 + torch.arange(comp_len)[None, :]  # [B, T]
        positions = positions.clamp(max=input_ids.shape[1] - 1).to(device)
        rows = torch.arange(input_ids.shape[0], device=device)[:, None].expand_as(positions)
        selected = hidden[rows[mask], positions[mask]]  # [N, H] only real completion tokens
    targets = batch.completion_ids.to(device)[mask]  # [N]

    head = model.get_output_embeddings()
    lp_chunks, ent_chunks = [], []
    for start in range(0, selected.shape[0], chunk_size):
        h, tgt = selected[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and plain_linear(head):
            lp, ent = HeadLogprobs.apply(h, head.weight, head.bias, tgt, temperature, with_entropy)
        elif torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk, head, h, tgt, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk(head, h, tgt, temperature, with_entropy)
        lp_chunks.append(lp)
        ent_chunks.append(ent)

    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    logprobs = logprobs.masked_scatter(mask, torch.cat(lp_chunks)) if lp_chunks else logprobs
    entropy = None
    if with_entropy:
        entropy = torch.zeros(mask.shape, dtype=torch.float32, device=device)
        entropy = entropy.masked_scatter(mask, torch.cat(ent_chunks)) if ent_chunks else entropy
    return logprobs, entropy


def _can_share_prompts(model: torch.nn.Module) -> bool:
    """Sharing runs the body twice with a cache between the runs. Not under gradient checkpointing (the
    recomputed layers would append to the cache a second time) nor with FSDP2 shards (a layer would gather
    and reshard twice per step); those take the full forward."""
    if getattr(model, "is_gradient_checkpointing", False):
        return False
    return not has_sharded_parameters(model)


def _shared_prompt_hidden(body: torch.nn.Module, batch: PackedBatch, device: torch.device) -> torch.Tensor:
    """[B, T, H]: the hidden state that predicts completion token j, with each distinct prompt run once."""
    from transformers import DynamicCache

    prompt_mask = batch.prompt_attention.to(device)  # [U, P]
    out = body(
        input_ids=batch.prompt_ids.to(device),
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
    )
    index = batch.prompt_index.to(device)  # [B]
    # [B, 1, H]; with left padding the last column is each prompt's last token
    first = out.last_hidden_state[:, -1:].index_select(0, index)
    comp_len = batch.completion_ids.shape[1]
    if comp_len == 1:
        return first
    # Each sequence gets its prompt's keys and values (an index, so gradients add up over the group).
    # index_select, not tensor[index]: the latter's backward (index_put_ with accumulate) adds the repeats in
    # an order that varies between processes with several CPU threads when a micro-batch mixes many prompts.
    cache = DynamicCache(
        ddp_cache_data=[
            (layer.keys.index_select(0, index), layer.values.index_select(0, index))
            for layer in out.past_key_values.layers
        ],
        config=body.config,
    )
    completion_mask = batch.completion_mask[:, :-1].to(device=device, dtype=prompt_mask.dtype)  # [B, T-1]
    rest = body(
        input_ids=batch.completion_ids[:, :-1].to(device),
        attention_mask=torch.cat([prompt_mask[index], completion_mask], 1),
        position_ids=batch.prompt_lens.to(device)[:, None] + torch.arange(comp_len - 1, device=device),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # [B, T-1, H]
    return torch.cat([first, rest], 1)


def plain_linear(head: torch.nn.Module) -> bool:
    """An unwrapped nn.Linear whose weight is a plain tensor (no LoRA layer, no hooks, no FSDP shard)."""
    return (
        type(head) is torch.nn.Linear
        and not (head._forward_hooks or head._forward_pre_hooks)
        and not is_sharded(head.weight)
    )


class HeadLogprobs(torch.autograd.Function):
    """LM head + log-softmax + gather for one chunk, with a hand-written backward.

    Forward keeps only the inputs and the log-normaliser, not the [n, V] logits. Backward recomputes the
    logits once and applies d logp(y)/d z = onehot(y) - softmax(z), scaled by 1/temperature. Against
    checkpointing the autograd version, this skips re-running the log-softmax, the gather and the entropy
    in the backward pass. `tests/test_logprobs_and_engine.py` checks its gradients against autograd.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _scaled_logits(hidden, weight, bias, temperature)  # [n, V] float32, our own tensor
        target = logits.gather(-1, targets[:, None]).squeeze(-1)  # [n]
        top = logits.amax(-1)  # [n]
        shifted = logits.sub_(top[:, None])  # in place: each [n, V] pass is one fewer tensor to write
        probs = torch.exp(shifted)  # [n, V] unnormalised
        total = probs.sum(-1)  # [n]
        normaliser = top + total.log()  # log Z
        logprobs = target - normaliser
        if with_entropy:  # H = log Z - E_p[z], from the same exponentials
            entropy = normaliser - top - torch.linalg.vecdot(probs, shifted) / total
        else:
            entropy = logits.new_zeros(0)
        ctx.save_for_backward(hidden, weight, bias, targets, normaliser)
        ctx.temperature = temperature
        ctx.compute = _compute_dtype(
            hidden, weight
        )  # the backward recomputes the logits from the same inputs
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple:
        hidden, weight, bias, targets, normaliser = ctx.saved_tensors
        compute = ctx.compute  # the head's inputs' dtype in the forward pass
        logits = _scaled_logits(
            hidden, weight, bias, ctx.temperature, compute
        )  # the forward's float32 logits
        grad = logits.sub_(normaliser[:, None]).exp_().mul_(-grad_logprobs[:, None])  # -softmax * g, in place
        grad.scatter_add_(-1, targets[:, None], grad_logprobs[:, None])  # + onehot * g
        if ctx.temperature not in (0.0, 1.0):
            grad /= ctx.temperature
        grad = grad.to(compute)  # [n, V]; the gradient's products run in the compute dtype
        grad_hidden = (grad @ weight.to(compute)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.t() @ hidden.to(compute)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's inputs take: autocast's (bf16 under `model.compute_dtype`), else the weight's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute: torch.dtype | None = None
) -> torch.Tensor:
    """[n, V] float32 logits of a linear LM head whose inputs are rounded to `compute` (default: autocast's
    dtype, else the weight's), with the product accumulated and returned in float32, never rounded to bf16.

    A bf16 output would carry an error of about |z| x 2^-9 per logit (0.03-0.06 nats in a token's log-prob at
    typical logit sizes), as large as the engine mismatch that TIS and the masks correct; vLLM computes its
    head the same way (`hf_overrides={"head_dtype": "float32"}`), and so does the transformers engine. On
    CUDA one bf16 GEMM with a float32 output (`torch.mm(..., out_dtype=torch.float32)`); elsewhere the bf16
    inputs are upcast, which gives the same numbers up to summation order.

        hidden [n, H], weight [V, H], bias [V] or None -> [n, V] float32
    """
    compute = compute or _compute_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(compute), weight.to(compute)  # [n, H], [V, H]
        b = bias.to(compute) if bias is not None else None
        if compute.itemsize >= 4:  # float32 (or a float64 test): the product as it is
            return torch.nn.functional.linear(h, w, b).float()
        b = b.float() if b is not None else None
        if h.is_cuda and _CUDA_OUT_DTYPE[0]:
            try:
                logits = torch.mm(h, w.t(), out_dtype=torch.float32)
                return logits.add_(b) if b is not None else logits
            except (RuntimeError, TypeError):  # a torch without mm(out_dtype=): upcast from now on
                _CUDA_OUT_DTYPE[0] = False
        return torch.nn.functional.linear(h.float(), w.float(), b)  # [n, V] float32, a new tensor


_CUDA_OUT_DTYPE = [True]  # torch.mm(out_dtype=) works on this CUDA torch (until it fails once)


def _scaled_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    compute: torch.dtype | None = None,
) -> torch.Tensor:
    logits = head_logits(hidden, weight, bias, compute)  # [n, V] float32
    return logits.div_(temperature) if temperature not in (0.0, 1.0) else logits


def _chunk(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if plain_linear(head):  # float32 logits from the compute dtype's inputs, as in HeadLogprobs
        logits = head_logits(hidden, head.weight, head.bias)  # [n, V]
    else:  # a wrapped head (a LoRA layer, hooks): its own forward, upcast afterwards
        logits = head(hidden).float()  # [n, V]
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [n]
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits)  # [n]
    else:
        entropy = torch.zeros(0, device=hidden.device)
    return logprobs, entropy


class CompletionLogprobs(torch.nn.Module):
    """The policy as a module whose forward is `completion_logprobs`, so that DistributedDataParallel, which
    synchronises gradients of what runs through its wrapper's forward, covers the whole computation."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self, batch: PackedBatch, temperature: float = 1.0, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return completion_logprobs(self.policy, batch, temperature, with_entropy=with_entropy)
