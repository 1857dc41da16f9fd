"""Writing with a fitted VMT: continuations, prequels, unconditional samples, a chat loop.

* forward: from a read state ``x_k``, ``x_{k+1} ~ p(x | x_k)``, ``y_{k+1} ~ p(y | x_{k+1})``;
* reverse (a prequel): ``x_{k-1} ~ p_r(x | x_k)``, ``y_{k-1} ~ p(y | x_{k-1})``, returned in
  reading order;
* unconditional: ``x_1 ~ p(x)``, then forward.

The cost of writing one token is one transition and one emission evaluation, whatever the
length of the context that was read: the context lives in the state.
Token draws use :func:`filter_logits` (temperature, top-k, top-p) on the emission logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vmt.inference.reading import FeatureFn, ReadConfig, ReadResult, read

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn from the emission.

    Attributes:
        temperature: logits are divided by it (``> 0``); ``1`` leaves them as they are.
        top_k: keep the ``k`` most probable tokens (``0``: all).
        top_p: keep the smallest set of most probable tokens whose probability reaches
            ``top_p`` (``1``: all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p to ``logits (..., vocab)``.

    Removed tokens get ``-inf``; the most probable token always survives. Returns logits of
    the same shape (unnormalised).
    """
    out = logits / config.temperature
    vocab = out.shape[-1]
    if 0 < config.top_k < vocab:
        kth = out.topk(config.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1)  # mass ahead
        drop_sorted = before >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _sample_tokens(vmt: VariationalMarkovTransformer, x: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    if not vmt.config.emits_tokens:
        return vmt.emission.distribution(x).sample()
    logits = filter_logits(vmt.emission.logits(x), sampling)
    return torch.distributions.Categorical(logits=logits).sample()


@dataclass
class Written:
    """Generated text.

    Attributes:
        tokens: ``(samples, time)`` int64 (or ``(samples, time, obs)``), in reading order.
        states: ``(samples, time, state)`` the latent path behind them, in reading order.
        last_state: ``(samples, state)`` the state to continue from (the last written state for
            forward writing; the earliest one for a prequel).
    """

    tokens: torch.Tensor
    states: torch.Tensor
    last_state: torch.Tensor


def _check_state(vmt: VariationalMarkovTransformer, state: torch.Tensor) -> torch.Tensor:
    d = vmt.config.state_dim
    if state.dim() == 1:
        state = state[None]
    if state.dim() != 2 or state.shape[-1] != d:
        raise ValueError(f"state must be (samples, {d}) or ({d},), got {tuple(state.shape)}")
    return state


def _check_count(num_tokens: int) -> None:
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")


@torch.no_grad()
def _roll(vmt: VariationalMarkovTransformer, transition, state: torch.Tensor, num_tokens: int, sampling: SamplingConfig,
          include_start: bool = False) -> Written:
    xs, ys = [], []
    x = state
    if include_start:
        xs.append(x)
        ys.append(_sample_tokens(vmt, x, sampling))
    while len(xs) < num_tokens:
        x = transition.distribution(x).sample()
        xs.append(x)
        ys.append(_sample_tokens(vmt, x, sampling))
    return Written(torch.stack(ys, 1), torch.stack(xs, 1), x)


def write(vmt: VariationalMarkovTransformer, state: torch.Tensor, num_tokens: int, sampling: SamplingConfig | None = None) -> Written:
    """Continue from ``state (samples, state)``: ``num_tokens`` new states and tokens."""
    _check_count(num_tokens)
    return _roll(vmt, vmt.transition_for("forward"), _check_state(vmt, state), num_tokens,
                 sampling or SamplingConfig())


def write_prequel(vmt: VariationalMarkovTransformer, state: torch.Tensor, num_tokens: int,
                  sampling: SamplingConfig | None = None) -> Written:
    """``num_tokens`` tokens that come *before* ``state`` (the state of the first token read),
    drawn with the reverse transition ``p_r`` and returned in reading order."""
    _check_count(num_tokens)
    transition = vmt.transition_for("reverse")  # raises without reverse networks
    out = _roll(vmt, transition, _check_state(vmt, state), num_tokens, sampling or SamplingConfig())
    return Written(out.tokens.flip(1), out.states.flip(1), out.last_state)


@torch.no_grad()
def sample_unconditional(vmt: VariationalMarkovTransformer, num_tokens: int, samples: int = 1,
                         sampling: SamplingConfig | None = None, direction: str = "forward") -> Written:
    """``x_1 ~ p(x)`` then forward: ``samples`` independent texts of ``num_tokens`` tokens.

    With ``direction="reverse"`` the prior draw is the state of a text's *last* token (the
    reverse VMT shares the prior) and the path is written backward with ``p_r``; tokens and
    states are returned in reading order.
    """
    _check_count(num_tokens)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    transition = vmt.transition_for(direction)  # raises without reverse networks
    x1 = vmt.prior.distribution().sample((samples,))
    out = _roll(vmt, transition, x1, num_tokens, sampling or SamplingConfig(), include_start=True)
    if direction == "reverse":
        return Written(out.tokens.flip(1), out.states.flip(1), out.last_state)
    return out


class Conversation:
    """A multi-turn loop that carries the latent state across turns.

    Each user turn is read with the guide from the carried state (bounded window); each reply
    is written forward from it, and the state after the reply is carried on. Nothing but the
    state (``(samples, state)``) is kept between turns.

    Args:
        vmt: the fitted model.
        feature_fn: guide features of a window (default: the VMT's reader).
        read_config: window and acceleration for reading turns.
        sampling: how reply tokens are drawn.
        samples: parallel conversations (rows of the state).
    """

    def __init__(self, vmt, feature_fn: FeatureFn | None = None,
                 read_config: ReadConfig | None = None, sampling: SamplingConfig | None = None,
                 samples: int = 1):
        if read_config is not None and read_config.jump:
            raise ValueError("a conversation continues from its state; the jump only starts a read")
        self.vmt = vmt
        self.feature_fn = feature_fn
        self.read_config = read_config or ReadConfig()
        self.sampling = sampling or SamplingConfig()
        self.samples = samples
        self.state: torch.Tensor | None = None
        self.turns = 0
        self.tokens_seen = 0

    def hear(self, tokens: torch.Tensor) -> ReadResult:
        """Read a user turn ``(time,)`` from the carried state; returns the read's accounting."""
        result = read(self.vmt, tokens, self.read_config, self.feature_fn,
                      samples=self.samples, x0=self.state)
        self.state = result.state
        self.turns += 1
        self.tokens_seen += tokens.shape[0]
        return result

    def reply(self, num_tokens: int) -> torch.Tensor:
        """Write ``num_tokens`` tokens ``(samples, time)`` and carry the state on."""
        if self.state is None:
            raise ValueError("nothing has been read yet: call hear() before reply()")
        written = write(self.vmt, self.state, num_tokens, self.sampling)
        self.state = written.last_state
        self.tokens_seen += num_tokens
        return written.tokens
