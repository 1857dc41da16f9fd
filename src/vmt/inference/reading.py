"""Reading input of any length with a bounded window.

The guide of a VMT reads features ``h_k`` that summarise ``y_k .. y_end`` of the window it
was given. To read an input longer than any window, :func:`read`:

1. encodes the first ``W`` tokens (in reverse, through the feature function),
2. samples ``x_1 ~ q(x_1 | h_1, T)`` and steps the guide ``x_{k+1} ~ q(x_{k+1} | x_k, h_{k+1}, T)``
   up to ``W / 2``,
3. re-encodes ``W`` tokens from there (fresh look-ahead) and keeps stepping from the carried
   state, until the input ends (the last window is read to its end).

Only the features of the windows being read (``encode_windows`` of them, encoded in one
call) and the running state are held, so memory is bounded by the window, not by the input.
Two accelerations trade accuracy for speed:

* **skip** (``skip=t > 1``): ``x_{k+t} ~ q(x_{k+t} | x_k, h_{k+1}, t, T)`` with the skip guide;
* **jump** (``jump=True``): the first window's last state is drawn directly from the reverse
  guide's first-state distribution ``q_r(x_n | h_n)`` on features of a *forward* reading
  (``h_n`` summarises ``y_1 .. y_n``), and stepping continues from there.

Step-by-step reading keeps an exact running single-sample ELBO of everything read:
``sum_k log p(y_k | x_k) + log p(x_k | x_{k-1}) - log q(x_k | ...)`` (the first term of an
uncarried read uses the prior ``p(x_1)``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from tqdm.auto import tqdm

from vmt.models.guide import GuideNet
from vmt.models.parts import GaussianTransition
from vmt.models.scan import AffineNormal

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer

logger = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(inputs (batch, time) or (batch, time, obs), lengths (batch,)) -> (batch, time, feature)``;
:func:`read` passes one row per window, all of the same length.

Any reader of a VMT or an :class:`~vmt.encoders.features.LMFeatureExtractor` has this
signature. For the forward guide the features must be a *reversed* reading of the window.
"""


@dataclass(frozen=True)
class ReadConfig:
    """How to read.

    Attributes:
        window: tokens encoded at once (``W >= 2``); a new window starts every ``W // 2``.
        skip: ``1`` reads step by step; ``t > 1`` samples only every ``t``-th state with the
            skip guide (no ELBO is kept then: the skipped tokens are not scored).
        jump: draw the state at the end of the first window with ``q_r(x_n | h_n)`` (needs a
            VMT with reverse networks) instead of stepping through it.
        score: keep the running ELBO terms (costs a transition and an emission evaluation
            per token; switch off for the fastest reading).
        keep_path: also return every state ``(samples, time, state)`` (memory grows with the
            input; meant for posterior inspection of texts of moderate length).
        encode_windows: windows of equal length encoded in one call of the feature function
            (their features do not depend on the states, so they can be computed ahead). A
            recurrent reader pays per time step, not per row, so a batch of windows costs
            little more than one; memory holds this many windows' features.
    """

    window: int = 256
    skip: int = 1
    jump: bool = False
    score: bool = True
    keep_path: bool = False
    encode_windows: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an integer >= 2, got {self.window!r}")
        if not isinstance(self.skip, int) or self.skip < 1:
            raise ValueError(f"skip must be an integer >= 1, got {self.skip!r}")
        if self.skip > self.window // 2:
            raise ValueError(f"skip {self.skip} must not exceed half the window ({self.window // 2})")
        if not isinstance(self.encode_windows, int) or self.encode_windows < 1:
            raise ValueError(f"encode_windows must be an integer >= 1, got {self.encode_windows!r}")


