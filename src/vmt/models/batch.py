"""``ChainBatch``: rows of latent chains over one padded time axis.

Shape vocabulary: ``batch`` rows (chains), ``time`` positions, ``state`` latent dimension,
``feature`` guide-input dimension, ``obs`` observation dimension. Row ``r`` is active at
positions ``start[r] <= k < end[r]``; its first state is drawn from the prior (or, when
``carried[r]``, from the transition out of the carried state ``x0[r]``). Several rows may
share one sequence of guide features through ``source`` — that is how every suffix of a
sampled sequence reuses one reversed reading.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class ChainBatch:
    """A batch of chains.

    Attributes:
        obs: ``(batch, time)`` int64 tokens, or ``(batch, time, obs)`` float observations;
            ``None`` for a batch without observations (the model then samples them: prior
            predictive draws, see :meth:`unobserved`).
        start: ``(batch,)`` int64, first active position of each row.
        end: ``(batch,)`` int64, one past the last active position.
        features: ``(source, time, feature)`` guide features ``h`` (``None`` when the model's
            trainable reader computes them from ``reader_input``).
        source: ``(batch,)`` int64 row of ``features`` / ``reader_input`` each chain reads
            (``None``: row ``r`` reads row ``r``).
        reader_input: ``(source, time)`` tokens or ``(source, time, feature)`` inputs of a
            trainable reader.
        reader_lengths: ``(source,)`` int64 valid lengths of ``reader_input``.
        x0: ``(batch, state)`` carried states (``None``: no row is carried).
        carried: ``(batch,)`` bool, which rows start from ``x0``.
        weight: ``(batch, time)`` float weights of the positions' ELBO terms in a training
            loss (``None``: all 1; see :meth:`vmt.inference.elbo.ElboTerms.elbo_per_row`).
    """

    obs: torch.Tensor | None
    start: torch.Tensor
    end: torch.Tensor
    features: torch.Tensor | None = None
    source: torch.Tensor | None = None
    reader_input: torch.Tensor | None = None
    reader_lengths: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    carried: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    @classmethod
    def unobserved(cls, rows: int, steps: int, **fields) -> ChainBatch:
        """``rows`` chains over positions ``0 .. steps - 1`` with no observations."""
        if rows < 1 or steps < 1:
            raise ValueError(f"an unobserved batch needs rows >= 1 and steps >= 1, got {rows} and {steps}")
        return cls(obs=None, start=torch.zeros(rows, dtype=torch.long),
                   end=torch.full((rows,), steps, dtype=torch.long), **fields)

    @property
    def num_rows(self) -> int:
        return self.start.shape[0] if self.obs is None else self.obs.shape[0]

    @property
    def num_steps(self) -> int:
        """Positions on the time axis (without observations: up to the last row's end)."""
        return int(self.end.max()) if self.obs is None else self.obs.shape[1]

    @property
    def num_tokens(self) -> int:
        return int((self.end - self.start).sum())

    def positions(self) -> torch.Tensor:
        """``(time,)`` int64 position indices."""
        return torch.arange(self.num_steps, device=self.start.device)

    def mask(self) -> torch.Tensor:
        """``(batch, time)`` bool, True where a row is active."""
        pos = self.positions()
        return (pos >= self.start[:, None]) & (pos < self.end[:, None])

    def first_mask(self) -> torch.Tensor:
        """``(batch, time)`` bool, True at each row's first active position."""
        return self.positions() == self.start[:, None]

    def carried_rows(self) -> torch.Tensor:
        """``(batch,)`` bool."""
        if self.carried is None:
            return torch.zeros(self.num_rows, dtype=torch.bool, device=self.start.device)
        return self.carried

    def ahead(self) -> torch.Tensor:
        """``(batch, time)`` int64: tokens from each position to the row's end, >= 1."""
        return (self.end[:, None] - self.positions()).clamp(min=1)

    def with_(self, **changes) -> ChainBatch:
        return replace(self, **changes)

    def validate(self, state_dim: int | None = None, obs_dim: int | None = None) -> ChainBatch:
        """Check shapes and values; raise ``ValueError`` naming what is wrong."""
        rows, steps = self.num_rows, self.num_steps
        if self.obs is not None and self.obs.dim() not in (2, 3):
            raise ValueError(f"obs must be (batch, time) or (batch, time, obs), got {tuple(self.obs.shape)}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value.shape != (rows,):
                raise ValueError(f"{name} must have shape ({rows},), got {tuple(value.shape)}")
        if steps < 1:
            raise ValueError("a batch needs at least one time step")
        if bool((self.start < 0).any()) or bool((self.end > steps).any()):
            raise ValueError(f"start/end must lie in [0, {steps}]")
        if bool((self.end <= self.start).any()):
            bad = int(torch.nonzero(self.end <= self.start)[0, 0])
            raise ValueError(f"row {bad} is empty (start {int(self.start[bad])}, end {int(self.end[bad])})")
        if self.obs is None:
            pass
        elif self.obs.is_floating_point():
            if not bool(torch.isfinite(self.obs).all()):
                raise ValueError("observations contain NaN or inf")
            if obs_dim is not None and self.obs.dim() == 3 and self.obs.shape[-1] != obs_dim:
                raise ValueError(f"observations have dimension {self.obs.shape[-1]}, the model expects {obs_dim}")
        elif obs_dim is not None:
            active = self.obs[self.mask()]
            if active.numel() and (int(active.min()) < 0 or int(active.max()) >= obs_dim):
                raise ValueError(
                    f"token ids must lie in [0, {obs_dim}) for this emission, got "
                    f"[{int(active.min())}, {int(active.max())}]: the tokenizer and the emission "
                    "vocabulary do not match"
                )
        n_source = rows if self.source is None else int(self.source.max()) + 1
        if self.source is not None and self.source.shape != (rows,):
            raise ValueError(f"source must have shape ({rows},), got {tuple(self.source.shape)}")
        if self.features is not None:
            f = self.features
            if f.dim() != 3 or f.shape[1] != steps or f.shape[0] < n_source:
                raise ValueError(
                    f"features must be (source, {steps}, feature) with source >= {n_source}, "
                    f"got {tuple(f.shape)}"
                )
            if not bool(torch.isfinite(f).all()):
                where = torch.nonzero(~torch.isfinite(f))[0].tolist()
                raise ValueError(f"features contain NaN or inf (first at source row {where[0]}, position {where[1]})")
        if self.x0 is not None:
            if state_dim is not None and self.x0.shape != (rows, state_dim):
                raise ValueError(f"x0 must be ({rows}, {state_dim}), got {tuple(self.x0.shape)}")
            if self.carried is None or self.carried.shape != (rows,):
                raise ValueError("x0 needs carried: (batch,) bool")
        elif self.carried is not None and bool(self.carried.any()):
            raise ValueError("rows are marked carried but x0 is missing")
        if self.weight is not None:
            if self.weight.shape != (rows, steps):
                raise ValueError(f"weight must be ({rows}, {steps}) (batch, time), got {tuple(self.weight.shape)}")
            if not bool(torch.isfinite(self.weight).all()) or bool((self.weight < 0).any()):
                raise ValueError("weight must be finite and >= 0")
        return self


def sequences_to_batch(
    sequences: list[torch.Tensor], features: list[torch.Tensor] | None = None
) -> ChainBatch:
    """Right-pad a list of sequences (``(time,)`` tokens or ``(time, obs)``) into a batch."""
    if not sequences:
        raise ValueError("no sequences given")
    lengths = torch.tensor([len(s) for s in sequences])
    if bool((lengths < 1).any()):
        raise ValueError("every sequence needs at least one step")
    steps = int(lengths.max())
    first = sequences[0]
    obs = first.new_zeros((len(sequences), steps) + tuple(first.shape[1:]))
    for i, seq in enumerate(sequences):
        obs[i, : len(seq)] = seq
    feats = None
    if features is not None:
        feats = features[0].new_zeros(len(features), steps, features[0].shape[-1])
        for i, f in enumerate(features):
            if len(f) != len(sequences[i]):
                raise ValueError(f"sequence {i} has {len(sequences[i])} steps but {len(f)} feature rows")
            feats[i, : len(f)] = f
    return ChainBatch(obs=obs, start=torch.zeros_like(lengths), end=lengths, features=feats)


def sampled_batch(sequences: list[torch.Tensor], features: list[torch.Tensor] | None) -> ChainBatch:
    """A batch of sampled sequences for training: with ``features`` (a frozen encoder's) they
    are the guide's input; without, the observations are the trainable reader's input."""
    batch = sequences_to_batch(sequences, features)
    if features is not None:
        return batch
    return batch.with_(reader_input=batch.obs, reader_lengths=batch.end)
