"""Sharded feature cache: same lookups as FeatureCache, resumable after an interruption."""

import pytest
import torch

from vmt.data.corpus import TokenizedCorpus
from vmt.encoders.cache import FeatureCache
from vmt.encoders.features import LMFeatureExtractor
from vmt.encoders.sharded_cache import ShardedFeatureCache, shard_table
from vmt.testing import tiny_llama


class Counting(torch.nn.Module):
    """Wraps an extractor and counts the windows it encodes."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.windows = 0
        for name in ("fingerprint", "hidden_size", "direction", "trainable"):
            setattr(self, name, getattr(inner, name))

    def forward(self, tokens, lengths):
        self.windows += tokens.shape[0]
        return self.inner(tokens, lengths)


@pytest.fixture(scope="module")
def corpus():
    g = torch.Generator().manual_seed(1)
    docs = tuple(torch.randint(0, 97, (int(n),), generator=g) for n in (5, 40, 17, 3, 26, 9, 33))
    return TokenizedCorpus("toy", docs, 97, "toy")


def extractor(direction="reverse"):
    return LMFeatureExtractor(tiny_llama(seed=0), layer=1, direction=direction, model_name="tiny")


def test_shard_table_covers_every_document_once():
    table = shard_table([5, 40, 17, 3, 26], 30)
    assert table == [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert shard_table([1, 1, 1], 100) == [(0, 3)]


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_lookups_equal_the_per_document_cache(tmp_path, corpus, direction):
    ext = extractor(direction)
    ref = FeatureCache.build(ext, corpus, window=8, overlap=True, dtype=torch.float32,
                             root=tmp_path / "ref", progress=False)
    sharded = ShardedFeatureCache.build(ext, corpus, tmp_path / "sh", window=8, overlap=True,
                                        dtype=torch.float32, shard_tokens=30, progress=False)
    assert sharded.num_shards == 6 and len(sharded) == len(corpus)
    for i in range(len(corpus)):
        f, a = sharded[i]
        rf, ra = ref[i]
        assert f.dtype == torch.float32 and a.dtype == torch.int64
        assert torch.equal(a, ra)
        # float32 features of the same windows; batches of different padding may reorder sums
        torch.testing.assert_close(f, rf, rtol=1e-5, atol=1e-5)
    sf, sa = sharded.slice(1, 10, 20)
    assert torch.equal(sf, sharded[1][0][10:20]) and torch.equal(sa, sharded[1][1][10:20])


def test_interrupted_build_resumes_to_the_uninterrupted_result(tmp_path, corpus):
    ext = Counting(extractor())
    full = ShardedFeatureCache.build(ext, corpus, tmp_path / "full", window=8, dtype=torch.float16,
                                     shard_tokens=30, progress=False)
    full_windows = ext.windows

    def crash(shard):
        if shard == 1:
            raise KeyboardInterrupt("stopped half way")

    ext.windows = 0
    with pytest.raises(KeyboardInterrupt):
        ShardedFeatureCache.build(ext, corpus, tmp_path / "part", window=8, dtype=torch.float16,
                                  shard_tokens=30, progress=False, on_shard=crash)
    with pytest.raises(ValueError, match="incomplete: 4 of 6 shards missing"):
        ShardedFeatureCache(tmp_path / "part")
    ext.windows = 0
    resumed = ShardedFeatureCache.build(ext, corpus, tmp_path / "part", window=8,
                                        dtype=torch.float16, shard_tokens=30, progress=False)
    assert 0 < ext.windows < full_windows  # only the four missing shards were computed
    for i in range(len(corpus)):
        assert torch.equal(resumed[i][0], full[i][0]) and torch.equal(resumed[i][1], full[i][1])


def test_rebuild_with_other_settings_is_refused(tmp_path, corpus):
    ext = extractor()
    ShardedFeatureCache.build(ext, corpus, tmp_path / "c", window=8, shard_tokens=30, progress=False)
    with pytest.raises(ValueError, match="window"):
        ShardedFeatureCache.build(ext, corpus, tmp_path / "c", window=16, shard_tokens=30,
                                  progress=False)
    with pytest.raises(ValueError, match="torch.float16 or torch.float32"):
        ShardedFeatureCache.build(ext, corpus, tmp_path / "d", dtype=torch.bfloat16, progress=False)


def test_bf16_autocast_encoder_stays_close_to_float32(tmp_path, corpus):
    ext = extractor()
    exact = ShardedFeatureCache.build(ext, corpus, tmp_path / "f32", window=8, dtype=torch.float32,
                                      shard_tokens=30, autocast=False, progress=False)
    bf16 = ShardedFeatureCache.build(ext, corpus, tmp_path / "bf16", window=8,
                                     dtype=torch.float32, shard_tokens=30, autocast=True,
                                     progress=False)
    f, g = exact[1][0], bf16[1][0]
    assert g.dtype == torch.float32  # stored and returned as float32 whatever the autocast
    assert not torch.equal(f, g)  # the bf16 path really ran
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.004) through two small blocks
    assert float((f - g).abs().max()) < 0.1 * float(f.abs().max())


def test_training_on_a_memmap_corpus_with_sharded_features(tmp_path):
    from vmt.data.corpus import CharTokenizer
    from vmt.data.memmap import build_memmap_corpus
    from vmt.inference.distributed import DistributedTrainer
    from vmt.inference.train import TrainConfig
    from vmt.models import VariationalMarkovTransformer, VMTConfig

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join("abcd" * (3 + i) for i in range(6)))
    tok = CharTokenizer()
    corpus = build_memmap_corpus([text], tok, tmp_path / "c", progress=False)
    ext = LMFeatureExtractor(tiny_llama(vocab_size=tok.vocab_size), layer=1, model_name="tiny")
    cache = ShardedFeatureCache.build(ext, corpus, tmp_path / "f", window=8, dtype=torch.float32,
                                      shard_tokens=20, progress=False)
    vmt = VariationalMarkovTransformer(VMTConfig(state_dim=3, obs_dim=tok.vocab_size,
                                                 feature_dim=32, guide_hidden=8,
                                                 transition_hidden=8, max_window=64))
    config = TrainConfig(steps=3, batch_size=2, max_length=6, budget=24, log_every=1)
    trainer = DistributedTrainer(vmt, corpus, config, features=cache)
    batch = trainer.sampler.sample(4, 6)
    for r in range(4):  # every row's features are the cached ones of the same tokens
        row = batch.obs[r, : int(batch.end[r])].tolist()
        hits = [(d, a) for d in range(len(corpus)) for a in range(len(corpus.documents[d]) - 5)
                if corpus.documents[d][a : a + 6].tolist() == row]
        assert any(torch.equal(batch.features[r], cache.slice(d, a, a + 6)[0]) for d, a in hits)
    result = trainer.fit(progress=False)
    assert result.ok and result.steps == 3


@pytest.mark.integration
def test_killed_cache_build_resumes_to_the_uninterrupted_result(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import HERE, PYTHON, worker_env
    from workers import toy_corpus

    # the uninterrupted build runs in the same kind of process (thread count affects floats)
    first = subprocess.run([PYTHON, str(HERE / "workers.py"), "cache", str(tmp_path / "straight")],
                           env=worker_env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    straight = ShardedFeatureCache(tmp_path / "straight", toy_corpus())
    out = tmp_path / "killed"
    args = [PYTHON, str(HERE / "workers.py"), "cache", str(out)]
    proc = subprocess.Popen(args + ["--pause", "0.3"], env=worker_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("*.ahead.npy"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the build was not killed half way"
    done_before = len(list(out.glob("*.ahead.npy")))
    assert 3 <= done_before < straight.num_shards
    done = subprocess.run(args, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = ShardedFeatureCache(out, toy_corpus())
    assert not list(out.glob("*.tmp"))
    for i in range(len(resumed)):
        # same shards, same batches, same extractor: bitwise equal
        assert torch.equal(resumed[i][0], straight[i][0]) and torch.equal(resumed[i][1], straight[i][1])
