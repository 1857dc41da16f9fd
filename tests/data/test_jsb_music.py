import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from jsb_format import py2_jsb_pickle, py3_jsb_pickle

from vmt.data.music import (
    JSB_SHA256,
    JSB_SIZES,
    UnsafePickleError,
    load_jsb_chorales,
    music21_chorales,
    roll_to_pitches,
)

SPLITS = {
    "train": [[(60, 64, 67), (62,), ()], [(21, 108), (55, 59)]],
    "valid": [[(70,), (71, 72)]],
    "test": [[(40,)]],
}


def _oracle_roll(seq):
    roll = np.zeros((len(seq), 88), dtype=np.float32)
    for t, chord in enumerate(seq):
        for p in chord:
            roll[t, p - 21] = 1.0
    return roll


@pytest.mark.parametrize("writer", [py2_jsb_pickle, py3_jsb_pickle])
def test_load_jsb_chorales_on_a_synthetic_pickle(tmp_path, writer):
    path = tmp_path / "jsb.pickle"
    path.write_bytes(writer(SPLITS))
    data = load_jsb_chorales(path)
    assert set(data) == {"train", "valid", "test"}
    for split, seqs in SPLITS.items():
        assert len(data[split]) == len(seqs)
        for roll, seq in zip(data[split], seqs, strict=True):
            assert roll.dtype == torch.float32 and roll.shape == (len(seq), 88)
            np.testing.assert_array_equal(roll.numpy(), _oracle_roll(seq))
            assert roll_to_pitches(roll) == [tuple(sorted(c)) for c in seq]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"train": [_Exploit(marker)], "valid": [], "test": []}))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os|nt)\.system"):
        load_jsb_chorales(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"train": [[(np.int64(60), eval)]], "valid": [], "test": []}))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_jsb_chorales(path)


def test_wrong_layout_and_out_of_range_pitch_are_errors(tmp_path):
    path = tmp_path / "bad.pickle"
    path.write_bytes(pickle.dumps({"train": [], "valid": []}))
    with pytest.raises(ValueError, match="expected a dict with keys"):
        load_jsb_chorales(path)
    path.write_bytes(py3_jsb_pickle({"train": [[(20,)]], "valid": [], "test": []}))
    with pytest.raises(ValueError, match="train sequence 0: MIDI pitch 20"):
        load_jsb_chorales(path)


def _chordify_roll(name):
    """Independent quantisation through music21's chordify: pitches of the chord at each beat."""
    from music21 import corpus

    chords = list(corpus.parse(name).chordify().flatten().notesAndRests)
    end = max(float(c.offset + c.quarterLength) for c in chords)
    steps = []
    for t in range(int(np.ceil(end))):
        here = [c for c in chords if float(c.offset) <= t < float(c.offset + c.quarterLength)]
        pitches = set()
        for c in here:
            if c.isChord or c.isNote:
                pitches.update(p.midi for p in c.pitches)
        steps.append(tuple(sorted(pitches)))
    while steps and not steps[0]:
        steps.pop(0)
    while steps and not steps[-1]:
        steps.pop()
    return steps


def test_music21_chorales_small_split_is_deterministic_and_matches_chordify(tmp_path, monkeypatch):
    monkeypatch.setenv("VMT_CACHE_DIR", str(tmp_path))
    data = music21_chorales(split_seed=0, max_pieces=4)
    assert [len(data[s]) for s in ("train", "valid", "test")] == [2, 1, 1]
    for rolls in data.values():
        for roll in rolls:
            assert roll.dtype == torch.float32 and roll.shape[1] == 88 and roll.shape[0] > 8
            assert set(roll.unique().tolist()) <= {0.0, 1.0}
            assert roll.sum(1).max() <= 4  # four-part chorales: at most four voices per beat
    cached = list((tmp_path / "music21_chorales").rglob("*.npz"))
    assert len(cached) == 4
    again = music21_chorales(split_seed=0, max_pieces=4)  # served from the .npz cache
    for s in data:
        assert all(torch.equal(a, b) for a, b in zip(data[s], again[s], strict=True))
    from vmt.data.music import _chorale_names

    name = _chorale_names()[0]
    all_rolls = sorted(sum(data.values(), []), key=lambda r: r.shape[0])
    oracle = _chordify_roll(name)
    matches = [r for r in all_rolls if roll_to_pitches(r) == oracle]
    assert len(matches) == 1


def test_music21_chorales_rejects_too_few_pieces():
    with pytest.raises(ValueError, match="max_pieces must be >= 3"):
        music21_chorales(max_pieces=2)


@pytest.mark.integration
def test_jsb_reference_file_or_music21_rebuild(tmp_path, monkeypatch):
    """With $VMT_JSB_PICKLE: the reference file loads with its known sizes and hash.
    Without it: music21 rolls written in the JSB layout come back unchanged."""
    path = os.environ.get("VMT_JSB_PICKLE")
    if path:
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == JSB_SHA256
        data = load_jsb_chorales(path)
        assert {k: len(v) for k, v in data.items()} == JSB_SIZES
    else:
        monkeypatch.setenv("VMT_CACHE_DIR", str(tmp_path / "cache"))
        source = music21_chorales(max_pieces=6)
        pitches = {k: [roll_to_pitches(r) for r in v] for k, v in source.items()}
        target = tmp_path / "jsb.pickle"
        target.write_bytes(py2_jsb_pickle(pitches))
        data = load_jsb_chorales(target)
        for s in source:
            assert all(torch.equal(a, b) for a, b in zip(source[s], data[s], strict=True))
    for rolls in data.values():
        for roll in rolls:
            assert roll.shape[1] == 88 and set(roll.unique().tolist()) <= {0.0, 1.0}
