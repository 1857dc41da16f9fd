"""Emphasis: the loss weights the ELBO terms of the positions right after a cue."""

import pytest
import torch

from vmt.inference.train import TrainConfig, Trainer
from vmt.inference.windows import DocumentStreams, emphasis_weights

SIZES = dict(vocab=12, state_dim=4, width=16, hidden=16)


def brute_weights(document, offset, steps, cue, weight):
    """Position ``p`` of the window gets ``weight`` iff the ``len(cue)`` tokens before it are ``cue``."""
    doc, n = document.tolist(), len(cue)
    return [weight if p >= n and doc[p - n: p] == list(cue) else 1.0
            for p in range(offset, offset + steps)]


DOC = torch.tensor([5, 1, 2, 7, 1, 2, 9, 1, 1, 2, 1])


@pytest.mark.parametrize(("offset", "steps", "cue", "expected"), [
    (0, 11, (1, 2), [1, 1, 1, 4, 1, 1, 4, 1, 1, 1, 4]),
    (3, 4, (1, 2), [4, 1, 1, 4]),  # position 3 follows a cue the previous window read
    (0, 3, (1, 2), [1, 1, 1]),  # the cue ends the window: its next position is in the next one
    (4, 2, (1, 2), [1, 1]),
    (0, 11, (1,), [1, 1, 4, 1, 1, 4, 1, 1, 4, 4, 1]),
    (8, 3, (1, 1, 2), [1, 1, 4]),
    (0, 11, (3, 3), [1] * 11),  # no occurrence
])
def test_emphasis_weights_table(offset, steps, cue, expected):
    got = emphasis_weights(DOC, offset, steps, cue, 4.0)
    assert got.tolist() == expected == brute_weights(DOC, offset, steps, cue, 4.0)


