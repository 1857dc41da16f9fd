"""DDP under torchrun (gloo on the loopback address) against a single-process reference."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vmt.inference.distributed import DistributedTrainer, SVILoss, step_seed
from vmt.inference.elbo import auxiliary_losses, elbo_terms

sys.path.insert(0, os.path.dirname(__file__))
from conftest import HERE, PYTHON, worker_env  # noqa: E402
from workers import (  # noqa: E402
    kill_when_checkpoint_reaches,
    periodic_documents,
    tiny_vmt,
    train_config,
)

STEPS = 4


def reference_params(steps: int, ranks: int, normalise: str = "global") -> dict:
    """One process, no DDP: each step takes every rank's batch (sampled from the same
    per-rank seeds) and minimises the loss of their union, written out from ELBO terms.

    ``normalise="per_rank"`` averages per-rank normalised losses instead (what a naive DDP
    loss would do): used to show the test tells the two apart.
    """
    vmt = tiny_vmt()
    config = train_config(steps)
    sampler = DistributedTrainer(vmt, periodic_documents(), config)  # for its sampling only
    params = [p for p in vmt.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    for step in range(steps):
        elbo, prior, skip_sum, tokens, skip_pairs, per_rank = [], [], [], 0, 0, []
        for r in range(ranks):
            batch, skip = sampler.sample_batch(step, rank=r)
            terms = elbo_terms(vmt, batch)
            aux = auxiliary_losses(terms, batch, skip)
            n = int(terms.mask.sum())
            pos = batch.positions()
            valid = (pos[:-skip] >= batch.start[:, None]) & (pos[skip:] < batch.end[:, None])
            pairs = int(valid.sum()) if batch.num_steps > skip else 0
            elbo.append(terms.elbo_per_row().sum())
            prior.append(aux["prior"] * n)
            skip_sum.append(aux["skip"] * pairs)
            tokens += n
            skip_pairs += pairs
            per_rank.append(-elbo[-1] / n + 0.1 * (aux["prior"] + aux["skip"]))
        if normalise == "global":
            loss = -sum(elbo) / tokens + 0.1 * (sum(prior) / tokens + sum(skip_sum) / skip_pairs)
        else:
            loss = sum(per_rank) / ranks
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
        opt.step()
    return {k: v.detach().clone() for k, v in vmt.state_dict().items()}


def test_step_seeds_differ_by_rank_and_step():
    seeds = {step_seed(0, s, r) for s in range(50) for r in range(8)}
    assert len(seeds) == 400


def test_single_rank_loss_equals_trainer_normalisation():
    # With one rank the module's loss is the Trainer's: -mean(ELBO)/mean(length) + aux means.
    vmt = tiny_vmt()
    config = train_config(1)
    trainer = DistributedTrainer(vmt, periodic_documents(), config)
    batch, skip = trainer.sample_batch(0)
    from vmt.inference.distributed import aux_counts

    init, pairs = aux_counts(batch, skip)
    totals = torch.tensor([int(batch.mask().sum()), init, pairs])
    torch.manual_seed(3)
    loss = SVILoss(vmt, config)(batch, 1.0, skip, totals).loss
    torch.manual_seed(3)
    terms = elbo_terms(vmt, batch)
    aux = auxiliary_losses(terms, batch, skip)
    expected = -terms.elbo_per_row().mean() / terms.tokens_per_row().double().mean() + 0.1 * (
        aux["init"] + aux["prior"] + aux["skip"])
    # float64 throughout: only summation order differs
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)


def test_torchrun_two_ranks_match_one_process_with_both_batches(tmp_path, run_torchrun):
    out = tmp_path / "ddp.safetensors"
    run_torchrun(2, "ddp", str(out), "--steps", str(STEPS))
    ddp = load_file(str(out))
    ref = reference_params(STEPS, ranks=2)
    naive = reference_params(STEPS, ranks=2, normalise="per_rank")
    # float64 model and Adam: the only differences are the order of the gradient sums in the
    # all-reduce (~1e-16 relative), amplified by at most a few Adam steps.
    worst = max(float((ddp[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-9
    # the test can tell normalisations apart: averaging per-rank means moves the parameters
    apart = max(float((naive[k] - ref[k]).abs().max()) for k in ref)
    assert apart > 1e-6
    # and the two ranks really did different work: differ from a one-rank run
    one = reference_params(STEPS, ranks=1)
    assert max(float((one[k] - ref[k]).abs().max()) for k in ref) > 1e-4


@pytest.mark.integration
def test_resume_with_a_different_number_of_ranks(tmp_path, run_torchrun):
    ck = tmp_path / "ck"
    run_torchrun(2, "ddp", str(tmp_path / "two.safetensors"), "--steps", "4", "--checkpoint", str(ck))
    two = json.loads((tmp_path / "two.json").read_text())
    meta = json.loads((ck / "checkpoint.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2
    # continue on one process: it restarts at step 4 from the saved model and optimiser
    vmt = tiny_vmt()
    trainer = DistributedTrainer(vmt, periodic_documents(), train_config(6), checkpoint_dir=ck)
    assert trainer.resume() and trainer.step == 4
    saved = load_file(str(tmp_path / "two.safetensors"))
    for k, v in vmt.state_dict().items():
        assert torch.equal(v, saved[k])
    assert len(trainer.optimizer.state) > 0
    result = trainer.fit(progress=False)
    assert result.ok and result.steps == 6 and len(result.history) == 6
    assert result.history[:4] == two["history"]
    assert all(math.isfinite(h["loss"]) for h in result.history)


@pytest.mark.integration
def test_killed_training_run_resumes_to_the_uninterrupted_result(tmp_path):
    steps = 16
    straight = tiny_vmt()
    DistributedTrainer(straight, periodic_documents(), train_config(steps)).fit(progress=False)

    ck = tmp_path / "ck"
    out = tmp_path / "killed.safetensors"
    args = [PYTHON, str(HERE / "workers.py"), "ddp", str(out), "--steps", str(steps),
            "--checkpoint", str(ck)]
    proc = subprocess.Popen(args, env=worker_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when_checkpoint_reaches(proc, ck, 4)
    assert proc.returncode == -signal.SIGKILL, "the run was not killed half way"
    assert not out.exists()
    step_at_kill = json.loads((ck / "checkpoint.json").read_text())["step"]
    assert 4 <= step_at_kill < steps
    done = subprocess.run(args, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = load_file(str(out))
    # same process count, same per-step seeds, state restored exactly: bitwise equal
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed[k]), k