@dataclass
class ReadResult:
    """What a read produced.

    Attributes:
        state: ``(samples, state)`` the state at the last position that was read.
        position: index of that position in the input.
        tokens_read: input length.
        log_lik, log_latent, log_guide: ``(samples,)`` sums over the scored positions of
            ``log p(y_k | x_k)``, ``log p(x_k | x_{k-1})`` (or the prior) and ``log q``.
        scored: number of positions whose terms are summed (all of them when reading step by
            step; the sampled positions only when skipping; none inside a jumped window).
        path: ``(samples, time, state)`` every state (``keep_path``; ``None`` otherwise). With
            skipping or a jump, positions without a sampled state are NaN.
        windows: number of windows encoded.
        skipped_to: positions reached by a skip of ``t > 1`` (only their emission is in
            ``log_lik``; ``elbo`` is then not a bound).
    """

    state: torch.Tensor
    position: int
    tokens_read: int
    log_lik: torch.Tensor
    log_latent: torch.Tensor
    log_guide: torch.Tensor
    scored: int
    path: torch.Tensor | None
    windows: int
    skipped_to: int = 0

    @property
    def elbo(self) -> torch.Tensor:
        """``(samples,)`` single-sample ELBO of the scored positions."""
        return self.log_lik + self.log_latent - self.log_guide

    def neg_elbo_per_token(self) -> float:
        """Mean over samples of ``-ELBO / scored positions`` (nats per token)."""
        if self.skipped_to:
            raise ValueError("a skip read has no ELBO; price it with continuation_cost")
        if self.scored == 0:
            raise ValueError("no position was scored (the whole input was jumped over)")
        return float(-self.elbo.mean()) / self.scored


def reader_features(vmt: VariationalMarkovTransformer) -> FeatureFn:
    """The VMT's own trainable reader as a feature function."""
    if vmt.reader is None:
        raise ValueError("this VMT has no reader; pass a feature function (e.g. an LMFeatureExtractor)")
    return vmt.reader


