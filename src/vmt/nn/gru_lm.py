"""A GRU language model over token ids, sized by a parameter budget and trained for a CPU-time
budget: the same-budget neural baseline of text benchmarks.

The model reads ``<bos> y_1 .. y_{n-1}`` and predicts ``y_1 .. y_n`` (so every token of a
document is scored, the first from the beginning-of-document input alone); a document is read
whole, in chunks, with the recurrent state carried.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)


class GRULanguageModel(nn.Module):
    """Embedding -> one GRU layer -> linear softmax over ``vocab_size`` ids.

    Args:
        vocab_size: number of output ids; input id ``vocab_size`` is beginning-of-document.
        hidden: width of the embedding and of the GRU state.
    """

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size + 1, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    @staticmethod
    def parameter_count(vocab_size: int, hidden: int) -> int:
        """Parameters of a model of this size (embedding, GRU, head)."""
        return (vocab_size + 1) * hidden + 6 * hidden * hidden + 6 * hidden + hidden * vocab_size + vocab_size

    @classmethod
    def hidden_for(cls, parameters: int, vocab_size: int) -> int:
        """The largest width whose :meth:`parameter_count` is at most ``parameters`` (>= 1)."""
        a, b, c = 6.0, 2.0 * vocab_size + 7.0, float(vocab_size - parameters)
        h = int((-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a))
        h = max(h, 1)
        while h > 1 and cls.parameter_count(vocab_size, h) > parameters:
            h -= 1
        while cls.parameter_count(vocab_size, h + 1) <= parameters:
            h += 1
        return h

    def forward(self, inputs: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``inputs`` ``(batch, time)`` ids -> logits ``(batch, time, vocab)`` and the state
        ``(1, batch, hidden)``."""
        out, state = self.gru(self.embed(inputs), state)
        return self.head(out), state


@dataclass(frozen=True)
class GRUTrainConfig:
    """Settings of :func:`train_for`: Adam, random chunks of ``length`` tokens."""

    batch_size: int = 16
    length: int = 128
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    seed: int = 0
    max_steps: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("batch_size", "length", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not self.clip_norm > 0:
            raise ValueError(f"learning_rate and clip_norm must be > 0, got {self.learning_rate}, {self.clip_norm}")


def _chunk_batch(docs: list[Tensor], weights: np.ndarray, bos: int, config: GRUTrainConfig,
                 rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """``(batch, length)`` inputs and targets (``-100`` past a document's end)."""
    inputs = torch.full((config.batch_size, config.length), bos, dtype=torch.long)
    targets = torch.full((config.batch_size, config.length), -100, dtype=torch.long)
    for row, d in enumerate(rng.choice(len(docs), size=config.batch_size, p=weights)):
        doc = docs[d]
        start = int(rng.integers(0, len(doc)))
        tgt = doc[start : start + config.length]
        inp = torch.cat([torch.tensor([bos]), doc[:-1]])[start : start + len(tgt)]
        inputs[row, : len(tgt)] = inp
        targets[row, : len(tgt)] = tgt
    return inputs, targets


def train_for(model: GRULanguageModel, documents: Sequence[Tensor], cpu_seconds: float,
              config: GRUTrainConfig = GRUTrainConfig()) -> dict:
    """Train ``model`` on random chunks of ``documents`` until ``cpu_seconds`` of process CPU
    time have been spent (at least one step).

    Returns:
        ``steps``, ``cpu_seconds`` and ``seconds`` spent, ``final_loss`` (mean of the last
        50 steps, nats per token).
    """
    docs = [torch.as_tensor(d, dtype=torch.long) for d in documents if len(d)]
    if not docs:
        raise ValueError("no documents to train on")
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    losses: list[float] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    model.train()
    steps = 0
    while steps < config.max_steps and (steps == 0 or time.process_time() - cpu0 < cpu_seconds):
        inputs, targets = _chunk_batch(docs, lengths / lengths.sum(), model.vocab_size, config, rng)
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        opt.step()
        losses.append(float(loss.detach()))
        steps += 1
        if steps % 200 == 0:
            logger.info("GRU LM step %d: loss %.4f", steps, sum(losses[-200:]) / 200)
    model.eval()
    return {"steps": steps, "cpu_seconds": time.process_time() - cpu0,
            "seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-50:]))}


@torch.no_grad()
def document_log_probs(model: GRULanguageModel, document: Tensor, chunk: int = 512) -> Tensor:
    """``(time,)`` float64 ``log p(y_k | y_<k)`` of every token, the state carried across
    chunks of ``chunk`` tokens."""
    model.eval()
    doc = torch.as_tensor(document, dtype=torch.long)
    inputs = torch.cat([torch.tensor([model.vocab_size]), doc[:-1]])
    state, out = None, []
    for lo in range(0, len(doc), chunk):
        logits, state = model(inputs[None, lo : lo + chunk], state)
        logp = torch.log_softmax(logits[0].double(), -1)
        out.append(logp.gather(-1, doc[lo : lo + chunk, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
