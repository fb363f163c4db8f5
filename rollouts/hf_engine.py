"""Plain transformers rollout engine: batched sampling with a KV cache, on CPU or CUDA.

It samples from the policy module itself (no copy), so `update_weights` has nothing to do: the trainer's
in-place optimizer step is already what the next `generate` sees. Decoding is a small loop of our own
rather than `model.generate`, so that the log-prob of every sampled token, EOS and stop strings and the
finish reason come out exactly as the protocol defines them, without a second pass.
"""

from __future__ import annotations

from typing import Any

import torch

from rollouts.base import Completion, SamplingParams
from rollouts.llama_decoder import LlamaDecoder, unsupported_reason


class TransformersEngine:
    """The rollout protocol on the trainer's own policy module (rollouts.base.RolloutEngine)."""

    shares_policy = True
    standalone: dict = {}

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        max_batch_size: int = 256,
        fast_decoding: bool = True,
        **_: Any,
    ) -> None:
        self.policy = policy
        # rollout.transformers.fast_decoding: Llama/Qwen2 models through LlamaDecoder (rollouts/llama_decoder.py);
        # False, or any other model, through transformers' forward (_GenericDecoder).
        self.fast_decoding = fast_decoding
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted(i for i in eos if i is not None)
        self.summary = ""
        self.batch_size = max_batch_size

    # The engine samples from the trainer's own module: nothing to copy, nothing to release.
    def update_weights(self, policy: torch.nn.Module) -> None:
        self.policy = policy

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        device = next(self.policy.parameters()).device
        # Prompt i draws from its own generator seeded with seed + i, so its samples do not depend on which
        # other prompts share the batch (or on how many ranks split the batch).
        generators = [None] * len(prompts)
        if params.seed is not None:
            generators = [
                torch.Generator(device=device).manual_seed(params.seed + i) for i in range(len(prompts))
            ]
        per_chunk = max(1, self.max_batch_size // params.n)  # whole groups per decoding batch
        was_training = self.policy.training
        self.policy.eval()
        try:
            flat: list[Completion] = []
            for start in range(0, len(prompts), per_chunk):
                chunk = prompts[start : start + per_chunk]
                flat += self._sample(chunk, params, device, generators[start : start + per_chunk], start)
        finally:
            self.policy.train(was_training)
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @torch.inference_mode()
    def _sample(
        self,
        group_prompts: list[list[int]],
        params: SamplingParams,
        device: torch.device,
        generators: list[Any],
        first_prompt: int = 0,
    ) -> list[Completion]:
        n = params.n
        batch, width = len(group_prompts) * n, max(len(p) for p in group_prompts)
        input_ids = torch.full((len(group_prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(group_prompts), width), dtype=torch.long)
        for i, p in enumerate(
            group_prompts
        ):  # left padding: every sequence's next token is at the same column
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        eos = torch.tensor(self.eos_ids, device=device)
        # Each distinct prompt is run once; its group's n samples (contiguous rows) share its keys and values.
        if self.fast_decoding and unsupported_reason(self.policy) is None:
            decoder: Any = LlamaDecoder(self.policy, batch, width + params.max_new_tokens)
        else:
            decoder = _GenericDecoder(self.policy)
        logits = decoder.prefill(input_ids, attention, n)  # [B, V]

        tokens = torch.empty((batch, params.max_new_tokens), dtype=torch.long, device=device)
        logprobs = torch.empty((batch, params.max_new_tokens), dtype=torch.float32, device=device)
        # Book-keeping stays on the device: on a GPU, reading a flag back every token would stall the queue.
        lengths = torch.full((batch,), params.max_new_tokens, dtype=torch.long, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # by EOS or a stop string
        max_stop = max((len(s) for s in params.stop), default=0) + 1
        check_every = _check_interval(device, params)
        steps = 0
        for t in range(params.max_new_tokens):
            next_ids, next_lp = _sample_next(logits.float(), params.temperature, params.top_p, generators, n)
            tokens[:, t], logprobs[:, t] = next_ids, next_lp
            steps = t + 1
            newly = torch.isin(next_ids, eos) & ~stopped  # [B]
            if params.stop:  # stop strings: only the tail of each live sequence can complete one
                live = (~stopped & ~newly).nonzero().flatten().tolist()
                tails = tokens[live, max(0, t + 1 - max_stop) : t + 1].tolist()
                for i, tail in zip(live, tails, strict=True):
                    text = self.tokenizer.decode(tail)
                    if any(s in text for s in params.stop):
                        newly[i] = True
                        if params.on_stop is not None:  # e.g. start its tool call while the rest decode
                            params.on_stop(first_prompt * n + i, tokens[i, : t + 1].tolist())
            lengths = torch.where(newly, t + 1, lengths)
            stopped |= newly
            if t + 1 == params.max_new_tokens or (steps % check_every == 0 and bool(stopped.all())):
                break
            logits = decoder.step(next_ids)

        finished_by_stop = stopped.tolist()
        lengths = lengths.tolist()
        tokens, logprobs = tokens[:, :steps].tolist(), logprobs[:, :steps].tolist()
        completions = []
        for i in range(batch):
            k = lengths[i]
            ids = tokens[i][:k]
            completions.append(
                Completion(
                    token_ids=ids,
                    logprobs=logprobs[i][:k],
                    finish_reason="stop" if finished_by_stop[i] else "length",
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                )
            )
        return completions


class _GenericDecoder:
    """Any causal LM through transformers' own forward and cache (for models LlamaDecoder does not cover)."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy

    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, copies: int) -> torch.Tensor:
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [P, L]
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        if copies > 1:
            self.cache.batch_repeat_interleave(copies)
        self.attention = attention.repeat_interleave(copies, 0)
        self.positions = positions[:, -1:].repeat_interleave(copies, 0)  # [B, 1]
        return out.logits[:, -1, :].repeat_interleave(copies, 0)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((ids.shape[0], 1), dtype=self.attention.dtype, device=ids.device)
        self.attention = torch.cat([self.attention, ones], 1)
        self.positions = self.positions + 1
        out = self.policy(
            input_ids=ids[:, None],
            attention_mask=self.attention,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1, :]


def _check_interval(device: torch.device, params: SamplingParams) -> int:
    """Tokens between host checks for "every sequence stopped". Each check waits for the device; on a GPU the
    host checks every 16 tokens (at most 15 wasted decode steps at the end). Stop strings need the text
    every token, and on a CPU a check costs nothing."""
    return 1 if params.stop or device.type == "cpu" else 16


def _sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[Any], n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; rows [g*n, (g+1)*n) draw from generators[g].
    Returns (ids [B], log-prob of each id under softmax(logits / T) [B]).

    The log-prob is of the temperature-scaled distribution before top-p truncation, which is what the
    trainer recomputes; with temperature 0 (greedy) it is the log-prob under the unscaled distribution.
    """
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)  # [B, V]
        ids = logits.argmax(dim=-1)
        return ids, logp.gather(-1, ids[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)  # [B, V]
    probs = logp.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is full
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # Inverse-CDF sampling: one uniform number per row, located in the row's cumulative probabilities
    # (torch.multinomial on CPU draws a random number per vocabulary entry: 12x slower at 2k tokens, 4x at 152k).
    # A token of probability 0 is never drawn: it adds nothing to the cumulative sum, so no uniform lands on it.
    if all(g is None for g in generators):
        uniform = torch.rand(probs.shape[0], device=probs.device)
    else:
        uniform = torch.cat([torch.rand(n, generator=gen, device=probs.device) for gen in generators])
    cdf = probs.cumsum(-1)  # [B, V]
    ids = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(-1)
    ids = ids.clamp_(max=probs.shape[-1] - 1)  # [B]
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)
