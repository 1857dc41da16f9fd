from collections import Counter

import pytest

from vmt.memory import StreamingLLM
from vmt.memory.methods import KVMethod, grocery_recall, play_rps
from vmt.memory.tasks import (
    GROCERY_ITEMS,
    grocery_session,
    natural_filler,
    passkey_trial,
    rps_outcome,
    rps_player_moves,
    rps_preferences,
)
from vmt.testing import tiny_llama


def test_rps_player_frequencies_and_seeding():
    moves = rps_player_moves(20000, "paper", seed=3)
    freq = Counter(moves)
    # binomial sd of a frequency with n=20000 is <= 0.0036: 0.015 is > 4 sd
    assert abs(freq["paper"] / 20000 - 0.5) < 0.015
    assert abs(freq["scissors"] / 20000 - 0.3) < 0.015
    assert abs(freq["rock"] / 20000 - 0.2) < 0.015
    assert moves[:50] == rps_player_moves(50, "paper", seed=3)
    assert rps_outcome("paper", "rock") == 1 and rps_outcome("rock", "paper") == -1
    assert rps_outcome("rock", "rock") == 0
    with pytest.raises(ValueError, match="favourite"):
        rps_preferences("lizard")


def test_grocery_session_structure():
    s = grocery_session(5, seed=1)
    assert s.item in GROCERY_ITEMS and s.item in s.instruction
    assert len(s.distractors) == 5
    assert s.recall.options[s.recall.answer] == s.item
    for q in s.distractors:
        assert len(q.options) == 4 and 0 <= q.answer < 4
        if q.prompt.startswith("User: What is"):
            a, b = q.prompt.split("What is ")[1].split("?")[0].split(" + ")
            assert int(q.options[q.answer]) == int(a) + int(b)
    assert grocery_session(5, seed=1) == s


def test_passkey_trial_places_needle_in_natural_text():
    def tokenize(text):  # one token per character: positions are exact
        return [ord(c) for c in text]

    trial = passkey_trial(tokenize, 3000, depth=0.5, seed=2)
    assert len(trial.context) == 3000
    text = "".join(map(chr, trial.context))
    assert text.index(f"The pass key is {trial.key}") - 1 == trial.needle_start
    assert text.endswith("The pass key is")
    assert "".join(map(chr, trial.answer)) == f" {trial.key}"
    filler = natural_filler(5000, seed=2)
    # natural text: no 200-character window repeats inside 5000 characters of filler
    windows = [filler[i : i + 200] for i in range(0, 4800, 50)]
    assert len(set(windows)) == len(windows)
    with pytest.raises(ValueError, match="depth"):
        passkey_trial(tokenize, 3000, depth=1.5, seed=2)


def test_runners_on_tiny_model():
    model = tiny_llama(vocab_size=300)

    def tokenize(text):
        return [ord(c) % 300 for c in text]

    method = KVMethod("streaming", model, StreamingLLM(64, 4), chunk_size=32)
    outcomes = play_rps(method, tokenize, rps_player_moves(10, "rock", seed=0))
    assert len(outcomes) == 10 and set(outcomes) <= {-1, 0, 1}
    res = grocery_recall(method, tokenize, grocery_session(4, seed=0), [0, 2, 4])
    assert set(res) == {0, 2, 4}
    with pytest.raises(ValueError, match="checkpoints"):
        grocery_recall(method, tokenize, grocery_session(4, seed=0), [5])
