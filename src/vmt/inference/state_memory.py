"""Long-term memory of latent states: store, recall by similarity, fade.

A VMT's running state is all it carries forward; whatever it lets go is gone. The state
store keeps selected past states ``x_k`` in a small vector index. While reading, whenever
the running state comes close (cosine similarity) to a stored one, the model *writes* a short
recall sequence from the stored state (``x ~ p(x' | x)``, ``y ~ p(y | x)``) and *reads it
back* with the guide from the running state, so the remembered content re-enters the state
the usual way: through tokens. Entries that are never revisited fade and are forgotten.

Everything is configured by :class:`StateMemoryConfig`; :class:`MemoryReader` reports what it
stored, recalled and forgot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from vmt.inference.generation import SamplingConfig, write
from vmt.inference.reading import FeatureFn, ReadConfig, read

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateMemoryConfig:
    """Settings of the state store.

    Attributes:
        capacity: most states kept; when full the weakest entry is replaced.
        store_every: the running state is stored (and the store queried) every this many
            tokens read.
        threshold: cosine similarity at or above which a stored state is recalled.
        recall_length: tokens written from a recalled state and read back.
        decay: strength of an entry is multiplied by ``decay`` per token read (``1``: never
            fades); a recall restores it to 1.
        min_strength: entries weaker than this are forgotten.
        min_age: an entry is not recalled within this many tokens of being stored (the
            running state is always close to what it just stored).
    """

    capacity: int = 64
    store_every: int = 64
    threshold: float = 0.9
    recall_length: int = 16
    decay: float = 0.999
    min_strength: float = 0.05
    min_age: int = 128

    def __post_init__(self) -> None:
        for name in ("capacity", "store_every", "recall_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], got {self.decay}")
        if not 0 <= self.min_strength < 1:
            raise ValueError(f"min_strength must lie in [0, 1), got {self.min_strength}")
        if self.min_age < 0:
            raise ValueError(f"min_age must be >= 0, got {self.min_age}")


class StateStore:
    """A fixed-capacity cosine index of states with fading strengths.

    Args:
        state_dim: dimension ``D`` of a state.
        config: :class:`StateMemoryConfig`.
        device, dtype: where and how the keys are kept (those of the model's states).
    """

    def __init__(self, state_dim: int, config: StateMemoryConfig | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.config = config or StateMemoryConfig()
        c = self.config.capacity
        self.keys = torch.zeros(c, state_dim, device=device, dtype=dtype)
        self.strength = torch.zeros(c, device=device, dtype=dtype)
        self.stored_at = torch.zeros(c, dtype=torch.long, device=device)
        self.active = torch.zeros(c, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return int(self.active.sum())

    def store(self, state: torch.Tensor, position: int) -> int:
        """Keep ``state (state,)`` seen at ``position``; returns its slot."""
        if state.shape != self.keys.shape[1:]:
            raise ValueError(f"state must be ({self.keys.shape[1]},), got {tuple(state.shape)}")
        free = (~self.active).nonzero().flatten()
        slot = int(free[0]) if free.numel() else int(self.strength.argmin())
        self.keys[slot] = state.detach().to(self.keys.dtype)
        self.strength[slot] = 1.0
        self.stored_at[slot] = position
        self.active[slot] = True
        return slot

    def nearest(self, state: torch.Tensor, position: int) -> tuple[int, float] | None:
        """The most similar entry old enough to recall: ``(slot, cosine)``, or ``None``."""
        eligible = self.active & (position - self.stored_at >= self.config.min_age)
        if not bool(eligible.any()):
            return None
        sim = F.cosine_similarity(self.keys, state.to(self.keys.dtype)[None], dim=-1)
        sim = sim.masked_fill(~eligible, float("-inf"))
        slot = int(sim.argmax())
        return slot, float(sim[slot])

    def fade(self, tokens: int) -> int:
        """Weaken every entry by ``decay ** tokens``; forget the weak. Returns how many went."""
        self.strength *= self.config.decay ** tokens
        gone = self.active & (self.strength < self.config.min_strength)
        self.active &= ~gone
        self.strength[gone] = 0
        return int(gone.sum())

    def revisit(self, slot: int) -> None:
        self.strength[slot] = 1.0


@dataclass
class MemoryEvents:
    """What a :class:`MemoryReader` did.

    Attributes:
        stored: positions at which a state was stored.
        recalls: ``(position, slot, similarity)`` for every recall.
        forgotten: entries that faded out.
        recall_tokens: tokens written and read back in total.
    """

    stored: list[int] = field(default_factory=list)
    recalls: list[tuple[int, int, float]] = field(default_factory=list)
    forgotten: int = 0
    recall_tokens: int = 0


class MemoryReader:
    """Read with a VMT while keeping a long-term store of its states.

    The input is read in chunks of ``store_every`` tokens from the carried state; after each
    chunk the store fades, is queried with the running state (a recall writes
    ``recall_length`` tokens from the stored state and reads them back), and the running
    state is stored.

    Args:
        vmt: the fitted model.
        config: :class:`StateMemoryConfig`.
        feature_fn: guide features (default: the VMT's reader).
        window: reading window (at most ``store_every`` tokens are read per call).
        sampling: how recall tokens are drawn.
    """

    def __init__(self, vmt, config: StateMemoryConfig | None = None,
                 feature_fn: FeatureFn | None = None, window: int = 256,
                 sampling: SamplingConfig | None = None):
        self.vmt = vmt
        self.config = config or StateMemoryConfig()
        param = next(vmt.parameters())
        self.store = StateStore(vmt.config.state_dim, self.config, param.device, param.dtype)
        self.feature_fn = feature_fn
        self.read_config = ReadConfig(window=window, score=False)
        self.sampling = sampling or SamplingConfig()
        self.state: torch.Tensor | None = None
        self.position = 0
        self.events = MemoryEvents()

    def read(self, tokens: torch.Tensor) -> torch.Tensor:
        """Read ``tokens (time,)``; returns the running state ``(1, state)``."""
        if tokens.shape[0] == 0:
            raise ValueError("cannot read an empty input (0 tokens)")
        c = self.config
        for start in range(0, tokens.shape[0], c.store_every):
            chunk = tokens[start : start + c.store_every]
            self.state = read(self.vmt, chunk, self.read_config, self.feature_fn, x0=self.state).state
            self.position += chunk.shape[0]
            self.events.forgotten += self.store.fade(chunk.shape[0])
            hit = self.store.nearest(self.state[0], self.position)
            if hit is not None and hit[1] >= c.threshold:
                self._recall(*hit)
            self.events.stored.append(self.position)
            self.store.store(self.state[0], self.position)
        return self.state

    def _recall(self, slot: int, similarity: float) -> None:
        written = write(self.vmt, self.store.keys[slot][None], self.config.recall_length, self.sampling)
        self.state = read(self.vmt, written.tokens[0], self.read_config, self.feature_fn,
                          x0=self.state).state
        self.store.revisit(slot)
        self.events.recalls.append((self.position, slot, similarity))
        self.events.recall_tokens += self.config.recall_length
        logger.debug("recalled slot %d (cosine %.3f) at %d", slot, similarity, self.position)
