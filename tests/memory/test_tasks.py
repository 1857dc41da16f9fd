from collections import Counter

import pytest
import torch

from vmt.memory import FullContext, StreamingLLM
from vmt.memory.methods import KVMethod, grocery_recall, play_rps
from vmt.memory.tasks import (
    GROCERY_ITEMS,
    LETTERS,
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


def test_grocery_answer_positions_are_balanced():
    # the right name is at each index equally often (uniform shuffle of the candidates)
    counts = Counter(grocery_session(0, seed=s).recall.answer for s in range(4000))
    # binomial sd of a count with n=4000, p=0.25 is 27.4: 120 is > 4 sd
    assert all(abs(counts[i] - 1000) < 120 for i in range(4)), counts


def test_grocery_session_structure():
    s = grocery_session(5, seed=1)
    assert s.item in GROCERY_ITEMS and s.item in s.instruction
    assert len(s.distractors) == 5
    # the recall is answered by the item name, as a continuation of the assistant's sentence
    assert s.recall.prompt.endswith("\nAssistant: You asked me to buy")
    assert len(s.recall.continuations) == 4 and len(set(s.recall.continuations)) == 4
    assert s.recall.continuations[s.recall.answer] == " " + s.item
    for c in s.recall.continuations:
        assert c.startswith(" ") and c[1:] in GROCERY_ITEMS
    # pure recall: the question names none of the candidates
    assert not any(c[1:] in s.recall.prompt for c in s.recall.continuations)
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
    assert all(isinstance(v, bool) for v in res.values())
    with pytest.raises(ValueError, match="checkpoints"):
        grocery_recall(method, tokenize, grocery_session(4, seed=0), [5])


def test_grocery_recall_matches_an_independent_full_context_oracle():
    model = tiny_llama(vocab_size=256)

    def tokenize(text):
        return list(text.encode())

    spec = grocery_session(3, seed=4)
    res = grocery_recall(KVMethod("full", model, FullContext(), chunk_size=40), tokenize, spec, [1, 3])
    for mark in (1, 3):
        history = spec.instruction + "".join(
            q.prompt + LETTERS[q.answer] + ")\n" for q in spec.distractors[:mark]
        )
        ctx = tokenize(history + spec.recall.prompt)
        scores = []
        for cont in spec.recall.continuations:
            ids = torch.tensor(ctx + tokenize(cont))
            with torch.no_grad():
                lp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            scores.append(float(lp[len(ctx) - 1 : -1].gather(1, ids[len(ctx) :, None]).sum()))
        ranked = sorted(scores)
        # summed log-likelihoods of different names differ far more than float32 error
        assert ranked[-1] - ranked[-2] > 1e-3
        assert res[mark] == (scores.index(ranked[-1]) == spec.recall.answer)


@pytest.mark.lm
def test_smollm2_recalls_the_grocery_item_by_name_with_full_context(smollm2):
    model, tok = smollm2

    def tokenize(text):
        return tok(text, add_special_tokens=False).input_ids

    method = KVMethod("full", model, FullContext(), chunk_size=256)
    # the task must be solvable by this model when nothing is evicted (4 sessions, N = 2)
    results = [grocery_recall(method, tokenize, grocery_session(2, seed=s), [2])[2] for s in range(4)]
    assert all(results), results
