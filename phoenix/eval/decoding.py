"""Autoregressive decoding of a megatron ``GPTModel``: greedy or sampled, with a KV cache.

:class:`Decoder` turns prompts (token-id lists) into continuations. It serves
``phoenix generate`` and the needle eval (:mod:`phoenix.eval.needle_run`).

* **KV cache**: megatron-core's static-batching inference context
  (``megatron.core.inference.contexts.StaticInferenceContext``): the prompt is run once
  (prefill, causal), then one token per forward; each attention layer appends its keys and
  values to the context's buffers and attends over them (megatron's
  ``Attention._adjust_key_value_for_inference``), with the RoPE table sliced at the
  context's offset. It works with the local and SDPA core attention and every static RoPE
  scaling (``inv_freq`` is fixed).
* **Full recompute** where a cache would change the numbers or cannot run: dynamic NTK
  (its base follows the length of each forward, so cached keys would carry older bases),
  sequence parallelism (a one-token forward cannot be split over the TP ranks). Every new
  token is then the output of a full forward of the growing sequence (padded on the right
  to a multiple of the TP size; with causal attention the padding changes no logit that
  is read).

Logits are gathered over tensor-parallel ranks (``runtime_gather_output``) and cut to the
tokenizer's vocabulary ``[0, vocab_size)`` (padded columns never win). Sampling follows
the usual order (as transformers' ``generate``): temperature, then top-k, then top-p
(nucleus: the smallest set of tokens whose probability reaches ``top_p``, Holtzman et al.
arXiv 1904.09751), then one draw from a generator seeded with ``seed``; every rank of a
TP group draws the same token (same logits, same generator). ``temperature == 0`` is
greedy (argmax, ties to the lowest id). Pipeline and context parallelism are refused: a
sequence growing token by token does not fit megatron's fixed-shape pipeline schedule
(generate from any checkpoint at ``parallel.pipeline=1``; checkpoints reshard).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from phoenix.config import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token.

    ``max_new_tokens``: tokens generated per prompt (fewer when a stop id comes).
    ``temperature``: 0 means greedy; else logits are divided by it before sampling.
    ``top_k``: sample among the k most likely tokens (0: all). ``top_p``: nucleus sampling
    (1: all). ``seed``: the sampling generator's seed. ``stop_ids``: token ids that end a
    prompt's continuation (included in the output; e.g. the tokenizer's end of document).
    Raises ConfigError naming the bad field."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")


def check_decoding_layout(layout, what: str = "generate") -> None:
    """Refuse layouts that token-by-token decoding cannot run on (ConfigError)."""
    if layout.pp_size > 1:
        raise ConfigError(f"{what}: needs one pipeline stage (parallel.pipeline=1), the layout "
                          f"has {layout.pp_size}; checkpoints reshard, so run it with "
                          f"parallel.pipeline=1")
    if layout.dp_cp_size != layout.dp_size:
        raise ConfigError(f"{what}: does not run with context parallelism (parallel.context=1)")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits [b, v]`` with every token outside the top-k and outside the nucleus of
    probability ``top_p`` set to ``-inf`` (the most likely token always stays)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = (cumulative - ordered.softmax(dim=-1)) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, params: SamplingParams,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """The next token of each row of ``logits [b, v]`` (float, real vocabulary only):
    int64 ``[b]``."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _dynamic_rope(model) -> bool:
    rope = getattr(getattr(model, "rotary_pos_emb", None), "rope", None)
    return getattr(rope, "scaling", None) == "dynamic_ntk"


