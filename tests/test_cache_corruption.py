"""Corrupt caches are detected, never used, and rebuilt (or refused with a message).

Each store is corrupted three ways — truncated, a region zeroed at the same size, a wrong-length
sidecar — and must refuse on open (sizes, cheap) or on first use (checksums), then come back
equal to the uncorrupted build.
"""

import numpy as np
import pytest
import torch

from vmt.data.corpus import CharTokenizer, TokenizedCorpus
from vmt.data.memmap import MemmapCorpus, build_memmap_corpus
from vmt.encoders.cache import FeatureCache
from vmt.encoders.features import LMFeatureExtractor
from vmt.encoders.sharded_cache import ShardedFeatureCache
from vmt.testing import tiny_llama


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_region(path):
    data = bytearray(path.read_bytes())
    n = len(data)
    data[n - n // 3 : n - 8] = bytes(n // 3 - 8)  # the tail (past any header), same size
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def corpus():
    g = torch.Generator().manual_seed(2)
    docs = tuple(torch.randint(0, 97, (int(n),), generator=g) for n in (9, 30, 14, 5))
    return TokenizedCorpus("toy", docs, 97, "toy")


@pytest.fixture(scope="module")
def extractor():
    return LMFeatureExtractor(tiny_llama(seed=0), layer=1, direction="reverse", model_name="tiny")


def build_cache(extractor, corpus, root):
    return FeatureCache.build(extractor, corpus, window=8, dtype=torch.float32, root=root, progress=False)


def build_sharded(extractor, corpus, folder):
    return ShardedFeatureCache.build(extractor, corpus, folder, window=8, dtype=torch.float32,
                                     shard_tokens=20, progress=False)


# -- per-document feature cache -------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "zero", "sidecar"])
def test_a_corrupt_feature_cache_document_is_refused_then_rebuilt(tmp_path, corpus, extractor, damage, caplog):
    cache = build_cache(extractor, corpus, tmp_path)
    good = [tuple(t.clone() for t in cache[i]) for i in range(len(corpus))]
    doc = cache.directory / "doc000001.safetensors"
    if damage == "truncate":
        truncate(doc)
        with pytest.raises(ValueError, match=r"is incomplete: 1 of 4 documents missing \(first \[1\]\)"):
            FeatureCache.open(cache.directory, corpus)
    elif damage == "zero":
        zero_region(doc)
        opened = FeatureCache.open(cache.directory, corpus)  # sizes agree: found on first use
        assert torch.equal(opened[0][0], good[0][0])
        with pytest.raises(ValueError, match=r"document 1 is corrupt \(its content does not match its checksum\)"):
            opened[1]
    else:
        (cache.directory / "doc000001.sha256").write_text('{"bytes": 12, "sha256": "00"}')
        with pytest.raises(ValueError, match=r"is incomplete: 1 of 4 documents missing"):
            FeatureCache.open(cache.directory, corpus)
    rebuilt = build_cache(extractor, corpus, tmp_path)
    assert "recomputing them" in caplog.text or damage == "zero"
    for i in range(len(corpus)):
        assert torch.equal(rebuilt[i][0], good[i][0]) and torch.equal(rebuilt[i][1], good[i][1])


def test_a_corrupt_feature_cache_meta_is_refused_with_a_message(tmp_path, corpus, extractor):
    cache = build_cache(extractor, corpus, tmp_path)
    (cache.directory / "meta.json").write_text("{ half")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        FeatureCache.open(cache.directory)
    assert build_cache(extractor, corpus, tmp_path)[2][0].shape == (14, cache.hidden_size)


# -- sharded feature cache ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "zero", "ahead-length"])
def test_a_corrupt_shard_is_refused_then_rebuilt(tmp_path, corpus, extractor, damage):
    cache = build_sharded(extractor, corpus, tmp_path / "sh")
    good = [tuple(t.clone() for t in cache[i]) for i in range(len(corpus))]
    feats = tmp_path / "sh" / "shard00001.features.npy"
    if damage == "truncate":
        truncate(feats)
        with pytest.raises(ValueError, match=r"is incomplete: 1 of \d shards missing \(first \[1\]\)"):
            ShardedFeatureCache(tmp_path / "sh", corpus)
    elif damage == "zero":
        zero_region(feats)
        opened = ShardedFeatureCache(tmp_path / "sh", corpus)
        with pytest.raises(ValueError, match=r"shard 1 is corrupt \(shard00001.features.npy does not match"):
            opened[1]
    else:
        np.save(tmp_path / "sh" / "shard00001.ahead.npy", np.ones(3, dtype=np.int64))
        with pytest.raises(ValueError, match=r"is incomplete: 1 of \d shards missing"):
            ShardedFeatureCache(tmp_path / "sh", corpus)
    rebuilt = build_sharded(extractor, corpus, tmp_path / "sh")
    for i in range(len(corpus)):
        assert torch.equal(rebuilt[i][0], good[i][0]) and torch.equal(rebuilt[i][1], good[i][1])


# -- memory-mapped corpus ---------------------------------------------------------------------------
@pytest.fixture
def built(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("\n\n".join(f"document {i} " + "words " * (3 + i) for i in range(6)))
    corpus = build_memmap_corpus([text], CharTokenizer(), tmp_path / "c", progress=False)
    return text, corpus


@pytest.mark.parametrize("damage,match,when", [
    ("truncate-tokens", r"tokens.bin has \d+ bytes, the header says \d+", "open"),
    ("zero-tokens", r"block 0 of tokens.bin does not match its checksum", "use"),
    ("swap-offsets", r"offsets.npy does not match its checksum", "open"),
    ("short-offsets", r"offsets.npy disagrees with header.json", "open"),
])
def test_a_corrupt_memmap_corpus_is_refused_then_rebuilt(tmp_path, built, damage, match, when, caplog):
    text, corpus = built
    good = [d.clone() for d in corpus.documents]
    folder = tmp_path / "c"
    if damage == "truncate-tokens":
        truncate(folder / "tokens.bin")
    elif damage == "zero-tokens":
        zero_region(folder / "tokens.bin")
    else:
        offsets = np.load(folder / "offsets.npy")
        if damage == "swap-offsets":
            offsets[[2, 3]] = offsets[[3, 2]]  # a negative document length
        else:
            offsets = offsets[:-1]
        np.save(folder / "offsets.npy", offsets)
    if when == "open":
        with pytest.raises(ValueError, match=match):
            MemmapCorpus(folder)
    else:
        opened = MemmapCorpus(folder)
        with pytest.raises(ValueError, match=match):
            opened.documents[5]
    again = build_memmap_corpus([text], CharTokenizer(), folder, progress=False)
    assert "is corrupt" in caplog.text and "rebuilding it" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(again.documents, good, strict=True))
    assert again.fingerprint == corpus.fingerprint


def test_a_corpus_built_without_input_hashes_is_rebuilt(tmp_path, built, caplog):
    import json

    text, corpus = built
    header = json.loads((tmp_path / "c" / "header.json").read_text())
    for source in header["sources"]:
        del source["sha256"]  # as the earlier format wrote it
    (tmp_path / "c" / "header.json").write_text(json.dumps(header))
    again = build_memmap_corpus([text], CharTokenizer(), tmp_path / "c", progress=False)
    assert "without content hashes of its inputs; rebuilding it" in caplog.text
    assert "sha256" in again.header["sources"][0] and again.fingerprint == corpus.fingerprint
