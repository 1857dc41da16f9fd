"""A language-model head and training / evaluation / generation helpers for the stacks.

Works with any *segment stack*: a module with ``forward(inputs, lengths, reverse)`` ->
(batch, time, hidden), ``initial_state(batch)``, ``step(inputs, state)``, ``hidden_size``
and ``segment_length`` — :class:`~vmt.nn.folded.FoldedTransformer` and
:class:`~vmt.nn.baselines.SegmentCacheTransformer`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

IGNORE = -100


class SegmentLM(nn.Module):
    """A segment stack with a linear head over the vocabulary.

    Args:
        body: the segment stack (token input).
        vocab_size: size of the output vocabulary.
    """

    def __init__(self, body: nn.Module, vocab_size: int) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.body = body
        self.head = nn.Linear(body.hidden_size, vocab_size)

    def forward(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """tokens: (batch, time) int64 -> logits (batch, time, vocab)."""
        return self.head(self.body(tokens, lengths))


def masked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose target is not ``-100``.

    Args:
        logits: (batch, time, vocab).
        targets: (batch, time) int64.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         f"disagree on (batch, time)")
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def next_token_targets(tokens: Tensor) -> Tensor:
    """Targets for plain language modelling: ``tokens`` shifted left, last position ignored."""
    targets = torch.full_like(tokens, IGNORE)
    targets[:, :-1] = tokens[:, 1:]
    return targets


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings for :func:`train`.

    Attributes:
        steps: optimiser steps.
        lr: peak Adam learning rate (linear warm-up, then cosine decay to 10%).
        warmup: warm-up steps.
        weight_decay: AdamW weight decay.
        clip: gradient-norm clip.
    """

    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"steps must be >= 1 and warmup >= 0, got {self.steps}, "
                             f"{self.warmup}")
        if self.lr <= 0 or self.clip <= 0:
            raise ValueError(f"lr and clip must be positive, got {self.lr}, {self.clip}")


def train(
    model: SegmentLM,
    batches: Iterator[tuple[Tensor, Tensor]] | Callable[[int], tuple[Tensor, Tensor]],
    config: TrainConfig,
    log_every: int = 100,
) -> list[float]:
    """Minimise :func:`masked_cross_entropy` with AdamW.

    Args:
        model: the language model (trained in place).
        batches: ``step -> (tokens, targets)`` or an iterator of such pairs, each
            (batch, time) int64.
        config: optimiser settings.
        log_every: log the running loss every this many steps.

    Returns:
        The loss of every step.
    """
    import math

    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    get = batches if callable(batches) else (lambda _s: next(batches))
    losses = []
    model.train()
    for step in range(config.steps):
        tokens, targets = get(step)
        loss = masked_cross_entropy(model(tokens), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            logger.info("step %d loss %.4f", step + 1, sum(losses[-log_every:]) / log_every)
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: SegmentLM, tokens: Tensor, targets: Tensor) -> dict[str, float]:
    """Negative log-likelihood (nats per scored token) and accuracy over scored positions."""
    model.eval()
    logits = model(tokens)
    mask = targets != IGNORE
    if not mask.any():
        raise ValueError("targets score no position (all -100)")
    nll = float(masked_cross_entropy(logits, targets))
    acc = float((logits.argmax(-1)[mask] == targets[mask]).float().mean())
    return {"nll": nll, "accuracy": acc}


class Streamer:
    """Feed a segment stack one or more steps at a time, in constant memory.

    Keeps the stack's carried state plus a buffer of at most ``segment_length`` inputs of the
    unfinished segment; each :meth:`push` re-reads that buffer (cost bounded by the segment)
    and advances the state whenever a segment completes. Outputs equal the full-sequence
    forward of the stack.

    Args:
        body: the segment stack.
        batch_size: number of parallel streams.
    """

    def __init__(self, body: nn.Module, batch_size: int) -> None:
        self.body = body
        self.l = body.segment_length
        self.state = body.initial_state(batch_size)
        self.buffer: Tensor | None = None

    @torch.no_grad()
    def push(self, inputs: Tensor) -> Tensor:
        """inputs: (batch, n) ids or (batch, n, feat) -> hidden (batch, n, hidden)."""
        outs = []
        start = 0
        while start < inputs.shape[1]:
            have = 0 if self.buffer is None else self.buffer.shape[1]
            take = min(self.l - have, inputs.shape[1] - start)
            piece = inputs[:, start : start + take]
            self.buffer = piece if self.buffer is None else torch.cat([self.buffer, piece], 1)
            hidden, state = self.body.step(self.buffer, self.state)
            outs.append(hidden[:, have:])
            if self.buffer.shape[1] == self.l:
                self.state, self.buffer = state, None
            start += take
        return torch.cat(outs, dim=1)


@torch.no_grad()
def generate(
    model: SegmentLM,
    prompt: Tensor,
    n_new: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample a continuation token by token with a :class:`Streamer` (constant memory).

    Args:
        prompt: (batch, time) int64, at least one token.
        n_new: tokens to sample.
        temperature: softmax temperature; 0 means greedy.

    Returns:
        (batch, n_new) int64 sampled tokens.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, time) with time >= 1, got {tuple(prompt.shape)}")
    if n_new < 0 or temperature < 0:
        raise ValueError(f"n_new and temperature must be >= 0, got {n_new}, {temperature}")
    model.eval()
    stream = Streamer(model.body, prompt.shape[0])
    logits = model.head(stream.push(prompt)[:, -1])
    out = []
    for _ in range(n_new):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        out.append(nxt)
        logits = model.head(stream.push(nxt[:, None])[:, -1])
    return torch.stack(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)
