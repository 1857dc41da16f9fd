"""Training streams in the memory tasks' formats: built from the task generators, answers
right, and no test session among them."""

import itertools
import re
from collections import Counter

import pytest

from vmt.memory.task_corpus import (
    TaskCorpusConfig,
    dialogue_stream,
    grocery_stream,
    passkey_stream,
    rps_stream,
    task_training_texts,
)
from vmt.memory.tasks import (
    LETTERS,
    PASSKEY_QUESTION,
    RPS_COUNTER,
    RPS_INTRO,
    dialogue_session,
    grocery_session,
    rps_player_moves,
)

RECALL = "User: What did I ask you to buy at the grocery store?\nAssistant: You asked me to buy"


@pytest.mark.parametrize("rate, recalls", [(0.0, lambda n: 1), (1.0, lambda n: n + 1)])
def test_grocery_stream_is_the_session_with_its_recalls_answered(rate, recalls):
    spec = grocery_session(7, seed=5000)
    text = grocery_stream(7, 5000, rate)
    assert text.startswith(spec.instruction)
    assert text.count(RECALL + f" {spec.item}\n") == recalls(7) == text.count(RECALL)
    assert text.endswith(RECALL + f" {spec.item}\n")
    position = 0
    for q in spec.distractors:  # every distractor, in order, with its right letter
        position = text.index(q.prompt + LETTERS[q.answer] + ")\n", position) + 1


def test_grocery_recalls_between_distractors_follow_the_rate():
    n = [grocery_stream(30, 6000 + s, 0.25).count(RECALL) - 1 for s in range(40)]
    assert 0.18 < sum(n) / (40 * 30) < 0.32


def test_dialogue_stream_answers_every_probe_with_the_stated_value():
    spec = dialogue_session(12, seed=7000)
    text = dialogue_stream(12, 7000, probe_rate=0.3)
    assert text.startswith("".join(spec.opening))
    position = 0
    for turn in spec.small_talk:  # every turn, in order
        position = text.index(turn, position) + len(turn)
    rights = [p.prompt + p.continuations[p.answer] + "\n" for p in spec.probes]
    # the end: every probe once, answered right; between the turns: answered probes only
    assert any(text.endswith("".join(order)) for order in itertools.permutations(rights))
    between = text[len("".join(spec.opening)):len(text) - sum(map(len, rights))]
    for piece in (*spec.small_talk, *rights):
        between = between.replace(piece, "")
    assert between == ""
    for probe in spec.probes:  # the wrong values never follow a probe
        for i, wrong in enumerate(probe.continuations):
            if i != probe.answer:
                assert probe.prompt + wrong not in text


def test_rps_assistant_beats_the_most_frequent_move_so_far():
    text = rps_stream(40, "paper", seed=8000)
    assert text.startswith(RPS_INTRO)
    choices = re.findall(r"I choose \(([ABC])\)", text)
    played = re.findall(r"I played (\w+)\.", text)
    assert len(choices) == 40 and played == rps_player_moves(40, "paper", 8000)[:39]
    moves = {"A": "rock", "B": "paper", "C": "scissors"}
    for k in range(1, 40):
        seen = Counter(played[:k])
        top = max(seen.values())
        assert moves[choices[k]] in {RPS_COUNTER[m] for m, c in seen.items() if c == top}


def test_passkey_stream_states_and_answers_the_key():
    text = passkey_stream(3000, seed=9000)
    key = re.search(r"The pass key is (\d{5})\. Remember it\.", text).group(1)
    assert text.endswith(PASSKEY_QUESTION + f" {key}\n")
    assert 3000 < len(text) < 3400


def test_corpus_sizes_seeds_and_no_test_session():
    from vmt.benchmarks.memory_tasks import FULL, TEST_SEEDS

    config = TaskCorpusConfig(grocery_sessions=40, dialogue_sessions=10, rps_games=3, rps_rounds=5,
                              passkey_trials=2, passkey_chars=(400, 500))
    texts = task_training_texts(config)
    assert len(texts) == 55 and texts == task_training_texts(config)
    assert sum(t.startswith("User: Please remember") for t in texts) == 40
    assert max(TEST_SEEDS.values()) + max(FULL.grocery_sessions, FULL.dialogue_sessions) < config.seed
    for s in range(FULL.grocery_sessions):  # a test session's first questions appear in no stream
        spec = grocery_session(max(FULL.grocery_checkpoints), TEST_SEEDS["grocery"] + s)
        opening = "".join(q.prompt + LETTERS[q.answer] + ")\n" for q in spec.distractors[:3])
        assert not any(opening in t for t in texts)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="seed must be >= 1000"):
        TaskCorpusConfig(seed=200)
    with pytest.raises(ValueError, match="grocery_recall_rates"):
        TaskCorpusConfig(grocery_recall_rates=(0.5, 1.5))
    with pytest.raises(ValueError, match="passkey_chars"):
        TaskCorpusConfig(passkey_chars=(10, 5))
