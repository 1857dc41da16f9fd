"""The state-memory benchmark's parts: its training documents ask for the key they state, and
its linear probe reads a key that is in the state and only then."""

import re

import pytest
import torch

from vmt.benchmarks.state_memory import KeyDocuments, _mean_interval, linear_probe_accuracy


def test_training_documents_ask_for_the_key_they_state():
    docs = KeyDocuments(seed=0)
    for _ in range(20):
        text = docs.tok.decode(docs.training_document(queries=5, max_gap=30).tolist())
        key = re.match(r"key=(\d);", text).group(1)
        answers = re.findall(r"\?key=(\d)", text)
        assert len(answers) >= 5 and set(answers) == {key}  # filler may hold more, never another key
        assert len(text) <= len("key=0;") + 5 * (30 + len("?key=0"))


def test_the_linear_probe_reads_a_key_that_is_in_the_state_and_only_then():
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 10, (120,), generator=g)
    codes = torch.randn(10, 6, generator=g) * 3
    noise = torch.randn(120, 4, 6, generator=g)
    held = codes[keys][:, None] + noise  # (documents, reads, state): the key plus noise
    assert linear_probe_accuracy(held[:60], keys[:60], held[60:], keys[60:]) >= 0.9
    # the same states with labels unrelated to them: chance (0.1), well below the held case
    other = torch.randint(0, 10, (120,), generator=g)
    assert linear_probe_accuracy(held[:60], other[:60], held[60:], other[60:]) <= 0.35


def test_mean_interval_of_a_constant_is_a_point_and_widens_with_spread():
    assert _mean_interval([0.3] * 5) == pytest.approx((0.3, 0.3, 0.3))
    mean, lo, hi = _mean_interval([0.0, 1.0] * 8)
    assert mean == 0.5 and hi - lo == pytest.approx(2 * 1.96 * (16 / 15) ** 0.5 * 0.5 / 4)
