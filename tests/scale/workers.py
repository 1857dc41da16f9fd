"""Programs the scale tests run in subprocesses (under ``torchrun`` or a memory limit).

Run as ``python tests/scale/workers.py COMMAND OUT [options]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch

VOCAB = 12


def periodic_documents(n: int = 10, seed: int = 0) -> list[torch.Tensor]:
    """Noisy period-4 documents of unequal lengths (so ranks see unequal token counts)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(6, 30, (1,), generator=g))
        phase = int(torch.randint(0, 4, (1,), generator=g))
        base = (torch.arange(length) + phase) % 4
        noise = torch.rand(length, generator=g) < 0.1
        docs.append(torch.where(noise, torch.randint(4, VOCAB, (length,), generator=g), base))
    return docs


def tiny_vmt(dtype: torch.dtype = torch.float64, vocab: int = VOCAB):
    from vmt.models import VariationalMarkovTransformer, VMTConfig

    torch.manual_seed(0)
    config = VMTConfig(state_dim=3, obs_dim=vocab, feature_dim=8, guide_hidden=8,
                       transition_hidden=8, prior_components=2, max_window=64)
    spec = {"kind": "gru", "kwargs": {"input": "tokens", "hidden_size": 8, "vocab_size": vocab}}
    return VariationalMarkovTransformer(config, reader_spec=spec).to(dtype)


def train_config(steps: int, **kw):
    from vmt.inference.train import TrainConfig

    base = dict(steps=steps, batch_size=3, min_length=2, max_length=10, budget=40,
                learning_rate=1e-2, aux_weight=0.1, max_skip=3, seed=7, log_every=1,
                checkpoint_every=2)
    base.update(kw)
    return TrainConfig(**base)


def save_params(vmt, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in vmt.state_dict().items()}, str(path))


def ddp(args) -> None:
    """Train the tiny VMT with DistributedTrainer (1 or more ranks) and save its parameters."""
    from vmt.inference.distributed import DistributedTrainer, init_distributed

    torch.set_num_threads(1)
    rank, world, device = init_distributed()
    vmt = tiny_vmt()
    trainer = DistributedTrainer(vmt, periodic_documents(), train_config(args.steps),
                                 checkpoint_dir=args.checkpoint, device=device)
    if args.checkpoint:
        trainer.resume()
    result = trainer.fit(progress=False)
    if rank == 0:
        save_params(vmt, Path(args.out))
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"steps": result.steps, "history": result.history, "world": world})
        )


def kill_when_checkpoint_reaches(proc, checkpoint_dir: Path, step: int,
                                  timeout: float = 90.0) -> None:
    """SIGKILL ``proc`` as soon as the checkpoint in ``checkpoint_dir`` records ``step`` or
    more (polling every 20 ms); returns when the process has ended."""
    import signal
    import time

    meta = Path(checkpoint_dir) / "checkpoint.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            written = json.loads(meta.read_text())["step"]
        except (OSError, ValueError, KeyError):  # not there yet, or replaced while read
            written = 0
        if written >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)


def status_bytes(field: str = "VmData") -> int:
    """A size from /proc/self/status (VmData: private data; VmHWM: peak resident set)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def data_usage_bytes() -> int:
    return status_bytes("VmData")


def limited(args) -> None:
    """Under RLIMIT_DATA = current usage + headroom: build a memmap corpus from the text files,
    sample from it and train a few steps on it; report peak usage."""
    from vmt.data.corpus import CharTokenizer
    from vmt.data.memmap import build_memmap_corpus
    from vmt.inference.distributed import DistributedTrainer
    from vmt.inference.subsequences import MemmapSampler

    torch.set_num_threads(1)
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz \n")
    vmt = tiny_vmt(torch.float32, tokenizer.vocab_size)
    config = train_config(4, checkpoint_every=100)
    texts = sorted(Path(args.texts).glob("*.txt"))
    # warm the code paths once on a small corpus so lazy imports happen before the limit
    warm = build_memmap_corpus(texts[:1], tokenizer, Path(args.out) / "warm", progress=False,
                               flush_tokens=1 << 16)
    DistributedTrainer(tiny_vmt(torch.float32, tokenizer.vocab_size), warm,
                       train_config(1)).fit(progress=False)
    base = data_usage_bytes()
    hwm_base = status_bytes("VmHWM")
    limit = base + args.headroom
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    corpus = build_memmap_corpus(texts, tokenizer, Path(args.out) / "corpus", progress=False,
                                 flush_tokens=1 << 16)
    sampler = MemmapSampler(corpus, generator=torch.Generator().manual_seed(0))
    batch = sampler.sample(8, 32)
    trainer = DistributedTrainer(vmt, corpus, config)
    result = trainer.fit(progress=False)
    hwm_end = status_bytes("VmHWM")
    try:  # control: holding the corpus in memory as int64 must break the limit
        whole = np.asarray(corpus.tokens, dtype=np.int64)
        in_memory_fails = False
        del whole
    except MemoryError:
        in_memory_fails = True
    Path(args.out, "report.json").write_text(json.dumps({
        "base": base, "limit": limit, "end_usage": data_usage_bytes(),
        "hwm_base": hwm_base, "hwm_end": hwm_end, "in_memory_fails": in_memory_fails,
        "num_tokens": corpus.num_tokens, "token_bytes": corpus.tokens.nbytes,
        "documents": len(corpus), "batch_shape": list(batch.obs.shape), "steps": result.steps,
        "ok": result.ok, "fingerprint": corpus.fingerprint,
    }))


def toy_corpus():
    from vmt.data.corpus import TokenizedCorpus

    g = torch.Generator().manual_seed(2)
    docs = tuple(torch.randint(0, 97, (int(n),), generator=g)
                 for n in torch.randint(5, 40, (24,), generator=g))
    return TokenizedCorpus("toy", docs, 97, "toy")


def cache_extractor():
    from vmt.encoders.features import LMFeatureExtractor
    from vmt.testing import tiny_llama

    return LMFeatureExtractor(tiny_llama(seed=0), layer=1, model_name="tiny")


def cache(args) -> None:
    """Build a sharded feature cache of the toy corpus, pausing after each shard (so a test
    can kill the build between shards)."""
    import time

    from vmt.encoders.sharded_cache import ShardedFeatureCache

    torch.set_num_threads(1)
    ShardedFeatureCache.build(cache_extractor(), toy_corpus(), args.out, window=8,
                              shard_tokens=40, progress=False,
                              on_shard=lambda s: time.sleep(args.pause))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["ddp", "limited", "cache"])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpoint")
    parser.add_argument("--texts")
    parser.add_argument("--headroom", type=int, default=32 << 20)
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args(argv)
    {"ddp": ddp, "limited": limited, "cache": cache}[args.command](args)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
