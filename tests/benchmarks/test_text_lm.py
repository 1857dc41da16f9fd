"""``vmt bench text-lm``: the bootstrap over documents, the baseline rows on a toy corpus, and
the whole quick path on a tiny split of real text."""

import json
import math

import numpy as np
import pytest
import torch

from vmt.benchmarks import text_lm


def toy_split(vocab=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).reciprocal()

    def doc():
        return torch.multinomial(weights, int(torch.randint(30, 80, (1,), generator=g)), True, generator=g)

    return [doc() for _ in range(12)], [doc() for _ in range(5)]


def test_ratio_interval_resamples_documents_and_differences_are_paired():
    nll = np.array([10.0, 40.0, 5.0, 20.0])
    tokens = np.array([10.0, 10.0, 5.0, 10.0])
    draws = text_lm.bootstrap_indices(4, draws=4000)
    lo, hi = text_lm.ratio_interval(nll, tokens, draws)
    point = nll.sum() / tokens.sum()
    assert 1.0 <= lo < point < hi <= 4.0
    a = text_lm.Row("a", "a", nll, tokens)
    b = text_lm.Row("b", "b", nll - tokens * 0.5, tokens)  # exactly 0.5 nats/token better
    d, dlo, dhi = text_lm.difference_interval(a, b, draws)
    assert d == pytest.approx(0.5) and dlo == pytest.approx(0.5) and dhi == pytest.approx(0.5)


def test_baseline_rows_on_a_toy_corpus():
    train, test = toy_split()
    rows = text_lm.ngram_rows(train, test, 100)  # ids 60..99 never occur
    per = {r.key: r.per_token for r in rows}
    assert set(per) == {"unigram", "kn2", "kn3"}
    # a skewed memoryless source: every model is near its entropy, well under uniform over 100
    assert all(v < math.log(60) for v in per.values())
    gru = text_lm.gru_row(train, test, 100, parameters=3000, cpu_seconds=0.5, vocab_max_size=50)
    assert gru.extra["params"] <= 3000 and gru.extra["steps"] >= 1
    assert np.all(np.isfinite(gru.nll)) and list(gru.tokens) == [len(d) for d in test]
    # 50 kept ids: ids merged into <unk> pay log(#merged) nats each
    assert gru.per_token > per["unigram"] - 1.0


@pytest.mark.lm
@pytest.mark.integration
def test_the_quick_path_on_a_tiny_split(tmp_path):
    from vmt.data.corpus import pydoc_texts

    model = tmp_path / "tiny.json"
    model.write_text(json.dumps({
        "encoder": {"kind": "lm", "layer": 2, "window": 32}, "vocab_max_size": 300,
        "vmt": {"state_dim": 4, "prior_components": 2, "transition_hidden": 16, "guide_hidden": 16},
    }))
    schedule = tmp_path / "tiny-schedule.json"
    schedule.write_text(json.dumps({
        "max_train_tokens": 400, "eval_window": 32, "eval_particles": 2,
        "train": {"steps": 3, "batch_size": 2, "max_length": 8, "budget": 64, "log_every": 1},
    }))
    settings = text_lm.Settings(train_tokens=3000, test_tokens=150, window=32, vmt_particles=2,
                                presets=((str(model), str(schedule)),))
    texts = pydoc_texts()[:12]
    rows, info = text_lm.measure(settings, texts, "user-text", tmp_path / "runs")
    keys = [r.key for r in rows]
    assert keys[:3] == ["unigram", "kn2", "kn3"] and keys[-1].startswith("vmt")
    assert "gru" in keys and "gru_dropout" in keys and "gru_distilled" not in keys  # no distillation
    assert info["test_tokens"] == 150 and info["vocab_size"] == 49_152
    for r in rows:  # every row scores the same documents, every token
        assert r.tokens.sum() == 150 and np.all(np.isfinite(r.nll))
    vmt = rows[-1]
    assert vmt.extra["reconstruction"] + vmt.extra["kl"] + vmt.extra["oov"] == pytest.approx(
        vmt.extra["neg_elbo"], rel=1e-9)
    assert vmt.per_token <= vmt.extra["neg_elbo"] + 1e-9
    result = text_lm.summarise(rows, info, settings, True, tmp_path)
    assert result.metrics["nats_per_token_kn3"] == pytest.approx(rows[2].per_token)
    assert result.metrics["nats_per_token_kn3_ci_low"] <= rows[2].per_token
    assert "best_vmt_minus_gru" in result.metrics and "| model |" in result.markdown
    assert (tmp_path / "text_lm.png").stat().st_size > 0
