"""Memory-mapped corpora: built by streaming, resumable, sampled and trained on under a
memory limit four times smaller than the corpus."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vmt.data.corpus import CharTokenizer, tokenize
from vmt.data.memmap import MemmapCorpus, build_memmap_corpus
from vmt.inference.subsequences import MemmapSampler, SubsequenceSampler

sys.path.insert(0, os.path.dirname(__file__))
from conftest import HERE, PYTHON, worker_env  # noqa: E402

TEXT_A = "one two\nthree\n\nfour five six\n\n\n\nseven\n\nx\n\neight nine"
TEXT_B = "ten eleven\n"


@pytest.fixture
def texts(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT_A)
    b.write_text(TEXT_B)
    return [a, b]


def test_documents_and_fingerprint_match_the_in_memory_corpus(tmp_path, texts):
    tok = CharTokenizer()
    corpus = build_memmap_corpus(texts, tok, tmp_path / "c", progress=False, flush_tokens=3)
    docs = ["one two\nthree", "four five six", "seven", "eight nine", "ten eleven"]  # "x" is too short
    assert [tok.decode(d) for d in corpus.documents] == docs
    ref = tokenize(docs, tok)
    assert corpus.fingerprint == ref.fingerprint
    assert corpus.lengths == ref.lengths and corpus.tokens.dtype == np.uint16
    assert corpus.documents[1].dtype == torch.int64 and len(corpus.documents) == 5
    assert torch.equal(corpus.slice(0, 4, 7), ref.documents[0][4:7])
    # line and file splits
    lines = build_memmap_corpus(texts, tok, tmp_path / "l", split="line", progress=False)
    assert [tok.decode(d) for d in lines.documents] == [
        "one two", "three", "four five six", "seven", "eight nine", "ten eleven"]
    files = build_memmap_corpus(texts, tok, tmp_path / "f", split="file", chunk_chars=5,
                                progress=False, flush_tokens=2)
    assert [tok.decode(d) for d in files.documents] == [TEXT_A, TEXT_B]


def test_lazy_documents_work_with_the_core_sampler(tmp_path, texts):
    corpus = build_memmap_corpus(texts, CharTokenizer(), tmp_path / "c", progress=False)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    core = SubsequenceSampler(corpus.documents, generator=g1).sample(6, 5)
    assert core.obs.dtype == torch.int64 and core.obs.shape == (6, 5)
    mine = MemmapSampler(corpus, generator=g2).sample(6, 5)
    assert mine.obs.shape == (6, 5) and torch.equal(mine.end, torch.full((6,), 5))
    # every sampled row is a contiguous piece of some document
    docs = [d.tolist() for d in corpus.documents]
    for row in mine.obs.tolist():
        assert any(row == d[a : a + 5] for d in docs for a in range(len(d) - 4))


def test_sampler_draws_documents_in_proportion_to_length(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab\n\n" + "c" * 98 + "\n")
    corpus = build_memmap_corpus([path], CharTokenizer(), tmp_path / "c", progress=False)
    docs = corpus.sample_documents(20000, torch.Generator().manual_seed(0))
    share = float((docs == 0).double().mean())
    # binomial(20000, 0.02): sd 0.001, so 5 sd is 0.005
    assert abs(share - 2 / 100) < 0.005


class Boom(Exception):
    pass


class FailingTokenizer(CharTokenizer):
    """Raises on the ``fail_at``-th call (a crash half way through a build)."""

    def __init__(self, fail_at):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def encode(self, text, add_special_tokens=False):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Boom
        return super().encode(text)


def test_interrupted_build_resumes_to_the_same_corpus(tmp_path, texts):
    straight = build_memmap_corpus(texts, CharTokenizer(), tmp_path / "s", progress=False,
                                   flush_tokens=4)
    with pytest.raises(Boom):
        build_memmap_corpus(texts, FailingTokenizer(4), tmp_path / "r", progress=False,
                            flush_tokens=4)
    assert not (tmp_path / "r" / "header.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished build"):
        MemmapCorpus(tmp_path / "r")
    resumed_tok = FailingTokenizer(0)
    resumed = build_memmap_corpus(texts, resumed_tok, tmp_path / "r", progress=False,
                                  flush_tokens=4)
    assert resumed_tok.calls < 6  # it read on from the recorded position, not from the start
    assert resumed.fingerprint == straight.fingerprint
    assert (tmp_path / "r" / "tokens.bin").read_bytes() == (tmp_path / "s" / "tokens.bin").read_bytes()


def test_bad_inputs_are_named(tmp_path, texts):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_memmap_corpus([tmp_path / "nope.txt"], CharTokenizer(), tmp_path / "c")
    with pytest.raises(ValueError, match="split must be"):
        build_memmap_corpus(texts, CharTokenizer(), tmp_path / "c", split="para")
    build_memmap_corpus(texts, CharTokenizer(), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="split differ"):
        build_memmap_corpus(texts, CharTokenizer(), tmp_path / "c", split="line", progress=False)


def write_random_text(folder, files, chars_per_file, seed=0):
    """Random lowercase text: 79-character lines, a blank line after every 25 lines."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
    lines = chars_per_file // 80 // 25 * 25
    for f in range(files):
        body = alphabet[rng.integers(0, 27, size=(lines, 80))]
        body[:, -1] = ord("\n")
        blocks = body.reshape(-1, 25 * 80)
        out = np.concatenate([blocks, np.full((blocks.shape[0], 1), ord("\n"), np.uint8)], axis=1)
        out.tofile(folder / f"part{f}.txt")


@pytest.mark.integration
def test_corpus_four_times_the_memory_limit_builds_samples_and_trains(tmp_path):
    headroom = 16 << 20
    texts = tmp_path / "texts"
    texts.mkdir()
    write_random_text(texts, files=2, chars_per_file=17 << 20)  # 35M characters in all
    done = subprocess.run(
        [PYTHON, str(HERE / "workers.py"), "limited", str(tmp_path), "--texts", str(texts),
         "--headroom", str(headroom)],
        env=worker_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # the token file (uint16) is more than 4x the memory the process may add after start-up
    assert report["token_bytes"] > 4 * headroom
    assert report["ok"] and report["steps"] == 4 and report["batch_shape"] == [8, 32]
    assert report["end_usage"] <= report["limit"]
    # the limit binds: the same corpus as one int64 array does not fit under it
    assert report["in_memory_fails"]
    # peak resident memory grew by less than a quarter of the token file while building,
    # sampling and training (mapped pages are read only where sampled)
    assert report["hwm_end"] - report["hwm_base"] < report["token_bytes"] / 4
