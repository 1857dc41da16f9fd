"""Training loops: learning happens, checkpoints resume the same curve, failures lose nothing."""

import math

import pytest
import torch

from vmt.checkpoint import load_checkpoint
from vmt.inference.evaluate import evaluate
from vmt.inference.train import TrainConfig, Trainer, fit

VOCAB = 12


SIZES = dict(vocab=VOCAB, state_dim=4, width=16, hidden=16)  # the small_vmt fixture's sizes


@pytest.mark.integration
@pytest.mark.parametrize("regime", ["subsequence", "windows"])
def test_training_improves_the_heldout_bound(regime, periodic_documents, small_vmt):
    docs = periodic_documents()
    vmt = small_vmt(**SIZES)
    before = evaluate(vmt, docs[:4], window=16, particles=4)
    config = TrainConfig(regime=regime, steps=150, batch_size=8, max_length=16, window=16,
                         budget=256, learning_rate=1e-2, log_every=10, max_skip=4)
    result = fit(vmt, docs[4:], config, progress=False)
    after = evaluate(vmt, docs[:4], window=16, particles=4)
    assert result.ok and result.steps == 150 and len(result.history) == 15
    # Uniform over 12 symbols is log 12 = 2.48 nats; the pattern is ~90% predictable, so a
    # trained model must get well under the untrained one and under uniform.
    assert after.neg_elbo_per_token < before.neg_elbo_per_token - 0.3
    assert after.neg_elbo_per_token < math.log(VOCAB)
    assert after.neg_iwae_per_token <= after.neg_elbo_per_token + 1e-6


@pytest.mark.integration
@pytest.mark.parametrize(("regime", "lr_decay_steps"), [("subsequence", 0), ("windows", 0), ("windows", 20)])
def test_resumed_run_continues_the_same_loss_curve(tmp_path, regime, lr_decay_steps, periodic_documents, small_vmt):
    docs = periodic_documents()
    config = TrainConfig(regime=regime, steps=20, batch_size=4, max_length=8, window=8,
                         budget=64, log_every=1, checkpoint_every=10, max_skip=3, lr_decay_steps=lr_decay_steps)
    torch.manual_seed(1)
    straight = fit(small_vmt(**SIZES), docs, config, progress=False)

    torch.manual_seed(1)
    if lr_decay_steps == 0:
        first = Trainer(small_vmt(**SIZES), docs, TrainConfig(**{**config.__dict__, "steps": 10}),
                        checkpoint_dir=tmp_path / "ck")
        first.fit(progress=False)
    else:  # the same run stopped half way
        first = Trainer(small_vmt(**SIZES), docs, config, checkpoint_dir=tmp_path / "ck")
        for _ in range(10):
            first.train_step(config.annealing(first.step))
        first.save()
    torch.manual_seed(999)  # a different process state: resume must restore what matters
    second = Trainer(small_vmt(**SIZES), docs, config, checkpoint_dir=tmp_path / "ck")
    assert second.resume() and second.step == 10
    resumed = second.fit(progress=False)
    a = [h["loss"] for h in straight.history]
    b = [h["loss"] for h in resumed.history]
    assert len(b) == (20 if lr_decay_steps == 0 else 10)  # stepped by hand: no history before 10
    assert a[-len(b):] == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("regime", ["subsequence", "windows"])
def test_both_launch_modes_take_the_same_steps(regime, float64, periodic_documents, small_vmt):
    # The one loss and step in both launch modes: a single process reseeding per step as a
    # distributed rank does, and the distributed trainer alone (world size 1).
    from vmt.inference.distributed import distributed_fit

    docs = periodic_documents()
    config = TrainConfig(regime=regime, steps=6, batch_size=4, max_length=8, window=8, budget=64,
                         log_every=1, max_skip=3, lr_decay_steps=4, learning_rate=1e-2)
    torch.manual_seed(5)
    alone = small_vmt(**SIZES)
    twin = small_vmt(**SIZES)
    twin.load_state_dict(alone.state_dict())
    start = {k: v.clone() for k, v in alone.state_dict().items()}
    one = Trainer(alone, docs, config, reseed_every_step=True).fit(progress=False)
    torch.manual_seed(123)  # the per-step seeds, not the process state, decide the steps
    ranked = distributed_fit(twin, docs, config, progress=False)
    assert one.ok and ranked.ok and one.steps == ranked.steps == 6
    # float64: only the order of the sums differs (mean/mean against sum/tokens)
    worst = max(float((a - b).abs().max()) for a, b in zip(alone.state_dict().values(),
                                                            twin.state_dict().values()))
    assert worst < 1e-9
    assert [h["loss"] for h in one.history] == pytest.approx([h["loss"] for h in ranked.history], rel=1e-9)
    # and the steps moved the parameters: the comparison is not of two untouched models
    assert max(float((v - start[k]).abs().max()) for k, v in alone.state_dict().items()) > 1e-3


