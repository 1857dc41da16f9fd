"""The hand-written streaming loop: feed tokens, evict between forward calls, score options.

``generate()`` of transformers tracks its own attention mask and cannot cope with a cache
that shrinks, so reading a stream with a fixed budget is done here, one forward call per
chunk: before each call the policy makes room for the incoming tokens (compacting and
re-rotating the cache), then the model reads the chunk on top of the cache at positions
``cache length + i``. Batch size is one stream.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from vmt.hf_compat import cache_kwargs, output_cache
from vmt.memory.cache import CacheState, EvictionPolicy, FullContext, cache_length
from vmt.memory.rope import check_supported_model, inverse_frequencies

logger = logging.getLogger(__name__)


@dataclass
class FeedOutput:
    """What reading a chunk of tokens gave.

    Attributes:
        token_logprobs: (time,) ``log p(y_i | cached context, y_<i in the chunk)``; NaN for
            the very first token of a stream (nothing predicts it).
        logits: (time, vocab) float32 logits at every fed position, if requested.
    """

    token_logprobs: torch.Tensor
    logits: torch.Tensor | None = None


@dataclass
class Choice:
    """Result of scoring options by likelihood: ``index`` of the chosen one and the
    (options,) summed log-likelihoods in nats."""

    index: int
    logliks: torch.Tensor


def _as_tokens(tokens) -> torch.Tensor:
    t = torch.as_tensor(tokens, dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(f"tokens must be (time,) int64, got shape {tuple(t.shape)}")
    return t


class KVStream:
    """One stream read by a causal LM under a fixed-budget cache policy.

    Args:
        model: a Llama-architecture ``*ForCausalLM`` in eval mode.
        policy: an :class:`~vmt.memory.cache.EvictionPolicy` (``FullContext()`` by default).
        chunk_size: most tokens per forward call (also bounded by the policy's free space).

    The cache length never exceeds ``policy.budget`` after any forward call; the largest
    length seen is kept in :attr:`max_cache_length`.
    """

    def __init__(
        self, model, policy: EvictionPolicy | None = None, *, chunk_size: int = 256
    ) -> None:
        check_supported_model(model)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.model = model
        self.policy = policy if policy is not None else FullContext()
        self.chunk_size = chunk_size
        self._inv_freq = inverse_frequencies(model)
        self._device = next(model.parameters()).device
        self.state = CacheState()
        self.n_seen = 0
        self.max_cache_length = 0
        self.n_evictions = 0
        self._next_logprobs: torch.Tensor | None = None  # (vocab,) float32
        self._pending = torch.zeros(0, dtype=torch.int64)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def cache_length(self) -> int:
        """Tokens currently cached."""
        return cache_length(self.state.cache)

    @property
    def next_logprobs(self) -> torch.Tensor | None:
        """(vocab,) log-probabilities of the next token given everything read so far."""
        self._flush()
        return self._next_logprobs

    def fork(self) -> KVStream:
        """An independent copy of this stream (same model and policy, copied cache)."""
        other = KVStream.__new__(KVStream)
        other.__dict__.update(self.__dict__)
        other.state = self.state.clone()
        other._pending = self._pending.clone()
        if self._next_logprobs is not None:
            other._next_logprobs = self._next_logprobs.clone()
        return other

    def end_round(self) -> None:
        """Mark the end of a dialogue round (SirLLM decays its scores here)."""
        self.policy.end_round(self.state)

    # ------------------------------------------------------------------ core
    def _make_room(self, n_incoming: int) -> None:
        budget = self.policy.budget
        if budget is None:
            window = getattr(self.model.config, "max_position_embeddings", None)
            if window is not None and len(self.state) + n_incoming > window:
                raise ValueError(
                    f"full context of {len(self.state) + n_incoming} tokens exceeds the model's "
                    f"window of {window} positions; use a bounded policy"
                )
            return
        if len(self.state) + n_incoming <= budget:
            return
        keep = self.policy.checked_select(self.state, n_incoming)
        self.state.select(keep, self._inv_freq)
        self.n_evictions += 1

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """One forward call on top of the cache; returns (time, vocab) float32 logits."""
        from transformers import DynamicCache

        if self.state.cache is None:
            self.state.cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            out = self.model(
                input_ids=tokens[None].to(self._device),
                use_cache=True,
                **cache_kwargs(self.model, self.state.cache),
            )
        self.state.cache = output_cache(out)
        length = self.cache_length
        self.max_cache_length = max(self.max_cache_length, length)
        if self.policy.budget is not None and length > self.policy.budget:
            raise RuntimeError(f"cache length {length} exceeds the budget {self.policy.budget}")
        return out.logits[0].to(torch.float32)

    def _record(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Bookkeeping after ``tokens`` (time,) were cached; returns their log-probs (time,)."""
        next_lp = torch.log_softmax(logits, dim=-1)
        token_lp = torch.full((tokens.numel(),), math.nan, dtype=torch.float32)
        if self._next_logprobs is not None:
            token_lp[0] = self._next_logprobs[tokens[0]]
        if tokens.numel() > 1:
            token_lp[1:] = next_lp[:-1].gather(1, tokens[1:, None].to(next_lp.device))[:, 0].cpu()
        scores = self.policy.token_scores(token_lp, next_lp, tokens)
        positions = torch.arange(self.n_seen, self.n_seen + tokens.numel(), dtype=torch.int64)
        self.state.append(positions, tokens, scores)
        self.n_seen += tokens.numel()
        self._next_logprobs = next_lp[-1].cpu()
        return token_lp

    def _piece_size(self) -> int:
        limit = self.policy.max_incoming
        return self.chunk_size if limit is None else min(self.chunk_size, limit)

    def feed(self, tokens, *, return_logits: bool = False) -> FeedOutput:
        """Read ``tokens`` (time,) int64, evicting between forward calls as the policy says.

        Returns:
            :class:`FeedOutput` for ``tokens`` (tokens of a chosen single-token option that
            were still pending are read first and not reported).
        """
        tokens = _as_tokens(tokens)
        n_pending = self._pending.numel()
        stream = torch.cat([self._pending, tokens])
        self._pending = stream[:0]
        lps, logits = [], []
        step = self._piece_size()
        for start in range(0, stream.numel(), step):
            piece = stream[start : start + step]
            self._make_room(piece.numel())
            piece_logits = self._forward(piece)
            lps.append(self._record(piece, piece_logits))
            if return_logits:
                logits.append(piece_logits.cpu())
        token_lp = torch.cat(lps)[n_pending:] if lps else torch.zeros(0)
        all_logits = torch.cat(logits)[n_pending:] if (return_logits and logits) else None
        return FeedOutput(token_logprobs=token_lp, logits=all_logits)

    def _flush(self) -> None:
        if self._pending.numel() > 0:
            self.feed(torch.zeros(0, dtype=torch.int64))

    # ------------------------------------------------------------------ tasks
    def choose(self, prompt, options: list) -> Choice:
        """Read ``prompt`` then pick the option of highest log-likelihood.

        Only the chosen option stays in the cache (its tokens become history, as a model's
        own answer would). Single-token options are scored from the next-token distribution
        alone; the chosen token is read with the next call.

        Args:
            prompt: (time,) tokens read before the options (may be empty).
            options: list of (time_k,) token tensors, each non-empty.
        """
        opts = [_as_tokens(o) for o in options]
        if not opts or any(o.numel() == 0 for o in opts):
            raise ValueError("need at least one option and every option non-empty")
        self.feed(prompt)
        self._flush()
        if self._next_logprobs is None:
            raise ValueError("cannot score options at the very start of a stream: feed a prompt")
        longest = max(o.numel() for o in opts)
        if self.policy.max_incoming is not None and longest > self.policy.max_incoming:
            raise ValueError(f"an option of {longest} tokens exceeds the policy's free space")
        if longest == 1:
            logliks = self._next_logprobs[torch.stack([o[0] for o in opts])].to(torch.float64)
            index = int(torch.argmax(logliks))
            self._pending = opts[index].clone()
            return Choice(index=index, logliks=logliks)
        self._make_room(longest)
        base = self.cache_length
        saved, logliks = [], []
        for opt in opts:
            logits = self._forward(opt)
            lp = torch.log_softmax(logits, dim=-1)
            total = float(self._next_logprobs[opt[0]])
            if opt.numel() > 1:
                total += float(lp[:-1].gather(1, opt[1:, None].to(lp.device)).sum())
            logliks.append(total)
            saved.append(
                ([(layer.keys[:, :, base:], layer.values[:, :, base:]) for layer in self.state.cache.layers], logits)
            )
            self.state.cache.crop(-opt.numel())
        logliks_t = torch.tensor(logliks, dtype=torch.float64)
        index = int(torch.argmax(logliks_t))
        kv, logits = saved[index]
        for layer, (k, v) in zip(self.state.cache.layers, kv, strict=True):
            layer.keys = torch.cat([layer.keys, k], dim=2)
            layer.values = torch.cat([layer.values, v], dim=2)
        self._record(opts[index], logits)
        return Choice(index=index, logliks=logliks_t)

    def generate(self, n_tokens: int, stop_ids: set[int] | None = None) -> torch.Tensor:
        """Greedy decoding of up to ``n_tokens`` tokens (time,), evicting as needed."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"n_tokens must be a non-negative integer, got {n_tokens!r}")
        self._flush()
        out = []
        for _ in range(n_tokens):
            if self._next_logprobs is None:
                raise ValueError("cannot generate at the very start of a stream: feed a prompt")
            token = int(torch.argmax(self._next_logprobs))
            out.append(token)
            if stop_ids is not None and token in stop_ids:
                break
            self.feed(torch.tensor([token]))
        return torch.tensor(out, dtype=torch.int64)


def streaming_nll(
    model, tokens, policy: EvictionPolicy | None = None, *, chunk_size: int = 1
) -> torch.Tensor:
    """Next-token negative log-likelihood of every token of a long stream, in nats.

    Args:
        model: a Llama-architecture causal LM.
        tokens: (time,) int64 stream.
        policy: eviction policy (``None`` = full context).
        chunk_size: tokens per forward call; 1 reproduces token-by-token streaming exactly,
            larger values are faster (the context of a token then varies between
            ``budget - chunk_size`` and ``budget``).

    Returns:
        (time - 1,) float64 NLL of tokens ``1..time-1``.
    """
    tokens = _as_tokens(tokens)
    if tokens.numel() < 2:
        raise ValueError(f"need a stream of at least 2 tokens, got {tokens.numel()}")
    stream = KVStream(model, policy, chunk_size=chunk_size)
    lps = []
    for start in range(0, tokens.numel(), chunk_size):
        lps.append(stream.feed(tokens[start : start + chunk_size]).token_logprobs)
    return -torch.cat(lps)[1:].to(torch.float64)
