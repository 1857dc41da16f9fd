"""The windows regime under DDP (gloo on the loopback address) against a single-process
reference, and its checkpoints.

Run as a script (``python -m torch.distributed.run ... test_distributed_windows.py OUT``), this
file is also the program each rank runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scale"))
from workers import (  # noqa: E402
    kill_when_checkpoint_reaches,
    periodic_documents,
    save_params,
    tiny_vmt,
    train_config,
)

from vmt.checkpoint import load_checkpoint  # noqa: E402
from vmt.inference.distributed import DistributedTrainer, distributed_fit, step_seed  # noqa: E402
from vmt.inference.elbo import auxiliary_losses, elbo_terms  # noqa: E402
from vmt.inference.windows import (  # noqa: E402
    DocumentStreams,
    StreamCursor,
    attach_carried,
    shard_order,
)

DOCUMENTS = 6  # lengths 26, 29, 22, 16, 14, 19: three per rank, so streams refill mid-epoch
STREAMS = 2
WINDOW = 10  # epochs of 5 (rank 0) and 4 (rank 1) windows: the ranks wrap at different steps
FIRST, STEPS = 3, 8  # the torchrun job stops at FIRST, then resumes to STEPS


def documents() -> list[torch.Tensor]:
    return periodic_documents(DOCUMENTS)


def windows_config(steps: int, **kw):
    return train_config(steps, regime="windows", batch_size=STREAMS, window=WINDOW, **kw)


# -- the program of each rank ---------------------------------------------------------------
def worker(argv: list[str]) -> None:
    """Train the tiny VMT in the windows regime on every rank, resuming from the checkpoint
    folder if it holds one; rank 0 saves the parameters and the history."""
    from vmt.inference.distributed import init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--checkpoint")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds to sleep after each checkpoint (so a test can kill the run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.pause > 0:
        import time

        save = DistributedTrainer.save

        def save_then_pause(self):
            path = save(self)
            time.sleep(args.pause)
            return path

        DistributedTrainer.save = save_then_pause
    rank, world, device = init_distributed()
    vmt = tiny_vmt()
    result = distributed_fit(vmt, documents(), windows_config(args.steps),
                             checkpoint_dir=args.checkpoint, device=device, progress=False)
    if rank == 0:
        save_params(vmt, Path(args.out))
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"steps": result.steps, "history": result.history, "world": world})
        )


# -- the single-process reference ------------------------------------------------------------
def carry_states(window, x: torch.Tensor, previous: dict[int, torch.Tensor]) -> dict:
    """Every row's last sampled state, keyed by document, merged into ``previous`` (the
    reference keeps them all; the trainers keep only continuing documents')."""
    merged = dict(previous)
    for r, d in enumerate(window.documents):
        merged[d] = x[r, window.batch.num_steps - 1].detach()
    return merged


class RankStreams:
    """One rank's streams as the single-process trainer walks them: DocumentStreams over the
    rank's documents (longest first), a new epoch with no carried state when they run out,
    every carried state kept (:func:`carry_states`)."""

    def __init__(self, docs: list[torch.Tensor], rank: int, world: int) -> None:
        share = sorted(range(rank, len(docs), world), key=lambda i: -len(docs[i]))
        self.streams = DocumentStreams(docs, STREAMS, WINDOW, order=share)
        self.windows = iter(self.streams)
        self.carried: dict[int, torch.Tensor] = {}
        self.epochs = 0

    def next(self):
        try:
            return next(self.windows)
        except StopIteration:
            self.windows, self.carried = iter(self.streams), {}
            self.epochs += 1
            return next(self.windows)


