import random
import re
from collections import Counter

import pytest
import torch

from vmt.memory import FullContext, SirLLM, StreamingLLM
from vmt.memory.methods import KVMethod, dialogue_selection
from vmt.memory.tasks import (
    DIALOGUE_FACTS,
    DIALOGUE_TOPIC_WORDS,
    dialogue_session,
    small_talk_turns,
)
from vmt.testing import tiny_llama

FACTS = {f.name: f for f in DIALOGUE_FACTS}


def test_dialogue_session_is_a_pure_function_of_its_arguments():
    a = dialogue_session(30, seed=5)
    assert a == dialogue_session(30, seed=5)
    assert a != dialogue_session(30, seed=6)
    # a longer session shares facts, probes and its first turns (one stream, many N)
    longer = dialogue_session(45, seed=5)
    assert (longer.facts, longer.opening, longer.probes) == (a.facts, a.opening, a.probes)
    assert longer.small_talk[:30] == a.small_talk
    assert len(a.opening) == len(DIALOGUE_FACTS) and len(a.small_talk) == 30


@pytest.mark.parametrize("seed", range(20))
def test_exactly_one_candidate_agrees_with_the_stated_fact(seed):
    s = dialogue_session(10, seed=seed, n_candidates=4)
    assert sorted(name for name, _ in s.facts) == sorted(FACTS)
    for (name, value), turn, probe in zip(s.facts, s.opening, s.probes, strict=True):
        fact = FACTS[name]
        assert fact.statement.format(v=value) in turn
        assert value in fact.values
        assert probe.prompt == f"User: {fact.probe}\nAssistant:"
        assert len(probe.continuations) == 4 and len(set(probe.continuations)) == 4
        # every candidate is the response template filled with a value of the same list
        pattern = "^" + re.escape(fact.response).replace(re.escape("{v}"), "(.+)") + "$"
        filled = [re.match(pattern, c).group(1) for c in probe.continuations]
        assert all(v in fact.values for v in filled)
        consistent = [i for i, v in enumerate(filled) if v == value]
        assert consistent == [probe.answer]
        # the probe alludes to the fact without naming any value
        assert not any(v in probe.prompt for v in fact.values)


def test_small_talk_never_mentions_the_facts_and_never_repeats_a_sentence():
    s = dialogue_session(150, seed=3)
    text = "".join(s.small_talk)
    words = set(re.findall(r"[a-z]+", text.lower()))
    for fact in DIALOGUE_FACTS:
        for value in fact.values:
            assert value.lower() not in text.lower(), value
    assert not words & set(DIALOGUE_TOPIC_WORDS)
    sentences = [line.split(": ", 1)[1] for line in text.splitlines()]
    assert len(sentences) == 300
    assert len(set(sentences)) == len(sentences)
    for turn in s.small_talk:
        assert re.fullmatch(r"User: [^\n]+\nAssistant: [^\n]+\n", turn)


def test_answer_positions_and_values_are_balanced():
    answers = Counter()
    values = Counter()
    for seed in range(2000):
        s = dialogue_session(0, seed=seed)
        answers.update(p.answer for p in s.probes)
        values.update(v for name, v in s.facts if name == "dog")
    # 8000 answers, p=0.25: binomial sd 38.7, so 160 is > 4 sd
    assert all(abs(answers[i] - 2000) < 160 for i in range(4)), answers
    # 2000 dog names over 10 values, p=0.1: sd 13.4, so 60 is > 4 sd
    assert all(abs(values[v] - 200) < 60 for v in FACTS["dog"].values), values


def test_dialogue_bad_arguments():
    with pytest.raises(ValueError, match="n_turns"):
        dialogue_session(-1, seed=0)
    with pytest.raises(ValueError, match="n_candidates"):
        dialogue_session(3, seed=0, n_candidates=11)
    with pytest.raises(ValueError, match="n_turns"):
        small_talk_turns(10_000, random.Random(0))


def _byte_tokenize(text):
    return list(text.encode())


def test_dialogue_runner_on_tiny_model_matches_a_fresh_stream_per_checkpoint():
    model = tiny_llama(vocab_size=256)
    spec = dialogue_session(2, seed=1)
    method = KVMethod("full", model, FullContext(), chunk_size=64)
    res = dialogue_selection(method, _byte_tokenize, spec, [0, 2])
    assert set(res) == {0, 2} and all(len(v) == len(spec.probes) for v in res.values())
    # oracle: an independent full-context pass over prompt + each candidate, scored by the
    # summed log-likelihood of the candidate tokens in float64
    history = "".join(spec.opening + spec.small_talk)
    for i, probe in enumerate(spec.probes):
        scores = []
        for cand in probe.continuations:
            ctx = _byte_tokenize(history + probe.prompt)
            ids = torch.tensor(ctx + _byte_tokenize(cand))
            with torch.no_grad():
                lp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            n = len(ctx)
            scores.append(float(lp[n - 1 : -1].gather(1, ids[n:, None]).sum()))
        best = max(range(len(scores)), key=scores.__getitem__)
        # the candidates differ in a word, so score gaps are far above float32 error (checked)
        gaps = sorted(scores)
        assert gaps[-1] - gaps[-2] > 1e-3
        assert res[2][i] == (best == probe.answer)


def test_dialogue_runner_bounded_budget_and_checkpoints():
    model = tiny_llama(vocab_size=256)
    spec = dialogue_session(6, seed=2)
    for policy in (StreamingLLM(128, 4), SirLLM(128, 4, decay=1.0)):
        method = KVMethod("bounded", model, policy, chunk_size=32)
        res = dialogue_selection(method, _byte_tokenize, spec, [6, 0, 2])
        assert list(res) == [0, 2, 6]
        assert all(isinstance(b, bool) for v in res.values() for b in v)
    with pytest.raises(ValueError, match="checkpoints"):
        dialogue_selection(method, _byte_tokenize, spec, [7])
