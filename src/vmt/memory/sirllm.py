"""SirLLM (Yao et al., ACL 2024): keep the tokens the model found most surprising.

Every fed token gets a score, its surprisal ``s_i = -log p(y_i | y_<i)`` under the model
reading the (already compressed) cache. When the next tokens would overflow the budget the
cache keeps the ``n_sinks`` first tokens, an optional window of the newest ``n_recent``
tokens, and, among the rest, the tokens of highest score, in temporal order. After every
dialogue round every kept score is multiplied by a decay ratio ``r`` in (0, 1], so old
key tokens slowly lose their claim on the cache.

The reference implementation scores differently: it gathers the log-probability that each
position's *own* prediction (for the following token) assigns to the position's token, shifts
that list right by one inside each forward call, and gives the first token of the call the
call's maximum. ``surprisal="reference"`` reproduces that; ``"paper"`` (default) is the
definition above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vmt.memory.cache import CacheState, EvictionPolicy, _check_int

SURPRISAL_MODES = ("paper", "reference")


@dataclass(frozen=True)
class SirLLMConfig:
    """Hyperparameters of SirLLM.

    Attributes:
        budget: maximum number of cached tokens (sinks and window included).
        n_sinks: initial tokens always kept.
        n_recent: newest tokens always kept (published runs: 0).
        decay: ratio in (0, 1] applied to every kept score after each round
            (published: 0.7 DailyDialog, 1.0 grocery, 0.9 rock-paper-scissors).
        surprisal: ``"paper"`` or ``"reference"`` (see the module docstring).
    """

    budget: int
    n_sinks: int = 4
    n_recent: int = 0
    decay: float = 0.9
    surprisal: str = "paper"

    def __post_init__(self) -> None:
        _check_int("budget", self.budget, 1)
        _check_int("n_sinks", self.n_sinks, 0)
        _check_int("n_recent", self.n_recent, 0)
        if self.budget <= self.n_sinks + self.n_recent:
            raise ValueError(
                f"budget ({self.budget}) must exceed sinks + recent window "
                f"({self.n_sinks} + {self.n_recent}) so that at least one new token fits"
            )
        decay = float(self.decay)
        if not (0.0 < decay <= 1.0):
            raise ValueError(f"decay must lie in (0, 1], got {self.decay!r}")
        if self.surprisal not in SURPRISAL_MODES:
            raise ValueError(f"surprisal must be one of {SURPRISAL_MODES}, got {self.surprisal!r}")


def paper_surprisal(token_logprobs: torch.Tensor) -> torch.Tensor:
    """``-log p(y_i | y_<i)`` in nats: (time,) float64; 0 where undefined (stream start)."""
    return torch.nan_to_num(-token_logprobs.to(torch.float64), nan=0.0)


def reference_surprisal(next_logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The reference code's scores for the tokens of one forward call.

    Args:
        next_logprobs: (time, vocab) log-probabilities at each position (predicting the
            following token).
        tokens: (time,) the tokens of the call.

    Returns:
        (time,) float64: ``raw_j = -next_logprobs[j, tokens[j]]`` shifted right by one, with
        ``max_j raw_j`` in front.
    """
    if next_logprobs.dim() != 2 or tokens.shape != (next_logprobs.shape[0],):
        raise ValueError(
            f"need next_logprobs (time, vocab) and tokens (time,), got "
            f"{tuple(next_logprobs.shape)} and {tuple(tokens.shape)}"
        )
    raw = -next_logprobs.gather(1, tokens[:, None].to(next_logprobs.device))[:, 0]
    raw = raw.to(torch.float64).cpu()
    if raw.numel() == 0:
        return raw
    return torch.cat([raw.max().reshape(1), raw[:-1]])


class SirLLM(EvictionPolicy):
    """Sinks + highest-(decayed-)surprisal tokens (+ optional recent window)."""

    def __init__(
        self,
        budget: int,
        n_sinks: int = 4,
        n_recent: int = 0,
        decay: float = 0.9,
        surprisal: str = "paper",
    ) -> None:
        self.config = SirLLMConfig(budget, n_sinks, n_recent, decay, surprisal)
        self.budget = budget
        self.reserved = n_sinks + n_recent
        self.name = f"sirllm(r={decay:g})"

    def token_scores(
        self, token_logprobs: torch.Tensor, next_logprobs: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        if self.config.surprisal == "reference":
            return reference_surprisal(next_logprobs, tokens)
        return paper_surprisal(token_logprobs)

    def end_round(self, state: CacheState) -> None:
        """Multiply every kept score by the decay ratio."""
        state.scores = state.scores * float(self.config.decay)

    def select(self, state: CacheState, n_incoming: int) -> torch.Tensor:
        n = len(state)
        n_keep = self.budget - n_incoming
        if n_keep >= n:
            return torch.arange(n, dtype=torch.int64)
        cfg = self.config
        always = torch.zeros(n, dtype=torch.bool)
        always[: min(cfg.n_sinks, n)] = True
        if cfg.n_recent > 0:
            always[max(n - cfg.n_recent, 0) :] = True
        n_scored = n_keep - int(always.sum())
        candidates = torch.nonzero(~always)[:, 0]
        if n_scored > 0 and candidates.numel() > 0:
            scores = state.scores[candidates]
            # Highest score first; among equal scores the newer token wins (stable, deterministic).
            order = torch.argsort(candidates.to(torch.float64), descending=True, stable=True)
            order = order[torch.argsort(scores[order], descending=True, stable=True)]
            always[candidates[order[:n_scored]]] = True
        return torch.nonzero(always)[:, 0]
