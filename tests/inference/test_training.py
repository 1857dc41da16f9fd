"""Training loops: learning happens, checkpoints resume the same curve, failures lose nothing."""

import dataclasses
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


def _without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("tokens_per_second", "seconds", "cpu_seconds")}
            for h in history]


def _max_gap(a, b) -> float:
    """The largest absolute difference between the parameters of two models."""
    theirs = b.state_dict()
    return max(float((v - theirs[k]).abs().max()) for k, v in a.state_dict().items())


@pytest.fixture
def gloo_group(tmp_path, monkeypatch):
    """A gloo process group of world size 1 in this process (as ``torchrun --nproc_per_node 1``
    would give), destroyed afterwards."""
    import torch.distributed as dist

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


@pytest.mark.parametrize("regime", ["subsequence", "windows"])
def test_both_launch_modes_give_the_same_parameters(regime, float64, periodic_documents, small_vmt,
                                                     gloo_group, monkeypatch):
    # The one trainer launched twice: in this process (Trainer, no process group) and by the
    # distributed launcher on a gloo group of one rank (DDP around the loss, all-reduces).
    from vmt.inference.distributed import distributed_fit

    docs = periodic_documents()
    config = TrainConfig(regime=regime, steps=6, batch_size=4, max_length=8, window=8, budget=64,
                         log_every=1, max_skip=3, lr_decay_steps=4, learning_rate=1e-2)
    torch.manual_seed(5)
    alone = small_vmt(**SIZES)
    twin = small_vmt(**SIZES)
    twin.load_state_dict(alone.state_dict())
    start = small_vmt(**SIZES)
    start.load_state_dict(alone.state_dict())
    one = Trainer(alone, docs, config).fit(progress=False)
    reduced = []  # the collectives the launcher's trainer calls (DDP's own run in C++)
    real = gloo_group.all_reduce
    monkeypatch.setattr(gloo_group, "all_reduce", lambda t, *a, **k: (reduced.append(t.numel()), real(t, *a, **k))[1])
    torch.manual_seed(123)  # the per-step seeds, not the process state, decide the steps
    ranked = distributed_fit(twin, docs, config, device="cpu", progress=False)
    assert gloo_group.get_world_size() == 1
    assert reduced == [3, 4] * 6, "the distributed launcher did not run on the process group"
    assert one.ok and ranked.ok and one.steps == ranked.steps == 6
    assert _max_gap(alone, twin) < 1e-9
    assert _without_timings(one.history) == [pytest.approx(h, rel=1e-9) for h in _without_timings(ranked.history)]
    # and the steps moved the parameters: the comparison is not of two untouched models
    assert _max_gap(alone, start) > 1e-3


@pytest.mark.parametrize("regime", ["subsequence", "windows"])
def test_a_resumed_run_equals_an_uninterrupted_one(regime, tmp_path, float64, periodic_documents, small_vmt):
    import dataclasses
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from vmt.checkpoint import find_checkpoint

    docs = periodic_documents()
    config = TrainConfig(regime=regime, steps=8, batch_size=4, max_length=8, window=8, budget=64,
                         log_every=1, checkpoint_every=100, max_skip=3, lr_decay_steps=6,
                         learning_rate=1e-2)
    torch.manual_seed(5)
    start = small_vmt(**SIZES).state_dict()

    def model():
        vmt = small_vmt(**SIZES)
        vmt.load_state_dict(start)
        return vmt

    straight = model()
    done = Trainer(straight, docs, config).fit(progress=False)
    stopped = model()  # the same run stopped after step 3 (its checkpoint written at the end)
    Trainer(stopped, docs, dataclasses.replace(config, steps=3), checkpoint_dir=tmp_path / "ck").fit(progress=False)
    # a checkpoint of the earlier format: random-number states, no world size or window indices
    folder = tmp_path / "old"  # in the one-folder layout of that time
    shutil.copytree(find_checkpoint(tmp_path / "ck"), folder)
    tensors = load_file(str(folder / "state.safetensors")) if (folder / "state.safetensors").exists() else {}
    if regime == "windows":  # carried states into step 4: the resume must restore them
        assert any(k.startswith("carried.") for k in tensors)
    tensors.update({"rng.torch": torch.get_rng_state(), "rng.sampler": torch.Generator().get_state()})
    save_file(tensors, str(folder / "state.safetensors"))
    meta = json.loads((folder / "checkpoint.json").read_text())
    del meta["world_size"], meta["window_indices"]
    (folder / "checkpoint.json").write_text(json.dumps(meta))

    for ck in ("ck", "old"):
        torch.manual_seed(999)  # a different process state: the step's seeds decide
        resumed = model()
        trainer = Trainer(resumed, docs, config, checkpoint_dir=tmp_path / ck)
        assert trainer.resume() and trainer.step == 3
        result = trainer.fit(progress=False)
        assert result.ok and result.steps == 8
        assert _max_gap(resumed, straight) < 1e-9, ck
        assert _without_timings(result.history) == [pytest.approx(h, rel=1e-9) for h in _without_timings(done.history)]
    # the resumed steps moved the parameters from those of the checkpoint
    assert _max_gap(stopped, straight) > 1e-3


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


