"""What a fitted VMT predicts next, from a read state.

Given draws of the state ``x_n`` (the rows of a ``(samples, state)`` tensor, e.g.
:attr:`~vmt.inference.reading.ReadResult.state`), the model's probability of a continuation
``y_{n+1} .. y_{n+m}`` is

.. math::

    p(y_{n+1:n+m} \\mid x_n) = \\int \\prod_{j=1}^{m} p(y_{n+j} \\mid x_{n+j})\\,
    p(x_{n+j} \\mid x_{n+j-1})\\, dx_{n+1:n+m},

averaged over the rows. :func:`filter_continuation` estimates it with a bootstrap particle
filter: propagate every particle with the transition, weight it by the emission of the next
token, record ``log mean(weight)`` (the predictive log-probability of that token given the
ones before), resample in proportion to the weights, repeat. The product of the recorded
means is an unbiased estimate of the continuation's probability; its logarithm is a slightly
low estimate of the log-probability (Jensen), with a spread that shrinks like
``1 / sqrt(samples)``. With one token the estimate is the plain Monte Carlo average.

For an emission that gives a token's probability with the token-dependent part of the state
integrated out (:class:`~vmt.models.parts.NextTokenEmission`: in the token family
``p(y | m) = pi_y(m)`` exactly), each particle is weighted by that probability and, after
resampling, its slot is redrawn from its conditional given the token, ``N(e_y, s^2 I)``: a
Rao–Blackwellised filter with the same expectation and without the slot's sampling noise in
the weights (a bootstrap weight there is about 1 for a particle whose sampled slot fell on the
token and about 0 otherwise, so 16 particles would resolve probabilities only to 1/16).

The filter also returns the particles after the last token (draws of the filtering
distribution ``p(x_{n+m} | x_n, y_{n+1:n+m})``), so a reader can carry on from them, and for
a categorical emission the token of highest predictive probability before each step (what
greedy decoding would have written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vmt.models.parts import NextTokenEmission

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer


@dataclass
class Filtered:
    """A continuation scored by :func:`filter_continuation`.

    Attributes:
        log_probs: ``(time,)`` ``log p(y_{n+j} | x_n, y_{n+1:n+j-1})`` per token (estimates).
        particles: ``(samples, state)`` equally weighted draws of the state at the last token.
        greedy: ``(time,)`` int64, the token of highest predictive probability before each
            step (categorical emission), else ``None``.
    """

    log_probs: torch.Tensor
    particles: torch.Tensor
    greedy: torch.Tensor | None

    @property
    def log_prob(self) -> float:
        """``log p(y_{n+1:n+m} | x_n)`` (estimate; the sum of :attr:`log_probs`)."""
        return float(self.log_probs.sum())


def _check_state(vmt: VariationalMarkovTransformer, state: torch.Tensor) -> torch.Tensor:
    d = vmt.config.state_dim
    if state.dim() == 1:
        state = state[None]
    if state.dim() != 2 or state.shape[-1] != d or state.shape[0] == 0:
        raise ValueError(f"state must be (samples, {d}) or ({d},), got {tuple(state.shape)}")
    return state


@torch.no_grad()
def next_token_probs(vmt: VariationalMarkovTransformer, state: torch.Tensor, direction: str = "forward") -> torch.Tensor:
    """``(vocab,)`` predictive probabilities of the next token, ``mean_s p(y | x'_s)`` with
    ``x'_s ~ p(x' | x_s)`` for the rows ``x_s`` of ``state (samples, state)`` (categorical
    emission)."""
    if not vmt.config.emits_tokens:
        raise ValueError(f"next_token_probs needs a categorical emission, got {vmt.config.emission!r}")
    state = _check_state(vmt, state)
    nxt = vmt.transition_for(direction).distribution(state).sample()
    if isinstance(vmt.emission, NextTokenEmission):  # the slot integrated out
        return vmt.emission.predictive_log_probs(nxt).exp().mean(0)
    return vmt.emission.logits(nxt).softmax(-1).mean(0)


@torch.no_grad()
def filter_continuation(
    vmt: VariationalMarkovTransformer,
    state: torch.Tensor,
    tokens: torch.Tensor,
    direction: str = "forward",
    generator: torch.Generator | None = None,
    token_penalty: torch.Tensor | None = None,
) -> Filtered:
    """Score ``tokens`` as the continuation of ``state`` with a bootstrap particle filter.

    Args:
        vmt: a fitted VMT.
        state: ``(samples, state)`` draws of the current state (or one ``(state,)``); the
            number of rows is the number of particles.
        tokens: ``(time,)`` int64 tokens (categorical emission) or ``(time, obs)``
            observations, in the order they follow the state.
        direction: ``"reverse"`` scores what comes *before* the state with ``p_r`` (give the
            tokens nearest the state first).
        generator: random source of the resampling (the transition draws use the global RNG).
        token_penalty: ``(vocab,)`` nats to subtract per token id, e.g.
            :attr:`vmt.data.vocab.Vocabulary.token_penalty`, which spreads ``<unk>``'s
            probability over the ids it merges: the scores and the greedy tokens are then
            those of the full vocabulary (a merged id can only be "greedy" as ``<unk>``).

    Returns:
        :class:`Filtered`.
    """
    state = _check_state(vmt, state)
    categorical = vmt.config.emits_tokens
    if categorical:
        if tokens.dim() != 1 or tokens.is_floating_point():
            raise ValueError(f"tokens must be (time,) int64, got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vmt.config.obs_dim):
            raise ValueError(
                f"token ids must lie in [0, {vmt.config.obs_dim}), got "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
    elif tokens.dim() != 2 or tokens.shape[-1] != vmt.config.obs_dim:
        raise ValueError(f"observations must be (time, {vmt.config.obs_dim}), got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError("cannot score an empty continuation (0 tokens)")
    if token_penalty is not None:
        if not categorical or token_penalty.shape != (vmt.config.obs_dim,):
            raise ValueError(
                f"token_penalty must be ({vmt.config.obs_dim},) for a categorical emission, got "
                f"{tuple(token_penalty.shape)}"
            )
        token_penalty = token_penalty.to(state.dtype)
    transition = vmt.transition_for(direction)
    integrated = isinstance(vmt.emission, NextTokenEmission)
    n = state.shape[0]
    log_n = math.log(n)
    x = state
    log_probs, greedy = [], []
    for j in range(tokens.shape[0]):
        x = transition.distribution(x).sample()
        y = tokens[j]
        if categorical:
            if integrated:  # log p(y | the token-independent part of x)
                logp = vmt.emission.predictive_log_probs(x)  # (samples, vocab)
            else:
                logp = torch.log_softmax(vmt.emission.logits(x), -1)  # (samples, vocab)
            predictive = logp.logsumexp(0)
            if token_penalty is not None:
                predictive = predictive - token_penalty
            greedy.append(predictive.argmax())
            weights = logp[:, y]
        else:
            weights = vmt.emission.log_prob(x, y.expand(n, -1))
        penalty = token_penalty[y] if token_penalty is not None else 0.0
        log_probs.append(weights.logsumexp(0) - log_n - penalty)
        probs = (weights - weights.max()).exp()
        index = torch.multinomial(probs, n, replacement=True, generator=generator)
        x = x[index]
        if integrated:
            x = vmt.emission.observe(x, y.expand(n))
    return Filtered(
        log_probs=torch.stack(log_probs),
        particles=x,
        greedy=torch.stack(greedy) if categorical else None,
    )
