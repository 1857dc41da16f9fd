"""Training throughput of distributed SVI: 1 and 2 CPU processes under ``torchrun`` (gloo).

Each run launches ``python -m torch.distributed.run --nproc_per_node P`` on the loopback
address with a worker (this module) that trains a small VMT (GRU reader over tokens, float32)
with :class:`vmt.inference.distributed.DistributedTrainer` on synthetic period-4 documents.
Every rank has the same per-rank batch (weak scaling: 2 processes do twice the work of one
per step). After warm-up steps, the ranks meet at a barrier, run ``steps`` timed steps, meet
again; rank 0 reports the tokens of all ranks divided by that wall time. The 1- and 2-process
launches alternate (``repeats`` rounds) and the medians are compared as a ratio, so load from
other processes on the machine hits both alike. Where CUDA is available, a single-process
GPU run is measured the same way and reported against the 1-process CPU figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vmt.benchmarks.report import BenchResult, markdown_table

NAME = "scaling"
SUMMARY = "distributed SVI tokens/s: 2 vs 1 CPU processes under torchrun/gloo (+ GPU if any)"

logger = logging.getLogger(__name__)

VOCAB = 16


def _documents(n: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(40, 120, (1,), generator=g))
        base = (torch.arange(length) + int(torch.randint(0, 4, (1,), generator=g))) % 4
        noise = torch.rand(length, generator=g) < 0.1
        docs.append(torch.where(noise, torch.randint(4, VOCAB, (length,), generator=g), base))
    return docs


def _worker(out: Path, steps: int, warmup: int, device: str | None) -> None:
    """One rank of a timed run (launched by torchrun)."""
    import torch.distributed as dist

    from vmt.inference.distributed import DistributedTrainer, init_distributed
    from vmt.inference.train import TrainConfig
    from vmt.models import VariationalMarkovTransformer, VMTConfig

    torch.set_num_threads(1)
    rank, world, default_device = init_distributed()
    torch.manual_seed(0)
    config = VMTConfig(state_dim=8, obs_dim=VOCAB, feature_dim=32, guide_hidden=32,
                       transition_hidden=32, prior_components=2, max_window=64)
    spec = {"kind": "gru", "kwargs": {"input": "tokens", "hidden_size": 32, "vocab_size": VOCAB}}
    vmt = VariationalMarkovTransformer(config, reader_spec=spec)
    train = TrainConfig(steps=warmup + steps, batch_size=8, min_length=32, max_length=32,
                        budget=256, learning_rate=3e-3, seed=0, log_every=10**6)
    trainer = DistributedTrainer(vmt, _documents(), train, device=device or default_device)
    for _ in range(warmup):
        trainer.train_step(1.0)

    def sync() -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        if world > 1:
            dist.barrier()

    sync()
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        tokens += trainer.train_step(1.0)["tokens"]
    sync()
    seconds = time.perf_counter() - start
    if rank == 0:
        out.write_text(json.dumps({"tokens": tokens, "seconds": seconds, "world": world,
                                   "device": str(trainer.device)}))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, steps: int, warmup: int, device: str | None = None) -> dict:
    """Run the worker under torchrun on the loopback address; its report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "vmt.benchmarks.scaling", str(out), "--steps", str(steps),
               "--warmup", str(warmup)]
        if device:
            cmd += ["--device", device]
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} processes failed:\n{done.stderr[-2000:]}")
        report = json.loads(out.read_text())
    report["tokens_per_second"] = report["tokens"] / report["seconds"]
    return report


def run(quick: bool, figure_dir: Path) -> BenchResult:
    steps, warmup, repeats = (8, 2, 2) if quick else (30, 3, 3)
    rates: dict[str, list[float]] = {"cpu1": [], "cpu2": []}
    gpu = torch.cuda.is_available()
    if gpu:
        rates["gpu1"] = []
    for _ in range(repeats):
        rates["cpu1"].append(_launch(1, steps, warmup)["tokens_per_second"])
        rates["cpu2"].append(_launch(2, steps, warmup)["tokens_per_second"])
        if gpu:
            rates["gpu1"].append(_launch(1, steps, warmup, "cuda")["tokens_per_second"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    metrics = {
        "tokens_per_s_cpu_1proc": med["cpu1"],
        "tokens_per_s_cpu_2proc": med["cpu2"],
        "throughput_ratio_2proc_vs_1proc": med["cpu2"] / med["cpu1"],
    }
    if gpu:
        metrics["tokens_per_s_gpu_1proc"] = med["gpu1"]
        metrics["throughput_ratio_gpu_vs_cpu_1proc"] = med["gpu1"] / med["cpu1"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_dir.mkdir(parents=True, exist_ok=True)
    labels = {"cpu1": "1 CPU process", "cpu2": "2 CPU processes", "gpu1": "1 GPU"}
    fig, ax = plt.subplots(figsize=(5, 3))
    keys = list(med)
    ax.bar([labels[k] for k in keys], [med[k] for k in keys], color="tab:blue")
    for i, k in enumerate(keys):
        ax.plot([i] * len(rates[k]), rates[k], "k.", ms=4)
    ax.set_ylabel("training tokens / s")
    ax.set_title("distributed SVI throughput (median, dots: rounds)")
    fig.tight_layout()
    figure = figure_dir / "scaling.png"
    fig.savefig(figure, dpi=120)
    plt.close(fig)

    rows = [[labels[k], len(rates[k]), med[k], med[k] / med["cpu1"]] for k in keys]
    gpu_text = (
        "A single-process CUDA run is included above."
        if gpu
        else "No CUDA device was available for this run, so there is no GPU figure."
    )
    markdown = (
        markdown_table(["launch", "rounds", "tokens/s (median)", "vs 1 CPU process"], rows)
        + f"\n\n![](figures/{figure.name})\n\n"
        f"Each launch is `torchrun --nproc_per_node P` (gloo on 127.0.0.1) training a small VMT "
        f"(state 8, GRU reader of width 32, float32) with `DistributedTrainer`: 8 "
        f"subsequences of 32 tokens per rank and step, expanded suffix-parallel into up to 256 "
        f"scored states, {warmup} warm-up steps, then {steps} timed steps between two "
        f"barriers; tokens/s counts the positions scored in ELBOs (the suffix rows' states) "
        f"of all ranks per second of that wall time. 1- and 2-process launches alternate for "
        f"{repeats} rounds and the medians are compared. With a fixed per-rank batch, perfect "
        f"scaling would give a ratio of 2. This machine has 2 cores shared with other work, "
        f"so the second process competes with everything else running; the ratio says how much "
        f"of the second core the gradient all-reduce and the shared load left for training. "
        f"{gpu_text}"
    )
    config = {"quick": quick, "steps": steps, "warmup": warmup, "repeats": repeats,
              "per_rank_batch": 8, "length": 32, "rates": rates}
    return BenchResult(NAME, metrics, config, markdown, [figure])


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one rank of the scaling benchmark")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    _worker(Path(args.out), args.steps, args.warmup, args.device)


if __name__ == "__main__":
    _main()
