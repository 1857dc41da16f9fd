import pytest
import torch
from torch import nn

from vmt.data.corpus import TokenizedCorpus
from vmt.encoders.cache import FeatureCache, plan_windows
from vmt.encoders.features import LMFeatureExtractor
from vmt.testing import tiny_llama

VOCAB = 31


def _corpus(lengths=(23, 5, 12), seed=0, name="toy"):
    g = torch.Generator().manual_seed(seed)
    docs = tuple(torch.randint(0, VOCAB, (n,), generator=g) for n in lengths)
    return TokenizedCorpus(name, docs, VOCAB, "toy-tokenizer")


def _extractor(direction="reverse", layer=-1, seed=0):
    model = tiny_llama(vocab_size=VOCAB, num_layers=2, hidden_size=16, seed=seed)
    return LMFeatureExtractor(model, layer=layer, direction=direction, model_name="tiny")


def _count_rows(extractor):
    rows = []
    extractor.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    return rows


def _assigned_window(k, n, window, overlap, direction):
    """The documented rule, written out directly: (start, end) of the window serving k."""
    half = window // 2
    if direction == "reverse":
        step = half if overlap else window
        start = (k // step) * step
        return start, min(start + window, n)
    if overlap:
        start = max(0, (k // half - 1) * half)
    else:
        start = (k // window) * window
    return start, min(start + window, n)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("n", [1, 3, 8, 9, 17, 40])
def test_plan_windows_follows_the_documented_rule(direction, overlap, n):
    window = 8
    plans = plan_windows(n, window, overlap, direction)
    covered = []
    for p in plans:
        assert 0 <= p.start <= p.lo < p.hi <= p.end <= n and p.end - p.start <= window
        for k in range(p.lo, p.hi):
            covered.append(k)
            start, end = _assigned_window(k, n, window, overlap, direction)
            if direction == "reverse":
                # A reused window ends at the same token, so the reversed reading is identical.
                assert p.end == end and p.start <= start
                assert end - k >= (min(window // 2, n - k) if overlap else 1)
            else:
                assert p.start == start and p.end >= k + 1
    assert covered == list(range(n))


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("overlap", [True, False])
def test_windowed_cache_equals_direct_window_computation(tmp_path, direction, overlap):
    corpus = _corpus()
    ex = _extractor(direction)
    window = 8
    cache = FeatureCache.build(
        ex,
        corpus,
        window=window,
        overlap=overlap,
        dtype=torch.float32,
        batch_size=3,
        root=tmp_path,
        progress=False,
    )
    assert len(cache) == 3 and cache.hidden_size == 16
    model = ex.lm

    def direct(ids):
        # HF's own causal reading: position j of ids[None] has read ids[: j + 1].
        with torch.no_grad():
            return model(ids[None], output_hidden_states=True).hidden_states[-1][0]

    for i, doc in enumerate(corpus.documents):
        feats, ahead = cache[i]
        n = len(doc)
        assert feats.dtype == torch.float32 and feats.shape == (n, 16)
        assert ahead.dtype == torch.int64 and ahead.shape == (n,)
        readings = {}
        for k in range(n):
            start, end = _assigned_window(k, n, window, overlap, direction)
            if (start, end) not in readings:
                ids = doc[start:end].flip(0) if direction == "reverse" else doc[start:end]
                readings[start, end] = direct(ids)
            if direction == "reverse":  # reversed window: tokens end-1 .. k read at end-1-k
                expected, expected_ahead = readings[start, end][end - 1 - k], end - k
            else:
                expected, expected_ahead = readings[start, end][k - start], k - start + 1
            # float32 model; batched vs single-row attention differ only in rounding.
            torch.testing.assert_close(feats[k], expected, atol=1e-5, rtol=1e-5)
            assert int(ahead[k]) == expected_ahead


def test_float16_storage_is_the_float32_features_rounded(tmp_path):
    corpus = _corpus()
    ex = _extractor()
    f32 = FeatureCache.build(
        ex, corpus, window=8, dtype=torch.float32, root=tmp_path, progress=False
    )
    f16 = FeatureCache.build(ex, corpus, window=8, root=tmp_path, progress=False)
    assert f16.directory != f32.directory
    for i in range(len(corpus)):
        a, b = f32[i][0], f16[i][0]
        assert b.dtype == torch.float32
        # float16 keeps 11 significant bits: relative error <= 2^-11 (plus subnormal range).
        torch.testing.assert_close(b, a, rtol=2**-11, atol=1e-7)
        torch.testing.assert_close(f16[i][1], f32[i][1], atol=0, rtol=0)


def test_second_build_computes_nothing_and_open_checks_the_corpus(tmp_path):
    corpus = _corpus()
    ex = _extractor()
    first = FeatureCache.build(ex, corpus, window=8, root=tmp_path, progress=False)
    rows = _count_rows(ex)
    second = FeatureCache.build(ex, corpus, window=8, root=tmp_path, progress=False)
    assert rows == [] and second.directory == first.directory
    reopened = FeatureCache.open(first.directory, corpus)
    assert torch.equal(reopened[2][0], first[2][0]) and torch.equal(reopened[-1][1], first[2][1])
    with pytest.raises(ValueError, match="was built for corpus 'toy'.*not for corpus 'other'"):
        FeatureCache.open(first.directory, _corpus(seed=1, name="other"))
    with pytest.raises(IndexError):
        first[3]
    part = first.slice(0, 5, 11)
    torch.testing.assert_close(part[0], first[0][0][5:11], atol=0, rtol=0)
    torch.testing.assert_close(part[1], first[0][1][5:11], atol=0, rtol=0)
    with pytest.raises(ValueError, match="not inside document 1 of 5 tokens"):
        first.slice(1, 3, 6)
    stored = first.preload()
    assert len(stored) == 3 and stored[2][0].dtype == torch.float16
    torch.testing.assert_close(stored[2][0].float(), first[2][0], atol=0, rtol=0)


def test_deleted_document_is_recomputed_alone(tmp_path):
    corpus = _corpus()
    ex = _extractor()
    cache = FeatureCache.build(ex, corpus, window=8, root=tmp_path, progress=False)
    before = cache[0]
    (cache.directory / "doc000000.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete: 1 of 3 documents missing"):
        FeatureCache.open(cache.directory)
    rows = _count_rows(ex)
    rebuilt = FeatureCache.build(ex, corpus, window=8, batch_size=1, root=tmp_path, progress=False)
    assert sum(rows) == len(plan_windows(23, 8, True, "reverse"))
    assert torch.equal(rebuilt[0][0], before[0]) and torch.equal(rebuilt[0][1], before[1])


class _Interrupt(Exception):
    pass


def test_interrupted_build_resumes_without_recomputing(tmp_path):
    corpus = _corpus((9, 4, 6, 7))
    ex = _extractor()
    calls = []

    def stop_on_fourth_call(_m, _args, _out):
        calls.append(1)
        if len(calls) == 4:
            raise _Interrupt

    handle = ex.register_forward_hook(stop_on_fourth_call)
    with pytest.raises(_Interrupt):
        FeatureCache.build(ex, corpus, window=8, batch_size=1, root=tmp_path, progress=False)
    handle.remove()
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    written = sorted(p.name for p in folder.glob("*.safetensors"))
    # Windows: doc 0 has two (starts 0 and 4; the one at 8 ends at 9 like the one at 4),
    # doc 1 one; the fourth call (doc 2) raised before anything of doc 2 was written.
    assert written == ["doc000000.safetensors", "doc000001.safetensors"]
    assert not list(folder.glob("*.tmp"))
    rows = _count_rows(ex)
    resumed = FeatureCache.build(ex, corpus, window=8, batch_size=1, root=tmp_path, progress=False)
    assert sum(rows) == 2  # one window each for documents 2 and 3
    fresh = FeatureCache.build(
        _extractor(), corpus, window=8, batch_size=4, root=tmp_path / "fresh", progress=False
    )
    for i in range(4):
        # Different batch compositions: float32 rounding before the float16 store.
        torch.testing.assert_close(resumed[i][0], fresh[i][0], rtol=2**-10, atol=1e-6)


def test_cache_key_changes_with_layer_direction_corpus_and_windowing(tmp_path):
    corpus = _corpus((6, 5))

    def folder(ex, c=corpus, window=8, overlap=True):
        return FeatureCache.build(
            ex, c, window=window, overlap=overlap, root=tmp_path, progress=False
        ).directory

    folders = {
        folder(_extractor()),
        folder(_extractor(layer=1)),
        folder(_extractor(direction="forward")),
        folder(_extractor(seed=2)),
        folder(_extractor(), c=_corpus((6, 5), seed=1)),
        folder(_extractor(), window=4),
        folder(_extractor(), overlap=False),
    }
    assert len(folders) == 7
    assert folder(_extractor()) in folders  # same inputs, same folder


class _Poisoned(nn.Module):
    """Wraps an extractor and overwrites the feature where the token equals ``bad_id``."""

    def __init__(self, inner, bad_id, value):
        super().__init__()
        self.inner, self.bad_id, self.value = inner, bad_id, value
        self.direction, self.hidden_size = inner.direction, inner.hidden_size
        self.fingerprint = inner.fingerprint + f"|poisoned={value}"

    def forward(self, tokens, lengths):
        out = self.inner(tokens, lengths).clone()
        out[tokens == self.bad_id] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_name_document_and_position(tmp_path, value):
    docs = (torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8, 9, 7]))
    corpus = TokenizedCorpus("c", docs, VOCAB, "t")
    ex = _Poisoned(_extractor(), bad_id=7, value=value)
    with pytest.raises(ValueError, match="document 1 at position 2"):
        FeatureCache.build(ex, corpus, window=4, root=tmp_path, progress=False)


def test_float16_overflow_is_reported(tmp_path):
    corpus = _corpus((5,))
    ex = _Poisoned(_extractor(), bad_id=int(corpus.documents[0][3]), value=1e6)
    with pytest.raises(ValueError, match="after conversion to torch.float16; use float32"):
        FeatureCache.build(ex, corpus, window=4, root=tmp_path, progress=False)
    ok = FeatureCache.build(
        ex, corpus, window=4, dtype=torch.float32, root=tmp_path, progress=False
    )
    assert ok[0][0].abs().max() == 1e6


def test_trainable_extractors_are_not_cached(tmp_path):
    model = tiny_llama(vocab_size=VOCAB, num_layers=1, hidden_size=16)
    ex = LMFeatureExtractor(model, trainable="full")
    with pytest.raises(ValueError, match="only frozen extractors"):
        FeatureCache.build(ex, _corpus(), root=tmp_path, progress=False)


def test_default_root_is_under_the_vmt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMT_CACHE_DIR", str(tmp_path))
    cache = FeatureCache.build(_extractor(), _corpus((4,)), window=4, progress=False)
    assert cache.directory.parent == tmp_path / "features"
