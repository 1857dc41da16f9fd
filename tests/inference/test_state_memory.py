"""The long-term state store: cosine recall, fading, eviction, recall sequences read back."""

import math

import pytest
import torch

from vmt.inference.state_memory import MemoryReader, StateMemoryConfig, StateStore


def test_nearest_is_the_highest_cosine_among_old_enough_entries():
    store = StateStore(2, StateMemoryConfig(capacity=4, min_age=10))
    store.store(torch.tensor([1.0, 0.0]), position=0)
    store.store(torch.tensor([0.0, 3.0]), position=5)
    store.store(torch.tensor([1.0, 1.0]), position=20)  # too recent at position 25
    slot, sim = store.nearest(torch.tensor([2.0, 1.0]), position=25)
    # cosines with (2, 1): (1, 0) -> 2/sqrt(5); (0, 3) -> 1/sqrt(5); (1, 1) is not eligible
    assert slot == 0 and sim == pytest.approx(2 / math.sqrt(5), abs=1e-6)
    assert store.nearest(torch.tensor([2.0, 1.0]), position=9) is None


def test_entries_fade_unless_revisited_and_the_weakest_is_replaced():
    store = StateStore(2, StateMemoryConfig(capacity=2, decay=0.5, min_strength=0.2, min_age=0))
    a = store.store(torch.tensor([1.0, 0.0]), 0)
    store.fade(1)
    b = store.store(torch.tensor([0.0, 1.0]), 1)
    assert store.strength[a] == pytest.approx(0.5) and store.strength[b] == 1
    c = store.store(torch.tensor([1.0, 1.0]), 2)  # full: replaces the weakest (a)
    assert c == a and len(store) == 2
    store.revisit(c)
    store.fade(2)  # 1 * 0.25 for both: still >= 0.2
    assert len(store) == 2
    assert store.fade(1) == 2  # 0.125 < 0.2: both forgotten
    assert len(store) == 0


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="decay"):
        StateMemoryConfig(decay=0)
    with pytest.raises(ValueError, match="threshold"):
        StateMemoryConfig(threshold=1.5)
    with pytest.raises(ValueError, match="store_every"):
        StateMemoryConfig(store_every=0)
    with pytest.raises(ValueError, match=r"state must be \(2,\)"):
        StateStore(2).store(torch.zeros(3), 0)


SIZES = dict(vocab=7, state_dim=3, width=4, hidden=8, max_window=32)  # the small_vmt fixture's sizes


def test_reader_stores_recalls_and_reads_the_recall_back(small_vmt):
    vmt = small_vmt(**SIZES)
    # threshold -1: every eligible entry is close enough, so recalls happen as soon as an
    # entry is min_age old; no fading
    config = StateMemoryConfig(capacity=3, store_every=8, threshold=-1.0, recall_length=5,
                               decay=1.0, min_age=16)
    reader = MemoryReader(vmt, config, window=8)
    state = reader.read(torch.randint(0, 7, (40,)))
    assert state.shape == (1, 3)
    assert reader.events.stored == [8, 16, 24, 32, 40]
    # the first entry (stored at 8) becomes eligible at 24: recalls at 24, 32, 40
    assert [r[0] for r in reader.events.recalls] == [24, 32, 40]
    assert reader.events.recall_tokens == 15
    assert len(reader.store) == 3  # capacity
    # a threshold of 1 (identical direction) is never met by these random states
    strict = MemoryReader(vmt, StateMemoryConfig(store_every=8, threshold=1.0, min_age=0), window=8)
    strict.read(torch.randint(0, 7, (40,)))
    assert strict.events.recalls == [] and strict.events.stored == [8, 16, 24, 32, 40]
    with pytest.raises(ValueError, match="empty input"):
        strict.read(torch.zeros(0, dtype=torch.long))


def test_unrevisited_entries_fade_while_reading(small_vmt):
    vmt = small_vmt(**SIZES)
    config = StateMemoryConfig(store_every=10, threshold=1.0, decay=0.9, min_strength=0.3,
                               min_age=0)
    reader = MemoryReader(vmt, config, window=8)
    reader.read(torch.randint(0, 7, (30,)))
    # strength after j chunks of 10 tokens: 0.9**10 = 0.35 (kept), 0.9**20 = 0.12 (gone)
    assert reader.events.forgotten == 1
    assert len(reader.store) == 2


def test_store_and_reads_keep_the_model_dtype(small_vmt):
    vmt = small_vmt(**SIZES).double()
    reader = MemoryReader(vmt, StateMemoryConfig(store_every=8, threshold=-1.0, min_age=8),
                          window=8)
    state = reader.read(torch.randint(0, 7, (24,)))
    # a float32 store would round every stored state; the keys must be the states themselves
    assert state.dtype == torch.float64 and reader.store.keys.dtype == torch.float64
    assert reader.store.keys.device == next(vmt.parameters()).device
    assert bool(reader.store.active.any())