def test_cosine_learning_rate_schedule(periodic_documents, small_vmt):
    config = TrainConfig(steps=100, learning_rate=0.01, lr_decay_steps=100, lr_final_fraction=0.1)
    assert config.learning_rate_at(0) == pytest.approx(0.01)
    assert config.learning_rate_at(50) == pytest.approx(0.0055)  # halfway: the mean of the ends
    assert config.learning_rate_at(100) == pytest.approx(0.001) == config.learning_rate_at(150)
    rates = [config.learning_rate_at(k) for k in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert TrainConfig(learning_rate=0.01).learning_rate_at(77) == 0.01
    # the trainer applies it: the last step ran at the rate of step ``steps - 1``
    trainer = Trainer(small_vmt(**SIZES), periodic_documents(), TrainConfig(
        steps=5, batch_size=4, max_length=8, budget=64, learning_rate=0.01, lr_decay_steps=5))
    trainer.fit(progress=False)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.config.learning_rate_at(4))
    for bad in ({"lr_decay_steps": -1}, {"lr_final_fraction": 0.0}, {"lr_final_fraction": 1.5}):
        with pytest.raises(ValueError, match="lr_"):
            TrainConfig(**bad)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, periodic_documents, small_vmt):
    docs = periodic_documents()
    vmt = small_vmt(**SIZES)
    config = TrainConfig(steps=30, batch_size=4, max_length=8, budget=64, checkpoint_every=5, log_every=1)
    trainer = Trainer(vmt, docs, config, checkpoint_dir=tmp_path / "ck")
    trainer.fit(progress=False)
    good = {k: v.clone() for k, v in vmt.state_dict().items()}
    config2 = TrainConfig(**{**config.__dict__, "steps": 40})
    trainer = Trainer(vmt, docs, config2, checkpoint_dir=tmp_path / "ck")
    trainer.resume()
    with torch.no_grad():
        vmt.emission.net.bias.fill_(float("nan"))
    result = trainer.fit(progress=False)
    assert not result.ok and "non-finite loss" in result.stopped and result.steps == 30
    restored = load_checkpoint(tmp_path / "ck").vmt.state_dict()
    assert all(torch.equal(restored[k], good[k]) for k in good)


def test_interrupt_saves_a_checkpoint(tmp_path, monkeypatch, periodic_documents, small_vmt):
    docs = periodic_documents()
    trainer = Trainer(small_vmt(**SIZES), docs, TrainConfig(steps=50, batch_size=4, max_length=8, budget=64),
                      checkpoint_dir=tmp_path / "ck")
    calls = {"n": 0}
    original = trainer.loss

    def interrupting(annealing):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(annealing)

    monkeypatch.setattr(trainer, "loss", interrupting)
    result = trainer.fit(progress=False)
    assert result.stopped == "interrupted" and result.steps == 6
    assert load_checkpoint(tmp_path / "ck").meta["step"] == 6