def reference_params(steps: int, ranks: int, normalise: str = "global") -> tuple[dict, list]:
    """One process, no DDP: each step takes the next window of every rank's streams (with the
    rank's carried states and the per-rank seeds of the step) and minimises the loss of their
    union, written out from ELBO terms. ``normalise="per_rank"`` averages per-rank normalised
    losses instead (what a naive DDP loss would do). Also returns the epochs each rank began."""
    vmt = tiny_vmt()
    config = windows_config(steps)
    docs = documents()
    readers = [RankStreams(docs, r, ranks) for r in range(ranks)]
    params = [p for p in vmt.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    generator = torch.Generator()
    for step in range(steps):
        parts, windows = [], []
        for r, reader in enumerate(readers):
            seed = step_seed(config.seed, step, r)
            generator.manual_seed(seed)
            torch.manual_seed(seed ^ 0x5DEECE66D)
            window = reader.next()
            batch = attach_carried(window, reader.carried, vmt.config.state_dim)
            skip = int(torch.randint(2, config.max_skip + 1, (1,), generator=generator))
            terms = elbo_terms(vmt, batch)
            aux = auxiliary_losses(terms, batch, skip)
            first = int((batch.first_mask() & batch.carried_rows()[:, None]).sum())
            pos = batch.positions()
            valid = (pos[:-skip] >= batch.start[:, None]) & (pos[skip:] < batch.end[:, None])
            pairs = int(valid.sum()) if batch.num_steps > skip else 0
            parts.append((terms.elbo_per_row().sum(), int(terms.mask.sum()), aux, first, pairs))
            windows.append((window, terms.x))
        tokens = sum(p[1] for p in parts)
        firsts = sum(p[3] for p in parts)
        pairs = sum(p[4] for p in parts)
        if normalise == "global":
            loss = -sum(p[0] for p in parts) / tokens + config.aux_weight * (
                sum(p[2]["init"] * p[3] for p in parts) / max(firsts, 1)
                + sum(p[2]["prior"] * p[1] for p in parts) / tokens
                + sum(p[2]["skip"] * p[4] for p in parts) / max(pairs, 1)
            )
        else:
            loss = sum(
                -p[0] / p[1] + config.aux_weight * (p[2]["init"] + p[2]["prior"] + p[2]["skip"])
                for p in parts
            ) / ranks
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
        opt.step()
        for reader, (window, x) in zip(readers, windows, strict=True):
            reader.carried = carry_states(window, x, reader.carried)
    state = {k: v.detach().clone() for k, v in vmt.state_dict().items()}
    return state, [reader.epochs for reader in readers]


def without_speed(record: dict) -> dict:
    """A history record without its timings (throughput, wall and CPU seconds)."""
    return {k: v for k, v in record.items() if k not in ("tokens_per_second", "seconds", "cpu_seconds")}


def max_gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


# -- launching ranks ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> None:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(Path(__file__).resolve()), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-rank job stopped after FIRST steps (its checkpoint kept aside), then the same
    command resumed to STEPS from the checkpoint."""
    root = tmp_path_factory.mktemp("windows_ddp")
    ck = root / "ck"
    torchrun(2, str(root / "first.safetensors"), "--steps", str(FIRST), "--checkpoint", str(ck))
    first_ckpt = load_checkpoint(ck, build_model=False)
    first_meta = json.loads((ck / "checkpoint.json").read_text())
    torchrun(2, str(root / "resumed.safetensors"), "--steps", str(STEPS), "--checkpoint", str(ck))
    return {
        "root": root,
        "first": load_file(str(root / "first.safetensors")),
        "first_meta": first_meta,
        "first_carried": {k for k in first_ckpt.tensors if k.startswith("carried.")},
        "resumed": load_file(str(root / "resumed.safetensors")),
        "resumed_history": json.loads((root / "resumed.json").read_text())["history"],
    }


def test_two_ranks_match_one_process_with_both_ranks_windows(two_rank_run):
    ref, epochs = reference_params(FIRST, ranks=2)
    # float64 model and Adam: the only differences are the order of the gradient sums in the
    # all-reduce (~1e-16 relative), amplified by at most a few Adam steps.
    assert max_gap(two_rank_run["first"], ref) < 1e-9
    # the test can tell normalisations apart (the ranks' windows hold different token counts)
    naive, _ = reference_params(FIRST, ranks=2, normalise="per_rank")
    assert max_gap(naive, ref) > 1e-6
    # and the two ranks did different work: one rank alone on all documents differs
    one, _ = reference_params(FIRST, ranks=1)
    assert max_gap(one, ref) > 1e-4
    assert epochs == [0, 0]


def test_two_ranks_resumed_from_their_checkpoint_continue_the_reference(two_rank_run):
    meta = two_rank_run["first_meta"]
    assert meta["step"] == FIRST and meta["world_size"] == 2
    assert meta["window_indices"] == [FIRST, FIRST] and meta["window_index"] == FIRST
    # both ranks' continuing documents were gathered into rank 0's checkpoint; rank 0 owns
    # even documents and rank 1 odd ones, so both parities must be present
    carried = {int(k.split(".")[1]) for k in two_rank_run["first_carried"]}
    assert {d % 2 for d in carried} == {0, 1}
    ref, epochs = reference_params(STEPS, ranks=2)
    # the reference crosses the end of both ranks' epochs, at different steps (5 and 4)
    assert epochs == [1, 1]
    # same tolerance and reason as above; a resume that lost the carried states or the
    # window positions moves the parameters by far more (checked below)
    assert max_gap(two_rank_run["resumed"], ref) < 1e-9
    assert len(two_rank_run["resumed_history"]) == STEPS
    assert all(math.isfinite(h["loss"]) for h in two_rank_run["resumed_history"])


def test_resume_with_another_number_of_ranks_restarts_the_streams(two_rank_run, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(two_rank_run["root"] / "ck", ck)
    vmt = tiny_vmt()
    trainer = DistributedTrainer(vmt, documents(), windows_config(STEPS + 3), checkpoint_dir=ck)
    assert trainer.resume() and trainer.step == STEPS
    # one rank reads all documents now: its stream positions start over, with nothing carried
    assert trainer.cursor.window_index == 0 and trainer.cursor.carried == {}
    assert trainer.cursor.streams.order == shard_order(trainer.lengths, 0, 1)
    for k, v in vmt.state_dict().items():
        assert torch.equal(v, two_rank_run["resumed"][k]), k
    result = trainer.fit(progress=False)
    assert result.ok and result.steps == STEPS + 3
    assert result.history[:STEPS] == two_rank_run["resumed_history"]
    assert json.loads((ck / "checkpoint.json").read_text())["window_indices"] == [3]


def test_alone_distributed_fit_runs_and_a_stopped_run_resumes_exactly(tmp_path):
    straight = tiny_vmt()
    done = distributed_fit(straight, documents(), windows_config(STEPS), progress=False)
    assert done.ok and done.steps == STEPS and len(done.history) == STEPS

    ck = tmp_path / "ck"
    stopped = distributed_fit(tiny_vmt(), documents(), windows_config(FIRST), checkpoint_dir=ck,
                              progress=False)
    assert stopped.steps == FIRST
    ckpt = load_checkpoint(ck, build_model=False)
    carried = {k: v for k, v in ckpt.tensors.items() if k.startswith("carried.")}
    assert carried, "the checkpoint must hold carried states for this test to mean anything"
    shutil.copytree(ck, tmp_path / "control")
    resumed_vmt = tiny_vmt()
    resumed = distributed_fit(resumed_vmt, documents(), windows_config(STEPS), checkpoint_dir=ck,
                              progress=False)
    assert resumed.steps == STEPS
    assert [without_speed(h) for h in resumed.history] == [without_speed(h) for h in done.history]
    # same rank count, per-step seeds, window index and carried states restored: bitwise equal
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed_vmt.state_dict()[k]), k

    # control: the carried states matter — resuming with them replaced moves the parameters
    trainer = DistributedTrainer(tiny_vmt(), documents(), windows_config(STEPS),
                                 checkpoint_dir=tmp_path / "control")
    assert trainer.resume()
    assert trainer.cursor.window_index == FIRST
    trainer.cursor.carried = {d: torch.zeros_like(x) for d, x in trainer.cursor.carried.items()}
    trainer.fit(progress=False)
    assert max_gap(trainer.vmt.state_dict(), straight.state_dict()) > 1e-6


@pytest.mark.integration
def test_killed_windows_run_resumes_to_the_uninterrupted_result(tmp_path):
    steps = 12
    straight = tiny_vmt()
    distributed_fit(straight, documents(), windows_config(steps), progress=False)

    ck, out = tmp_path / "ck", tmp_path / "killed.safetensors"
    args = [sys.executable, str(Path(__file__).resolve()), str(out), "--steps", str(steps),
            "--checkpoint", str(ck), "--pause", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_checkpoint_reaches(proc, ck, 4)
    assert proc.returncode == -signal.SIGKILL, "the run was not killed half way"
    assert not out.exists()
    meta = json.loads((ck / "checkpoint.json").read_text())
    assert 4 <= meta["step"] < steps
    epoch = 9  # windows of one process over the six documents
    assert meta["window_indices"] == [meta["step"] - epoch * (meta["step"] > epoch)]
    done = subprocess.run(args[:-2], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = load_file(str(out))
    # same process count, per-step seeds, windows and carried states restored: bitwise equal
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed[k]), k


def test_cursor_follows_the_reference_streams_and_keeps_only_continuing_states():
    # StreamCursor (the windows regime of both trainers, keeping only continuing documents'
    # states) gives the windows and x0 of the reference (every state kept), across two epochs.
    docs = documents()
    reference = RankStreams(docs, 0, 1)
    cursor = StreamCursor(DocumentStreams(docs, STREAMS, WINDOW))
    g = torch.Generator().manual_seed(0)
    for _ in range(2 * 9 + 2):  # 9 windows per epoch over the six documents: into a third
        expected, got = reference.next(), cursor.next_window()
        assert expected.documents == got.documents and expected.offsets == got.offsets
        assert torch.equal(expected.batch.obs, got.batch.obs)
        a = attach_carried(expected, reference.carried, 3)
        b = attach_carried(got, cursor.carried, 3)
        assert (a.x0 is None) == (b.x0 is None)
        if a.x0 is not None:
            assert torch.equal(a.x0, b.x0)
        x = torch.randn(got.batch.num_rows, got.batch.num_steps, 3, generator=g,
                        dtype=torch.float64)
        reference.carried = carry_states(expected, x, reference.carried)
        cursor.carry(got, x)
        assert len(cursor.carried) <= STREAMS
    assert reference.epochs == 2 and cursor.window_index == 2


def test_windows_straight_from_a_memmap_corpus_train_like_the_same_documents_in_memory(tmp_path):
    from vmt.data.corpus import CharTokenizer
    from vmt.data.memmap import build_memmap_corpus

    tokenizer = CharTokenizer("abcdefghijkl")
    g = torch.Generator().manual_seed(3)
    text = "\n\n".join(
        "".join("abcdefghijkl"[int(i)] for i in torch.randint(0, 12, (int(n),), generator=g))
        for n in torch.randint(5, 30, (7,), generator=g)
    )
    (tmp_path / "a.txt").write_text(text)
    corpus = build_memmap_corpus([tmp_path / "a.txt"], tokenizer, tmp_path / "corpus",
                                 progress=False)
    assert len(corpus) == 7
    in_memory = [corpus.documents[i] for i in range(len(corpus))]
    results = []
    for data in (corpus, in_memory):
        vmt = tiny_vmt(vocab=tokenizer.vocab_size)
        trainer = DistributedTrainer(vmt, data, windows_config(6))
        trainer.fit(progress=False)
        results.append((vmt.state_dict(), trainer.cursor.window_index))
    (mapped, index_mapped), (listed, index_listed) = results
    assert index_mapped == index_listed > 0
    for k, v in listed.items():  # the same windows, seeds and carried states: bitwise equal
        assert torch.equal(v, mapped[k]), k


def test_shard_order_splits_documents_disjointly_longest_first():
    lengths = [5, 0, 7, 7, 2, 9, 1]
    shares = [shard_order(lengths, r, 3) for r in range(3)]
    assert shares == [[3, 0, 6], [4], [5, 2]]  # rank 1 skips the empty document 1
    assert sorted(sum(shares, [])) == [i for i, n in enumerate(lengths) if n > 0]
    assert shard_order(lengths, 0, 1) == [5, 2, 3, 0, 4, 6]  # ties keep index order
    with pytest.raises(ValueError, match="rank 3"):
        shard_order(lengths, 3, 3)


if __name__ == "__main__":
    worker(sys.argv[1:])