def test_emphasis_weights_match_brute_force_on_random_documents():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        doc = torch.randint(0, 3, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen)
        cue = torch.randint(0, 3, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        offset = int(torch.randint(0, len(doc), (1,), generator=gen))
        steps = int(torch.randint(1, len(doc) - offset + 1, (1,), generator=gen))
        assert emphasis_weights(doc, offset, steps, cue, 3.0).tolist() == brute_weights(doc, offset, steps, cue, 3.0)


def test_windows_carry_the_weights_of_their_positions_across_window_edges():
    docs = [DOC, torch.tensor([1, 2, 1, 2, 0])]
    walked = list(DocumentStreams(docs, 2, 3, emphasis=((1, 2), 5.0), ragged=True))
    for w in walked:
        assert w.batch.weight.shape == w.batch.obs.shape
        for r, (d, o) in enumerate(zip(w.documents, w.offsets, strict=True)):
            n = int(w.batch.end[r])
            assert w.batch.weight[r, :n].tolist() == brute_weights(docs[d], o, n, (1, 2), 5.0)
    assert sum(float((w.batch.weight == 5.0).sum()) for w in walked) == 3 + 2
    assert all(w.batch.weight is None for w in DocumentStreams(docs, 2, 3))
    with pytest.raises(ValueError, match="non-empty cue"):
        DocumentStreams(docs, 2, 3, emphasis=((), 5.0))


def test_weighted_elbo_scales_whole_position_terms_and_weight_one_is_the_elbo():
    from vmt.inference.elbo import elbo_terms
    from vmt.inference.objective import svi_loss
    from vmt.models import ChainBatch, VariationalMarkovTransformer, VMTConfig

    token = dict(prior="token", transition="token", emission="token", guide="token")
    vmt = VariationalMarkovTransformer(VMTConfig(
        state_dim=6, token_dim=3, obs_dim=7, feature_dim=5, guide_hidden=8, prior_components=2,
        **token)).double()
    rows, steps = 3, 6
    batch = ChainBatch(obs=torch.randint(0, 7, (rows, steps)), start=torch.tensor([0, 1, 0]),
                       end=torch.tensor([steps, steps, steps - 2]),
                       features=torch.randn(rows, steps, 5, dtype=torch.float64))
    weight = 1 + 4 * (torch.rand(rows, steps) < 0.3).double()
    torch.manual_seed(1)
    terms = elbo_terms(vmt, batch)
    per_position = terms.log_lik + terms.log_latent - terms.log_guide
    assert torch.allclose(terms.elbo_per_row(1.0, weight), (weight * per_position).sum(-1), rtol=1e-12)
    assert torch.allclose(terms.elbo_per_row(1.0, torch.ones(rows, steps)), terms.elbo_per_row(), rtol=1e-12)
    config = TrainConfig(regime="windows", aux_weight=0.0, emphasis=5.0)
    torch.manual_seed(1)
    weighted = svi_loss(vmt, batch.with_(weight=weight), config, 1.0, None)
    torch.manual_seed(1)
    plain = svi_loss(vmt, batch, config, 1.0, None)
    tokens, per_position = terms.mask.sum(), per_position.detach()
    assert float(weighted.loss.detach()) == pytest.approx(float(-(weight * per_position).sum() / tokens), rel=1e-12)
    assert float(plain.loss.detach()) == pytest.approx(float(-per_position.sum() / tokens), rel=1e-12)
    assert float(weighted.elbo_sum) == pytest.approx(float(plain.elbo_sum), rel=1e-12)  # the logged ELBO is not weighted
    with pytest.raises(ValueError, match="weight must be"):
        batch.with_(weight=torch.ones(rows, steps + 1)).validate()


def test_emphasis_settings_are_checked():
    with pytest.raises(ValueError, match="emphasis must be > 0"):
        TrainConfig(regime="windows", emphasis=0.0)
    with pytest.raises(ValueError, match="needs regime 'windows'"):
        TrainConfig(emphasis=2.0)


def test_trainer_weights_the_positions_after_the_cue(tmp_path, periodic_documents, small_vmt):
    docs = periodic_documents(n=4)
    cue = tuple(docs[0][:2].tolist())
    config = TrainConfig(regime="windows", window=8, batch_size=2, steps=3, emphasis=6.0, checkpoint_every=3)
    with pytest.raises(ValueError, match="needs an emphasis_cue"):
        Trainer(small_vmt(**SIZES), docs, config)
    trainer = Trainer(small_vmt(**SIZES), docs, config, checkpoint_dir=tmp_path / "ck", emphasis_cue=cue)
    window = trainer.cursor.next_window()
    expected = [brute_weights(docs[d], o, int(window.batch.end[r]), cue, 6.0)
                for r, (d, o) in enumerate(zip(window.documents, window.offsets, strict=True))]
    assert window.batch.weight.tolist() == expected and any(6.0 in row for row in expected)
    trainer.cursor.restart()
    result = trainer.fit(progress=False)
    assert result.ok and result.steps == 3


def test_a_schedule_gives_emphasis_and_its_cue_together():
    from vmt.experiment import Schedule

    train = {"regime": "windows", "emphasis": 8.0}
    assert Schedule.from_dict({"train": train, "emphasis_cue": "A:"}).emphasis_cue == "A:"
    with pytest.raises(ValueError, match="go together"):
        Schedule.from_dict({"train": train})
    with pytest.raises(ValueError, match="go together"):
        Schedule.from_dict({"train": {"regime": "windows"}, "emphasis_cue": "A:"})


def test_emphasis_cue_ids_are_the_cue_in_the_run_vocabulary_and_must_occur():
    from vmt.data.corpus import CharTokenizer
    from vmt.data.vocab import Vocabulary
    from vmt.experiment import emphasis_cue_ids

    tok = CharTokenizer("abcAQ: ")
    lm_ids = [tok.encode(t) for t in ("Q: a\nA: b", "ab")]
    vocab = Vocabulary(tuple(sorted({i for d in lm_ids for i in d})), tok.vocab_size)
    docs = [vocab.encode(torch.tensor(d)) for d in lm_ids]
    cue = emphasis_cue_ids("A: ", tok, vocab, docs)
    assert vocab.decode(torch.tensor(cue)).tolist() == tok.encode("A: ")
    assert emphasis_cue_ids("", tok, vocab, docs) == ()
    with pytest.raises(ValueError, match="follows the cue"):
        emphasis_cue_ids("ba", tok, vocab, docs)
    with pytest.raises(ValueError, match="outside the run's vocabulary"):
        emphasis_cue_ids("c", tok, vocab, docs)