# -- devices and dtypes: tensors follow the model (float64 here), never a hard-coded default ---
def test_attach_carried_keeps_the_dtype_and_device_of_the_carried_states(periodic_documents):
    from vmt.inference.windows import DocumentStreams, attach_carried

    docs = periodic_documents(n=3)
    windows = iter(DocumentStreams(docs, 3, 8))
    first = next(windows)
    assert attach_carried(first, {}, 4).x0 is None  # nothing continues yet
    second = next(windows)
    carried = {d: torch.randn(4, dtype=torch.float64) * 1e-3 + 1 / 3 for d in second.documents}
    batch = attach_carried(second, carried, 4)
    assert batch.x0.dtype == torch.float64 and batch.x0.device == carried[0].device
    for r, d in enumerate(second.documents):
        # exact: a float32 buffer would round 1/3 + noise in the 8th digit
        assert torch.equal(batch.x0[r], carried[d])
    with pytest.raises(RuntimeError, match="no state was carried"):
        attach_carried(second, {second.documents[0]: carried[second.documents[0]]}, 4)
    with pytest.raises(ValueError, match=r"carried states must be \(4,\)"):
        attach_carried(second, {d: torch.zeros(3, dtype=torch.float64) for d in carried}, 4)


@pytest.mark.parametrize("streams, window", [(1, 5), (3, 8), (4, 3), (8, 64)])
def test_window_lengths_count_the_windows_of_one_pass_without_reading(streams, window):
    from vmt.inference.windows import DocumentStreams

    lengths = [7, 1, 20, 13, 13, 2, 0, 31, 9]
    docs = [torch.arange(n) for n in lengths]
    walked = DocumentStreams(docs, streams, window)
    read = [w.batch.num_steps for w in walked]
    counted = DocumentStreams([torch.zeros(0)] * len(lengths), streams, window, lengths=lengths).window_lengths()
    assert counted == read
    assert sum(n * w.batch.num_rows for n, w in zip(read, walked, strict=True)) == sum(lengths)
    assert max(counted) <= window


def test_evaluate_carries_float64_states_of_a_float64_model_exactly(monkeypatch, periodic_documents, small_vmt):
    import vmt.inference.evaluate as evaluation

    vmt = small_vmt(**SIZES).double()
    seen = []
    original = evaluation.elbo_terms

    def spy(model, batch, *args, **kwargs):
        terms = original(model, batch, *args, **kwargs)
        seen.append((batch, terms.x.detach().clone()))
        return terms

    monkeypatch.setattr(evaluation, "elbo_terms", spy)
    particles = 3
    result = evaluation.evaluate(vmt, periodic_documents(n=2), window=8, particles=particles,
                                 streams=2)
    assert math.isfinite(result.neg_elbo_per_token) and math.isfinite(result.neg_iwae_per_token)
    assert len(seen) >= 3  # documents of 20-40 tokens in windows of 8: states are carried
    compared = 0
    for (before, x_before), (batch, x) in zip(seen, seen[1:], strict=False):
        assert x.dtype == torch.float64
        assert batch.x0 is not None and batch.x0.dtype == torch.float64
        # every particle continues from its own last state of the previous window, bit for bit
        # (both windows hold the same documents in the same rows while none has ended)
        rows = before.num_rows
        if batch.num_rows == rows:
            assert torch.equal(batch.x0, x_before[:, -1])
            compared += 1
    assert compared >= 2
    # the IWAE bound is at least as tight as the ELBO from the same particles (float64 sums)
    assert result.neg_iwae_per_token <= result.neg_elbo_per_token + 1e-12


def test_windows_training_of_a_float64_model_stays_float64(monkeypatch, periodic_documents, small_vmt):
    import vmt.inference.objective as training  # where the one loss calls elbo_terms

    vmt = small_vmt(**SIZES).double()
    dtypes = []
    original = training.elbo_terms

    def spy(model, batch, *args, **kwargs):
        terms = original(model, batch, *args, **kwargs)
        dtypes.append((None if batch.x0 is None else batch.x0.dtype, terms.x.dtype))
        return terms

    monkeypatch.setattr(training, "elbo_terms", spy)
    config = TrainConfig(regime="windows", steps=4, batch_size=2, window=8, log_every=1)
    result = fit(vmt, periodic_documents(n=2), config, progress=False)
    assert result.ok and all(math.isfinite(h["loss"]) for h in result.history)
    assert dtypes[0][0] is None  # the first window starts every document afresh
    assert all(d == (torch.float64, torch.float64) for d in dtypes[1:])
    assert all(p.dtype == torch.float64 for p in vmt.parameters())
