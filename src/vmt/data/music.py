"""Polyphonic music as piano rolls: the JSB chorales.

A piano roll is a ``(time, 88)`` float32 tensor of 0/1 over the MIDI pitches 21..108 (the
piano keys), one row per quarter note. Two sources:

* :func:`load_jsb_chorales` reads the standard JSB pickle (Boulanger-Lewandowski et al., 2012):
  a dict with keys ``train``/``valid``/``test``, each a list of sequences, each a list of
  tuples of MIDI pitches. The file is read with a restricted unpickler that can only rebuild
  numpy integer scalars and plain containers, so a malicious file cannot run code.
* :func:`music21_chorales` builds the same kind of data from the Bach chorales that ship with
  ``music21`` (needs the ``music`` extra), parsing each piece once and caching its roll.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vmt.atomic import atomic_write
from vmt.paths import cache_dir

logger = logging.getLogger(__name__)

__all__ = [
    "LOWEST_PITCH",
    "NUM_PITCHES",
    "SPLITS",
    "UnsafePickleError",
    "load_jsb_chorales",
    "music21_chorales",
    "pitches_to_roll",
    "roll_to_pitches",
]

LOWEST_PITCH = 21
"""MIDI pitch of the first column of a piano roll (A0)."""
NUM_PITCHES = 88
"""Number of columns of a piano roll (MIDI 21..108)."""
SPLITS = ("train", "valid", "test")

JSB_SHA256 = "69dc4c3e52800959ac0ab3b82aa3e5f55285ce64f1705acb3e3a8ef77a5c051c"
"""sha256 of the reference JSB pickle (229/76/77 sequences)."""
JSB_SIZES = {"train": 229, "valid": 76, "test": 77}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that the restricted loader does not allow."""


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only numpy scalars/dtypes and builtin containers."""

    _BUILTINS = frozenset({"list", "tuple", "dict", "set", "frozenset"})
    _SCALAR_MODULES = frozenset({"numpy.core.multiarray", "numpy._core.multiarray"})

    def find_class(self, module: str, name: str) -> Any:
        if module in self._SCALAR_MODULES and name == "scalar":
            return _numpy_scalar()
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            return getattr(builtins, name)
        raise UnsafePickleError(
            f"refusing to load global {module}.{name}: this file is not a plain JSB-format "
            "pickle (only numpy scalars, numpy dtypes and builtin containers are allowed)"
        )


def _safe_load(data: bytes) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def pitches_to_roll(sequence: Sequence[Sequence[int]]) -> torch.Tensor:
    """Turn a sequence of chords (tuples of MIDI pitches) into a ``(time, 88)`` piano roll.

    Raises:
        ValueError: if a pitch is not an integer or outside 21..108, or the sequence is empty.
    """
    if len(sequence) == 0:
        raise ValueError("cannot make a piano roll from an empty sequence")
    roll = torch.zeros(len(sequence), NUM_PITCHES, dtype=torch.float32)
    for t, chord in enumerate(sequence):
        for pitch in chord:
            if isinstance(pitch, str | bytes | bool) or not isinstance(pitch, int | float | np.number):
                raise ValueError(f"MIDI pitch {pitch!r} at step {t} is not a number")
            p = int(pitch)
            if p != pitch:
                raise ValueError(f"MIDI pitch {pitch!r} at step {t} is not an integer")
            if not LOWEST_PITCH <= p < LOWEST_PITCH + NUM_PITCHES:
                raise ValueError(
                    f"MIDI pitch {p} at step {t} is outside "
                    f"{LOWEST_PITCH}..{LOWEST_PITCH + NUM_PITCHES - 1}"
                )
            roll[t, p - LOWEST_PITCH] = 1.0
    return roll


def roll_to_pitches(roll: torch.Tensor) -> list[tuple[int, ...]]:
    """Inverse of :func:`pitches_to_roll`: the sorted MIDI pitches sounding at each step."""
    if roll.dim() != 2 or roll.shape[1] != NUM_PITCHES:
        raise ValueError(f"roll must be (time, {NUM_PITCHES}), got {tuple(roll.shape)}")
    return [
        tuple(int(i) + LOWEST_PITCH for i in torch.nonzero(row > 0.5).flatten().tolist())
        for row in roll
    ]


def load_jsb_chorales(path: str | Path) -> dict[str, list[torch.Tensor]]:
    """Load a JSB-format pickle as piano rolls.

    Args:
        path: the pickle (a dict with keys ``train``, ``valid``, ``test``; each a list of
            sequences of tuples of MIDI pitches, as numpy integers or ints).

    Returns:
        ``{"train": [...], "valid": [...], "test": [...]}``, each a list of ``(time, 88)``
        float32 piano rolls over MIDI pitches 21..108.

    Raises:
        UnsafePickleError: if the file references anything but numpy scalars/dtypes and
            builtin containers (the file is never allowed to run code).
        ValueError: if the content does not have the JSB layout.
    """
    path = Path(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        raw = _safe_load(data)
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, MemoryError) as err:
        raise ValueError(f"{path} is not a JSB-format pickle ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict) or not all(k in raw for k in SPLITS):
        keys = sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path.name}: expected a dict with keys {SPLITS}, got {keys}")
    out: dict[str, list[torch.Tensor]] = {}
    for split in SPLITS:
        sequences = raw[split]
        if not isinstance(sequences, list | tuple):
            raise ValueError(f"{path.name}: split {split!r} is a {type(sequences).__name__}")
        rolls = []
        for i, seq in enumerate(sequences):
            try:
                rolls.append(pitches_to_roll(seq))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path.name}: {split} sequence {i}: {err}") from err
        out[split] = rolls
    sizes = {k: len(v) for k, v in out.items()}
    if digest == JSB_SHA256:
        logger.info("loaded the reference JSB chorales %s", sizes)
    else:
        logger.info("loaded a JSB-format pickle (not the reference file) %s", sizes)
    return out


# ----------------------------------------------------------------------------- music21

_ROLL_FORMAT = "quarter-v1"  # bump when the quantisation below changes


def _score_to_roll(score: Any) -> np.ndarray:
    """Quantise a music21 score to quarter notes: ``(time, 88)`` uint8.

    Step ``t`` holds every pitch sounding at offset ``t`` (in quarter lengths from the start
    of the score), i.e. with onset <= t < onset + duration. Shorter notes between beats
    (passing tones) are dropped, as in the classic JSB data.
    """
    notes = [n for n in score.flatten().notes if float(n.quarterLength) > 0]
    end = max(float(n.offset) + float(n.quarterLength) for n in notes)
    steps = int(np.ceil(end - 1e-9))
    roll = np.zeros((steps, NUM_PITCHES), dtype=np.uint8)
    for n in notes:
        start = float(n.offset)
        stop = start + float(n.quarterLength)
        first, last = int(np.ceil(start - 1e-9)), int(np.ceil(stop - 1e-9))
        for p in n.pitches:
            col = int(p.midi) - LOWEST_PITCH
            if 0 <= col < NUM_PITCHES and first < last:
                roll[first:last, col] = 1
    # Leading/trailing silent steps carry no information (rests in a pickup bar).
    active = np.flatnonzero(roll.any(axis=1))
    return roll[active[0] : active[-1] + 1]


def _chorale_names() -> list[str]:
    from music21 import corpus

    names = sorted({str(name) for name in corpus.chorales.Iterator(returnType="filename")})
    if not names:
        raise RuntimeError("music21 lists no Bach chorales; is its corpus installed?")
    return names


def _atomic_save_npz(target: Path, **arrays: np.ndarray) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as fh:
        np.savez_compressed(fh, **arrays)


def _chorale_roll(name: str, folder: Path) -> np.ndarray:
    target = folder / (name.replace("/", "__") + ".npz")
    if target.is_file():
        with np.load(target) as npz:
            return npz["roll"]
    from music21 import corpus

    roll = _score_to_roll(corpus.parse(name))
    _atomic_save_npz(target, roll=roll)
    return roll


def music21_chorales(
    split_seed: int = 0,
    max_pieces: int | None = None,
    valid_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> dict[str, list[torch.Tensor]]:
    """The Bach chorales of ``music21`` as quarter-note piano rolls, split by piece.

    The pieces are those of ``music21.corpus.chorales.Iterator`` (the 371 four-part chorales)
    sorted by name; ``max_pieces`` keeps the first ones (before splitting) to keep tests
    small. Each parsed roll is cached as ``.npz`` under ``vmt.paths.cache_dir()``, since
    parsing takes a fraction of a second per piece.

    Args:
        split_seed: seed of the permutation that assigns pieces to splits.
        max_pieces: use only the first ``max_pieces`` pieces (at least 3).
        valid_fraction: share of pieces in ``valid`` (at least one piece).
        test_fraction: share of pieces in ``test`` (at least one piece).

    Returns:
        ``{"train", "valid", "test"}`` lists of ``(time, 88)`` float32 rolls (MIDI 21..108).
    """
    try:
        import music21  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "music21_chorales needs music21: pip install 'variational-markov-transformer[music]'"
        ) from err
    names = _chorale_names()
    if max_pieces is not None:
        if max_pieces < 3:
            raise ValueError(f"max_pieces must be >= 3 (one per split), got {max_pieces}")
        names = names[:max_pieces]
    for label, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < f < 1.0:
            raise ValueError(f"{label} must be in (0, 1), got {f}")
    n = len(names)
    n_valid = max(1, round(valid_fraction * n))
    n_test = max(1, round(test_fraction * n))
    n_train = n - n_valid - n_test
    if n_train < 1:
        raise ValueError(f"{n} pieces cannot fill train/valid/test with these fractions")

    from tqdm import tqdm

    folder = cache_dir() / "music21_chorales" / _ROLL_FORMAT
    rolls = {}
    for name in tqdm(names, desc="music21 chorales", unit="piece", leave=False):
        rolls[name] = torch.from_numpy(_chorale_roll(name, folder).astype(np.float32))
    perm = np.random.default_rng(split_seed).permutation(n)
    parts = (perm[:n_train], perm[n_train : n_train + n_valid], perm[n_train + n_valid :])
    return {
        split: [rolls[names[i]] for i in sorted(idx.tolist())]
        for split, idx in zip(SPLITS, parts, strict=True)
    }