def test_weight_decay_shrinks_every_parameter_by_lr_times_decay_apart_from_the_gradient(
        float64, periodic_documents, small_vmt):
    """AdamW's first step is Adam's first step (the same gradient at the same parameters) plus
    ``-lr * weight_decay * p``: the difference of the two runs is exactly that, for every
    parameter."""
    import dataclasses

    docs = periodic_documents()
    config = TrainConfig(steps=1, batch_size=4, max_length=8, budget=64, learning_rate=1e-2)
    torch.manual_seed(3)
    start = small_vmt(**SIZES).state_dict()
    runs = {}
    for decay in (0.0, 0.5):
        vmt = small_vmt(**SIZES)
        vmt.load_state_dict(start)
        trainer = Trainer(vmt, docs, dataclasses.replace(config, weight_decay=decay))
        assert isinstance(trainer.optimizer, torch.optim.AdamW) == (decay > 0)
        # a resumed optimiser state carries its own decay: the config's decides at every step
        trainer.optimizer.param_groups[0]["weight_decay"] = 7.0
        trainer.fit(progress=False)
        runs[decay] = dict(vmt.named_parameters())
    for name, p in runs[0.5].items():
        expected = -config.learning_rate * 0.5 * start[name]
        assert torch.allclose(p.detach() - runs[0.0][name].detach(), expected, rtol=1e-9, atol=1e-12), name
    assert max(float(start[n].abs().max()) for n in runs[0.5]) > 0.1  # the decay was visible
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        TrainConfig(weight_decay=-0.1)


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