class Decoder:
    """Generates continuations with ``model_chunks`` (this rank's chunks of a one-stage
    layout, e.g. from :func:`phoenix.checkpoint.load_model`).

    ``vocab_size``: the tokenizer's vocabulary (logits beyond it are padding).
    ``kv_cache``: None picks the cache wherever it gives the full recompute's numbers (see
    the module docstring); False forces full recompute; True refuses (ConfigError) where
    the cache cannot be used. Collective over the TP group: every TP rank calls
    :meth:`generate` with the same prompts and gets the same tokens."""

    def __init__(self, model_chunks, layout, vocab_size: int, *, kv_cache: Optional[bool] = None,
                 what: str = "generate"):
        check_decoding_layout(layout, what)
        self.model = list(model_chunks)[0]
        self.layout = layout
        self.vocab_size = vocab_size
        reason = self.kv_cache_refusal()
        if kv_cache and reason:
            raise ConfigError(f"{what}: the KV cache cannot be used: {reason}")
        self.kv_cache = reason is None if kv_cache is None else kv_cache

    def kv_cache_refusal(self) -> Optional[str]:
        """Why this model cannot decode with a KV cache (None: it can)."""
        if getattr(self.model.config, "sequence_parallel", False):
            return "sequence parallelism splits a one-token forward (use parallel.sequence_parallel=false)"
        if _dynamic_rope(self.model):
            return "dynamic NTK RoPE changes its base with the length (cached keys would keep older bases)"
        return None

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """The new tokens of each prompt (in order): at most ``params.max_new_tokens``,
        ending at the first stop id if one comes. Prompts of different lengths are decoded
        in batches of equal length. The model runs in eval mode; its mode is restored."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("generate: every prompt needs at least one token")
        was_training = self.model.training
        self.model.eval()
        try:
            by_length: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):
                by_length.setdefault(len(p), []).append(i)
            out: list[list[int]] = [[] for _ in prompts]
            generator = None
            if params.temperature > 0:
                generator = torch.Generator(device=self.layout.device).manual_seed(params.seed)
            for indices in by_length.values():
                batch = torch.tensor([list(prompts[i]) for i in indices], dtype=torch.long,
                                     device=self.layout.device)
                for i, tokens in zip(indices, self._decode(batch, params, generator)):
                    out[i] = tokens
            return out
        finally:
            self.model.train(was_training)

    def _decode(self, prompt: torch.Tensor, params: SamplingParams, generator) -> list[list[int]]:
        step = self._kv_steps(prompt, params.max_new_tokens) if self.kv_cache \
            else self._full_steps(prompt)
        stop = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long, device=prompt.device)
        done = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
        new = []
        logits = next(step)
        for i in range(params.max_new_tokens):
            token = pick_tokens(logits, params, generator)
            new.append(token)
            if stop.numel():
                done |= torch.isin(token, stop)
                # Every TP rank holds the same tokens, so they all stop at the same step.
                if bool(done.all()):
                    break
            if i + 1 < params.max_new_tokens:
                logits = step.send(token)
        step.close()
        rows = torch.stack(new, dim=1).tolist()
        if stop.numel():
            stops = set(params.stop_ids)
            rows = [row[:next((j + 1 for j, t in enumerate(row) if t in stops), len(row))]
                    for row in rows]
        return rows

    def _last_logits(self, logits: torch.Tensor, at: int) -> torch.Tensor:
        return logits[:, at, : self.vocab_size].float()

    def _kv_steps(self, prompt: torch.Tensor, max_new_tokens: int):
        """Generator: yields the next-token logits ``[b, vocab_size]``; is sent each token."""
        from megatron.core.inference.contexts import StaticInferenceContext

        b, n = prompt.shape
        context = StaticInferenceContext(b, n + max_new_tokens)
        tokens, start = prompt, 0
        while True:
            length = tokens.size(1)
            positions = torch.arange(start, start + length, device=tokens.device).expand(b, length)
            logits = self.model(tokens, positions, attention_mask=None,
                                inference_context=context, runtime_gather_output=True)
            context.sequence_len_offset += length
            start += length
            # megatron keeps only the last position's logits in inference mode
            # (``materialize_only_last_token_logits``), which is all that is read.
            token = yield self._last_logits(logits, -1)
            tokens = token[:, None]

    def _full_steps(self, prompt: torch.Tensor):
        """Generator as :meth:`_kv_steps`, each step a forward of the whole sequence."""
        multiple = max(self.layout.tp_size, 1)
        tokens = prompt
        while True:
            n = tokens.size(1)
            padded = -(-n // multiple) * multiple
            inputs = torch.nn.functional.pad(tokens, (0, padded - n), value=0)
            positions = torch.arange(padded, device=tokens.device).expand_as(inputs)
            logits = self.model(inputs, positions, attention_mask=None, runtime_gather_output=True)
            token = yield self._last_logits(logits, n - 1)
            tokens = torch.cat([tokens, token.to(tokens.dtype)[:, None]], dim=1)
