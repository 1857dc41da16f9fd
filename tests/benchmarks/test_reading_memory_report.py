"""The reading of the SmolLM2 reader's RSS after each chunk of a long read."""

from vmt.benchmarks.reading_memory import _lm_chunks_reading


def record(before_mb, steps_mb):
    kb, rss = [], before_mb * 1024
    for step in steps_mb:
        rss += step * 1024
        kb.append(rss)
    return {"before_kb": before_mb * 1024, "chunk_rss_kb": kb}


def test_shrinking_growth_reads_as_the_allocator_settling():
    text = _lm_chunks_reading(record(1000, [20, 10, 5, 5, 4, 3, 0, 2, 2, 1]))
    assert "rose by +20, +10, +5, +5, +4, +3, +0, +2, +2, +1 MB" in text
    assert "44.0 MB over the first 5 chunks, 8.0 MB over the last 5" in text
    assert "allocator settling" in text


def test_steady_growth_reads_as_something_held():
    text = _lm_chunks_reading(record(1000, [5] * 10))
    assert "does not shrink" in text and "allocator" not in text


def test_too_few_chunks_say_nothing():
    assert _lm_chunks_reading(record(1000, [5, 5])) == ""
    assert _lm_chunks_reading({"before_kb": 1, "peak_kb": 2}) == ""