def test_cpu_budget_stops_the_run_keeps_the_checkpoint_and_carries_over_a_resume(
        tmp_path, monkeypatch, periodic_documents, small_vmt):
    """A made-up CPU clock on which every SVI step costs exactly one second (checkpoints and
    logging cost nothing): a budget of 3.5 s stops after step 4; resumed with 6 s the run takes
    the two steps left, and resumed again it takes none."""
    from vmt.inference import train

    clock = {"t": 0.0}
    monkeypatch.setattr(train, "_cpu_now", lambda: clock["t"])
    original = Trainer.train_step

    def one_second(self, annealing):
        clock["t"] += 1.0
        return original(self, annealing)

    monkeypatch.setattr(Trainer, "train_step", one_second)
    docs = periodic_documents()
    config = TrainConfig(steps=50, batch_size=4, max_length=8, budget=64, checkpoint_every=100, log_every=3,
                         max_cpu_seconds=3.5)
    trainer = Trainer(small_vmt(**SIZES), docs, config, checkpoint_dir=tmp_path / "ck")
    result = trainer.fit(progress=False)
    assert result.ok and result.stopped == "cpu budget" and result.steps == 4
    assert result.cpu_seconds == 4.0 and result.checkpoint is not None
    assert [h["step"] for h in result.history] == [3, 4]  # the last step is logged
    kept = load_checkpoint(tmp_path / "ck").meta
    assert kept["step"] == 4 and kept["cpu_seconds"] == 4.0

    more = TrainConfig(**{**config.__dict__, "max_cpu_seconds": 6.0})  # a free change, like steps
    resumed = Trainer(small_vmt(**SIZES), docs, more, checkpoint_dir=tmp_path / "ck")
    assert resumed.resume() and resumed.cpu_seconds == 4.0
    result = resumed.fit(progress=False)
    assert result.stopped == "cpu budget" and result.steps == 6 and result.cpu_seconds == 6.0
    again = Trainer(small_vmt(**SIZES), docs, more, checkpoint_dir=tmp_path / "ck")
    assert again.resume()
    result = again.fit(progress=False)
    assert result.stopped == "cpu budget" and result.steps == 6 and clock["t"] == 6.0  # no step taken

    unlimited = Trainer(small_vmt(**SIZES), docs, TrainConfig(**{**config.__dict__, "steps": 5, "max_cpu_seconds": 0.0}))
    result = unlimited.fit(progress=False)  # no budget: the steps end the run
    assert result.stopped == "completed" and result.steps == 5 and result.cpu_seconds == 5.0
    with pytest.raises(ValueError, match="max_cpu_seconds must be >= 0"):
        TrainConfig(max_cpu_seconds=-1.0)


def test_a_cpu_budget_in_a_schedule_reaches_the_trainer():
    from vmt.experiment import Schedule

    schedule = Schedule.from_dict({"train": {"steps": 10_000, "max_cpu_seconds": 300}})
    assert schedule.train.max_cpu_seconds == 300 and schedule.train.steps == 10_000


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


@pytest.mark.parametrize("streams, window", [(1, 5), (3, 8), (4, 3), (8, 64)])
def test_ragged_windows_read_every_document_once_in_full_windows(streams, window):
    from vmt.inference.windows import DocumentStreams

    lengths = [7, 1, 20, 13, 13, 2, 0, 31, 9]
    docs = [torch.arange(n) + 100 * i for i, n in enumerate(lengths)]
    walked = list(DocumentStreams(docs, streams, window, ragged=True))
    rebuilt = {i: [] for i in range(len(docs))}
    for w in walked:
        b = w.batch
        remaining = [lengths[d] - o for d, o in zip(w.documents, w.offsets, strict=True)]
        assert b.num_steps == min(window, max(remaining))  # as long as the longest row allows
        assert b.end.tolist() == [min(b.num_steps, r) for r in remaining]
        assert b.carried.tolist() == [o > 0 for o in w.offsets]
        for r, d in enumerate(w.documents):
            rebuilt[d].append(b.obs[r, : int(b.end[r])])
            assert (b.obs[r, int(b.end[r]):] == 0).all()  # padding
    assert all(torch.equal(torch.cat(rebuilt[i] or [torch.arange(0)]), docs[i]) for i in range(len(docs)))
    counted = DocumentStreams([torch.zeros(0)] * len(lengths), streams, window, lengths=lengths,
                              ragged=True).window_lengths()
    assert counted == [w.batch.num_steps for w in walked]
    aligned = DocumentStreams(docs, streams, window).window_lengths()
    assert len(counted) <= len(aligned)


def test_ragged_windows_train_and_carry_only_continuing_rows(tmp_path, periodic_documents, small_vmt):
    from vmt.inference.train import Trainer

    docs = [d[:n] for d, n in zip(periodic_documents(n=6), (40, 9, 25, 17, 33, 12), strict=True)]
    config = TrainConfig(regime="windows", window=8, batch_size=3, steps=12, ragged_windows=True,
                         checkpoint_every=6)
    trainer = Trainer(small_vmt(**SIZES), docs, config, checkpoint_dir=tmp_path / "ck")
    seen = []
    original = trainer.cursor.carry
    trainer.cursor.carry = lambda window, x: (seen.append((window, x.shape)), original(window, x))[1]
    result = trainer.fit(progress=False)
    assert result.ok and result.steps == 12
    assert any(int(w.batch.end.min()) < w.batch.num_steps for w, _ in seen)  # some rows padded
    last, shape = seen[-1]
    going_on = {d for d, o in zip(last.documents, last.offsets, strict=True)
                if o + last.batch.num_steps < len(docs[d])}
    assert set(trainer.cursor.carried) == going_on and shape[1] == last.batch.num_steps