def flipped(feature_fn: FeatureFn) -> FeatureFn:
    """The same feature function applied to the time-reversed window, flipped back.

    For a reversed reader this gives a *forward* reading (``h_k`` summarises ``y_1 .. y_k``),
    which is what the reverse guide ``q_r`` was trained on when the reverse VMT was fitted on
    reversed documents with the shared reader (see :mod:`vmt.inference.reverse`).
    """

    def forward_reading(inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return feature_fn(inputs.flip(1), lengths).flip(1)

    return forward_reading


def _check_input(tokens: torch.Tensor, obs_dim: int, categorical: bool) -> None:
    if categorical:
        if tokens.dim() != 1 or tokens.is_floating_point():
            raise ValueError(f"tokens must be (time,) int64, got {tuple(tokens.shape)} {tokens.dtype}")
    elif tokens.dim() != 2 or tokens.shape[-1] != obs_dim:
        raise ValueError(f"observations must be (time, {obs_dim}), got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError("cannot read an empty input (0 tokens)")
    if categorical and (int(tokens.min()) < 0 or int(tokens.max()) >= obs_dim):
        raise ValueError(
            f"token ids must lie in [0, {obs_dim}), got [{int(tokens.min())}, {int(tokens.max())}]"
        )


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _DiagNormal:
    """A lean diagonal Gaussian (event ``(state,)``) without distribution-object overhead."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        self.loc, self.scale = loc, scale

    def sample(self) -> torch.Tensor:
        return self.loc + torch.randn_like(self.loc) * self.scale

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.loc) / self.scale
        return -(0.5 * z * z + self.scale.log() + _HALF_LOG_2PI).sum(-1)


def _gaussian(net: GuideNet, loc, scale, combined):
    if getattr(net, "tril_head", None) is not None:
        return net.distribution(loc, scale, combined)
    if scale.dim() > loc.dim():  # a covariance factor (the full affine guide)
        return AffineNormal(loc, scale, full=True)
    transforms = net.flow_transforms(combined)
    if not transforms:
        return _DiagNormal(loc, scale)
    return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), transforms)


def _transition(transition, x_prev: torch.Tensor):
    """``p(x_k | x_{k-1})``, lean when the transition is Gaussian."""
    if isinstance(transition, GaussianTransition):
        return _DiagNormal(*transition.loc_scale(x_prev))
    return transition.distribution(x_prev)


def _window_starts(n: int, window: int, start: int) -> Iterator[int]:
    """Start of every window a read of ``n`` positions encodes from ``start`` on: one every
    ``window // 2`` positions, the last one reaching the end."""
    pos = start
    while pos < n:
        yield pos
        if pos + window >= n:
            return
        pos += window // 2


def _window_groups(n: int, window: int, start: int, group: int) -> Iterator[list[int]]:
    """:func:`_window_starts` in runs of at most ``group`` windows of equal length (only the
    last window can be shorter than ``window``), each run encoded in one call."""
    run: list[int] = []
    for pos in _window_starts(n, window, start):
        if run and (len(run) == group or min(window, n - pos) != min(window, n - run[0])):
            yield run
            run = []
        run.append(pos)
    if run:
        yield run


def _windows_context(
    net: GuideNet, feature_fn: FeatureFn, feature_tokens: torch.Tensor, tokens: torch.Tensor,
    starts: list[int], window: int,
) -> torch.Tensor:
    """``(windows, time, hidden)`` guide contexts of the equal-length windows at ``starts``,
    encoded in one call of the feature function on ``(windows, time)`` rows of
    ``feature_tokens`` (``(windows, time, obs)`` for observations); ``tokens`` are the
    emission's ids (read by guides that read tokens)."""
    steps = min(window, tokens.shape[0] - starts[0])
    rows = torch.stack([feature_tokens[p : p + steps] for p in starts])  # (windows, time[, obs])
    lengths = torch.full((len(starts),), steps, dtype=torch.long, device=rows.device)
    feats = feature_fn(rows, lengths)
    if feats.dim() != 3 or feats.shape[:2] != (len(starts), steps):
        raise ValueError(f"the feature function returned {tuple(feats.shape)}, "
                         f"expected ({len(starts)}, {steps}, feature)")
    ahead = steps - torch.arange(steps, device=feats.device)
    ahead = ahead.expand(len(starts), -1)  # (windows, time)
    if net.reads_tokens:
        ids = torch.stack([tokens[p : p + steps] for p in starts]).to(feats.device)
        return net.context(feats, ahead, tokens=ids)
    return net.context(feats, ahead)


class _Reading:
    """The running state of one :func:`read`: the last state, the ELBO sums and the counts.

    ``log_lik``, ``log_latent``, ``log_guide`` are ``(samples,)``; ``path`` is
    ``(samples, time, state)`` or ``None``.
    """

    def __init__(self, vmt, tokens: torch.Tensor, samples: int, x0: torch.Tensor | None, keep_path: bool):
        c = vmt.config
        param = next(vmt.parameters())
        dtype, device = param.dtype, param.device
        zeros = torch.zeros(samples, dtype=dtype, device=device)
        self.vmt, self.tokens, self.samples = vmt, tokens, samples
        self.categorical = c.emits_tokens
        self.log_lik, self.log_latent, self.log_guide = zeros.clone(), zeros.clone(), zeros.clone()
        self.path = (torch.full((samples, tokens.shape[0], c.state_dim), float("nan"), dtype=dtype, device=device)
                     if keep_path else None)
        self.x_prev, self.last = x0, -1
        self.scored = self.windows = self.sampled_only = 0

    def emission_log_prob(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``(samples,)`` ``log p(y_k | x)`` for ``x (samples, state)``."""
        y = self.tokens[k]
        rows = y.expand(self.samples) if self.categorical else y.expand(self.samples, -1)
        return self.vmt.emission.log_prob(x, rows)

    def score(self, x: torch.Tensor, k: int, latent_lp: torch.Tensor, guide_lp: torch.Tensor) -> None:
        """Add position ``k``'s three terms to the running sums."""
        self.log_lik += self.emission_log_prob(x, k)
        self.log_latent += latent_lp
        self.log_guide += guide_lp
        self.scored += 1

    def keep(self, x: torch.Tensor, k: int) -> None:
        """``x (samples, state)`` becomes the state at position ``k``."""
        if self.path is not None:
            self.path[:, k] = x
        self.x_prev, self.last = x, k

    def result(self) -> ReadResult:
        return ReadResult(
            state=self.x_prev, position=self.last, tokens_read=self.tokens.shape[0], log_lik=self.log_lik,
            log_latent=self.log_latent, log_guide=self.log_guide, scored=self.scored, path=self.path,
            windows=self.windows, skipped_to=self.sampled_only,
        )


def _checked_x0(x0: torch.Tensor | None, samples: int, state_dim: int) -> torch.Tensor | None:
    """``x0`` as ``(samples, state)`` (``None`` stays ``None``)."""
    if x0 is None:
        return None
    x0 = x0.expand(samples, -1) if x0.dim() == 1 else x0
    if x0.shape != (samples, state_dim):
        raise ValueError(f"x0 must be ({samples}, {state_dim}) or ({state_dim},), got {tuple(x0.shape)}")
    return x0


def _jump(reading: _Reading, reverse_net: GuideNet, features: FeatureFn, feature_tokens: torch.Tensor,
          window: int) -> int:
    """Draw the state at the end of the first window from ``q_r(x_m | h_m)`` on a forward
    reading of it; returns the number of positions jumped over (``m``)."""
    tokens = reading.tokens
    first = feature_tokens[: min(window, tokens.shape[0])]
    m = first.shape[0]
    fwd = features(first[None], torch.tensor([m], device=first.device))  # (1, m, feature)
    # h_m summarises y_1 .. y_m; the reverse guide reads the reversed window, whose first
    # position is y_m with m tokens ahead
    ahead = torch.tensor([[m]], device=fwd.device)
    if reverse_net.reads_tokens:
        ctx = reverse_net.context(fwd[:, -1:], ahead, tokens=tokens[m - 1 : m][None])[0, 0]
    else:
        ctx = reverse_net.context(fwd[:, -1:], ahead)[0, 0]
    loc, scale, combined = reverse_net.first_params(ctx.expand(reading.samples, -1))
    reading.keep(_gaussian(reverse_net, loc, scale, combined).sample(), m - 1)
    reading.windows = 1
    return m


def _first_state(reading: _Reading, net: GuideNet, ctx_k: torch.Tensor, k: int, score: bool) -> None:
    """Sample ``x_k ~ q(x_1 | h_k, T)`` from the guide context ``ctx_k (hidden,)``; scored
    against the prior (built only then: reads that do not score never need it)."""
    loc, scale, combined = net.first_params(ctx_k.expand(reading.samples, -1))
    q = _gaussian(net, loc, scale, combined)
    x = q.sample()
    if score:
        reading.score(x, k, reading.vmt.prior.distribution().log_prob(x), q.log_prob(x))
    reading.keep(x, k)


def _next_state(reading: _Reading, net: GuideNet, transition, ctx: torch.Tensor, step_ctx: torch.Tensor,
                pos: int, k: int, skip: int, score: bool) -> None:
    """Sample ``x_k`` from the previous state ``k - last`` positions back with the (skip)
    guide; ``ctx (time, hidden)`` and ``step_ctx`` (its skip context for ``skip``) belong to the
    window starting at ``pos``."""
    step = k - reading.last
    samples = reading.samples
    # the skip guide conditions on h at the position after the previous state
    # (the start of this window when that position lies in an earlier one)
    h_pos = max(reading.last + 1 - pos, 0)
    if step == skip:
        skip_ctx = step_ctx[h_pos].expand(samples, -1)
    else:
        skip_ctx = net.skip_context(ctx[h_pos].expand(samples, -1), step)
    if step > 1 and net.reads_tokens:  # only these read the target's context
        skip_ctx = net.with_target(skip_ctx, ctx[k - pos].expand(samples, -1))
    x_prev = reading.x_prev
    loc, scale, combined = net.step_params(x_prev, skip_ctx, skip=step)
    q = _gaussian(net, loc, scale, combined)
    x = q.sample()
    if step > 1:
        reading.sampled_only += 1
        if score:
            # no closed-form t-step transition density: only the emission is scored
            reading.log_lik += reading.emission_log_prob(x, k)
    elif score:
        reading.score(x, k, _transition(transition, x_prev).log_prob(x), q.log_prob(x))
    reading.keep(x, k)


def _read_window(reading: _Reading, net: GuideNet, transition, ctx: torch.Tensor,
                 step_ctx: torch.Tensor, pos: int, config: ReadConfig) -> int:
    """Sample the states of the first half of the window starting at ``pos`` (all of it when
    it is the last window) from its guide context ``ctx (time, hidden)`` and skip context
    ``step_ctx (time, hidden)``; returns how many positions it advanced."""
    n, w, t = reading.tokens.shape[0], config.window, config.skip
    reading.windows += 1
    final = pos + w >= n
    advance = n - pos if final else w // 2
    # positions to sample inside [pos, pos + advance); a skip read ends exactly at n - 1
    while True:
        k = pos if reading.x_prev is None else reading.last + t
        if final and reading.x_prev is not None and reading.last < n - 1 < k:
            k = n - 1
        if k >= pos + advance:
            return advance
        if reading.x_prev is None:
            _first_state(reading, net, ctx[k - pos], k, config.score)
        else:
            _next_state(reading, net, transition, ctx, step_ctx, pos, k, t, config.score)


def _read_windows(reading: _Reading, net: GuideNet, transition, feature_fn: FeatureFn,
                  feature_tokens: torch.Tensor, start: int, config: ReadConfig) -> Iterator[int]:
    """Read every window from ``start`` on, encoding ``config.encode_windows`` at a time;
    yields how many positions each window advanced."""
    n, t = reading.tokens.shape[0], config.skip
    for starts in _window_groups(n, config.window, start, config.encode_windows):
        ctx = _windows_context(net, feature_fn, feature_tokens, reading.tokens, starts,
                               config.window)  # (windows, time, hidden)
        step_ctx = net.skip_context(ctx, t)  # everything x-independent, once per run of windows
        for i, pos in enumerate(starts):
            yield _read_window(reading, net, transition, ctx[i], step_ctx[i], pos, config)


@torch.no_grad()
def read(
    vmt: VariationalMarkovTransformer,
    tokens: torch.Tensor,
    config: ReadConfig | None = None,
    feature_fn: FeatureFn | None = None,
    *,
    samples: int = 1,
    x0: torch.Tensor | None = None,
    direction: str = "forward",
    jump_features: FeatureFn | None = None,
    feature_tokens: torch.Tensor | None = None,
    progress: bool = False,
) -> ReadResult:
    """Read ``tokens`` with a bounded window and return the last state and ELBO terms.

    Args:
        vmt: a fitted :class:`~vmt.models.vmt.VariationalMarkovTransformer`.
        tokens: ``(time,)`` int64 tokens (categorical emission) or ``(time, obs)`` floats.
        config: :class:`ReadConfig` (default: window 256, step by step).
        feature_fn: computes guide features of a window (default: the VMT's reader).
        samples: independent reads at once (rows of the state).
        x0: ``(samples, state)`` or ``(state,)`` carried state to continue from (e.g. the
            state after an earlier turn); ``None`` starts with ``q(x_1 | h_1, T)``.
        direction: ``"reverse"`` reads with the reverse guide and scores with ``p_r`` (give it
            time-reversed tokens and a feature function of the reverse model).
        jump_features: forward-reading features for the jump (default: ``flipped(feature_fn)``).
        feature_tokens: ``(time,)`` what the feature function reads in place of ``tokens``
            (e.g. a frozen LM's own ids when ``tokens`` are compact emission ids, so tokens
            merged into ``<unk>`` still reach the LM as themselves).
        progress: show a progress bar over the tokens read (stderr).

    Returns:
        :class:`ReadResult`.
    """
    config = config or ReadConfig()
    c = vmt.config
    _check_input(tokens, c.obs_dim, c.emits_tokens)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if feature_tokens is None:
        feature_tokens = tokens
    elif feature_tokens.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"feature_tokens must have the {tokens.shape[0]} positions of tokens, "
            f"got shape {tuple(feature_tokens.shape)}"
        )
    feature_fn = feature_fn or reader_features(vmt)
    net = vmt.guide_net_for(direction)
    transition = vmt.transition_for(direction)
    if config.jump:
        if direction != "forward":
            raise ValueError("the jump reads forward; it cannot be combined with direction='reverse'")
        if x0 is not None:
            raise ValueError("the jump starts a read; it cannot continue from a carried x0")
        reverse_net = vmt.guide_net_for("reverse")  # raises without reverse networks
    reading = _Reading(vmt, tokens, samples, _checked_x0(x0, samples, c.state_dim), config.keep_path)
    n, pos = tokens.shape[0], 0
    bar = tqdm(total=n, unit="tok", desc="reading", disable=not progress, leave=False)
    if config.jump:
        pos = _jump(reading, reverse_net, jump_features or flipped(feature_fn), feature_tokens, config.window)
        bar.update(pos)
    for advance in _read_windows(reading, net, transition, feature_fn, feature_tokens, pos, config):
        bar.update(advance)
    bar.close()
    return reading.result()


def continuation_cost(
    vmt: VariationalMarkovTransformer,
    result: ReadResult,
    tail: torch.Tensor,
    feature_fn: FeatureFn | None = None,
    window: int = 256,
) -> float:
    """Negative ELBO per token of ``tail`` read step by step from ``result.state``.

    This is how the accelerations are priced: a state reached by skipping or jumping is
    worth as much as the ELBO of what follows it.
    """
    follow = read(vmt, tail, ReadConfig(window=window), feature_fn,
                  samples=result.state.shape[0], x0=result.state)
    return follow.neg_elbo_per_token()