def test_a_checkpoint_written_before_a_training_field_existed_resumes(tmp_path, periodic_documents, small_vmt):
    import json

    from vmt.checkpoint import find_checkpoint
    from vmt.inference.train import Trainer

    docs = periodic_documents()
    config = TrainConfig(steps=4, batch_size=4, max_length=8, budget=64, checkpoint_every=4)
    Trainer(small_vmt(**SIZES), docs, config, checkpoint_dir=tmp_path / "ck").fit(progress=False)
    meta_file = find_checkpoint(tmp_path / "ck") / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    del meta["train_config"]["ragged_windows"]  # as written before the fields existed
    del meta["vmt_config"]["first_guide"]
    meta_file.write_text(json.dumps(meta))
    later = Trainer(small_vmt(**SIZES), docs, dataclasses.replace(config, steps=6), checkpoint_dir=tmp_path / "ck")
    assert later.resume() and later.step == 4
    meta["vmt_config"]["first_guide"] = "fixed"  # another model config is refused
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="first_guide"):
        Trainer(small_vmt(**SIZES), docs, config, checkpoint_dir=tmp_path / "ck").resume()
    del meta["vmt_config"]["first_guide"]
    meta["train_config"]["overlap"] = True  # a real difference is still refused
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="overlap"):
        Trainer(small_vmt(**SIZES), docs, config, checkpoint_dir=tmp_path / "ck").resume()


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


def test_the_one_loss_with_distillation_is_the_elbo_loss_plus_the_weighted_cross_entropy():
    # One process: the loss share of W = 1 with its own counts is -sum ELBO / tokens plus the
    # auxiliary means plus distill_weight times the teacher cross-entropy (a mean over tokens).
    from vmt.encoders.teacher import soft_cross_entropy
    from vmt.inference.elbo import auxiliary_losses, elbo_terms
    from vmt.inference.objective import svi_loss
    from vmt.models import ChainBatch, VariationalMarkovTransformer, VMTConfig

    token = dict(prior="token", transition="token", emission="token", guide="token")
    vmt = VariationalMarkovTransformer(VMTConfig(
        state_dim=6, token_dim=3, obs_dim=7, feature_dim=5, guide_hidden=8, prior_components=2,
        **token)).double()
    rows, steps, k = 3, 6, 4
    batch = ChainBatch(obs=torch.randint(0, 7, (rows, steps)), start=torch.tensor([0, 1, 0]),
                       end=torch.tensor([steps, steps, steps - 2]),
                       features=torch.randn(rows, steps, 5, dtype=torch.float64),
                       x0=torch.randn(rows, 6, dtype=torch.float64), carried=torch.tensor([True, False, True]))
    ids = torch.randint(0, 7, (rows, steps, k))
    probs = torch.softmax(torch.randn(rows, steps, k, dtype=torch.float64), -1)
    config = TrainConfig(regime="windows", aux_weight=0.1, distill_weight=0.5)
    torch.manual_seed(3)
    loss = svi_loss(vmt, batch, config, 0.7, 2, teacher=(ids, probs)).loss
    torch.manual_seed(3)
    terms = elbo_terms(vmt, batch)
    aux = auxiliary_losses(terms, batch, 2)
    ce = soft_cross_entropy(vmt.emission.predictive_log_probs(terms.x), ids, probs, terms.mask)
    expected = (-terms.elbo_per_row(0.7).sum() / terms.mask.sum() + 0.5 * ce
                + 0.1 * (aux["init"] + aux["prior"] + aux["skip"]))
    assert float(ce.detach()) > 0.1  # the cross-entropy term is there to be weighted
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
