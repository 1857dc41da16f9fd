"""A GRU language model over token ids, sized by a parameter budget and trained for a CPU-time
budget: the same-budget neural baseline of text benchmarks.

The model reads ``<bos> y_1 .. y_{n-1}`` and predicts ``y_1 .. y_n`` (so every token of a
document is scored, the first from the beginning-of-document input alone); a document is read
whole, in chunks, with the recurrent state carried.

Two standard regularisers are available, both off by default: dropout on the embeddings and
on the GRU's outputs (:attr:`GRUTrainConfig.dropout`), and model selection on held-back
documents (``valid`` of :func:`train_for`: the parameters with the best validation NLL are
kept). ``teacher`` distils a pretrained LM's next-token distributions, as the VMT's
``distill_weight`` does, so the two can be compared on the same information.
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

    def __init__(self, vocab_size: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        for name, value in (("vocab_size", vocab_size), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size + 1, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)
        self.drop = nn.Dropout(dropout)

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
        out, state = self.gru(self.drop(self.embed(inputs)), state)  # out: (batch, time, hidden)
        return self.head(self.drop(out)), state


@dataclass(frozen=True)
class GRUTrainConfig:
    """Settings of :func:`train_for`: Adam, random chunks of ``length`` tokens.

    ``valid_every``: steps between validation passes when ``valid`` documents are given.
    ``distill_weight``: weight of the soft cross-entropy against the teacher (with ``teacher``).
    """

    batch_size: int = 16
    length: int = 128
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    seed: int = 0
    max_steps: int = 1_000_000
    valid_every: int = 200
    distill_weight: float = 0.0

    def __post_init__(self) -> None:
        if not self.distill_weight >= 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight!r}")
        for name in ("batch_size", "length", "max_steps", "valid_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not self.clip_norm > 0:
            raise ValueError(f"learning_rate and clip_norm must be > 0, got {self.learning_rate}, {self.clip_norm}")


def _chunk_batch(docs: list[Tensor], weights: np.ndarray, bos: int, config: GRUTrainConfig,
                 rng: np.random.Generator) -> tuple[Tensor, Tensor, list[int], list[int]]:
    """``(batch, length)`` inputs and targets (``-100`` past a document's end), with each
    row's document index and start offset."""
    inputs = torch.full((config.batch_size, config.length), bos, dtype=torch.long)
    targets = torch.full((config.batch_size, config.length), -100, dtype=torch.long)
    rows, starts = [], []
    for row, d in enumerate(rng.choice(len(docs), size=config.batch_size, p=weights)):
        doc = docs[d]
        start = int(rng.integers(0, len(doc)))
        tgt = doc[start : start + config.length]
        inp = torch.cat([torch.tensor([bos]), doc[:-1]])[start : start + len(tgt)]
        inputs[row, : len(tgt)] = inp
        targets[row, : len(tgt)] = tgt
        rows.append(int(d))
        starts.append(start)
    return inputs, targets, rows, starts


def validation_nll(model: GRULanguageModel, documents: Sequence[Tensor]) -> float:
    """Mean NLL per token (nats, compact vocabulary) of ``documents``, model in eval mode."""
    total = sum(float(-document_log_probs(model, d).sum()) for d in documents)
    return total / max(1, sum(len(d) for d in documents))


def train_for(model: GRULanguageModel, documents: Sequence[Tensor], cpu_seconds: float,
              config: GRUTrainConfig = GRUTrainConfig(), valid: Sequence[Tensor] | None = None,
              teacher=None) -> dict:
    """Train ``model`` on random chunks of ``documents`` until ``cpu_seconds`` of process CPU
    time have been spent (at least one step); validation passes count against that budget.

    Args:
        valid: held-back documents; every ``config.valid_every`` steps (and at the end) their
            NLL is measured and the best parameters are kept (model selection).
        teacher: per-document soft targets aligned with ``documents`` (an object with
            ``window(documents, offsets, steps) -> (ids, probs)``, each ``(batch, time, k)``,
            e.g. :class:`vmt.encoders.teacher.TeacherTargets`), used with
            ``config.distill_weight``.

    Returns:
        ``steps``, ``cpu_seconds`` and ``seconds`` spent, ``final_loss`` (mean of the last
        50 steps, nats per token), and with ``valid`` the ``best_step`` and ``best_valid_nll``.
    """
    if config.distill_weight > 0 and teacher is None:
        raise ValueError("distill_weight > 0 needs teacher targets")
    if teacher is not None and len(teacher) != len(documents):
        raise ValueError(f"teacher has targets for {len(teacher)} documents, got {len(documents)} documents")
    keep = [i for i, d in enumerate(documents) if len(d)]  # teacher rows follow the original order
    docs = [torch.as_tensor(documents[i], dtype=torch.long) for i in keep]
    if not docs:
        raise ValueError("no documents to train on")
    valid = [torch.as_tensor(d, dtype=torch.long) for d in (valid or []) if len(d)]
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    losses: list[float] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    best: dict = {"nll": math.inf, "step": 0, "state": None}

    def validate() -> None:
        nll = validation_nll(model, valid)
        model.train()
        if nll < best["nll"]:
            best.update(nll=nll, step=steps, state={k: v.clone() for k, v in model.state_dict().items()})
        logger.info("GRU LM step %d: validation NLL %.4f (best %.4f at step %d)", steps, nll,
                    best["nll"], best["step"])

    model.train()
    steps = 0
    while steps < config.max_steps and (steps == 0 or time.process_time() - cpu0 < cpu_seconds):
        inputs, targets, rows, starts = _chunk_batch(docs, lengths / lengths.sum(), model.vocab_size,
                                                     config, rng)
        logits, _ = model(inputs)  # (batch, length, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if config.distill_weight > 0:
            ids, probs = teacher.window([keep[r] for r in rows], starts, config.length)  # (batch, length, k)
            picked = torch.log_softmax(logits, -1).gather(-1, ids)
            soft = -(probs.to(picked.dtype) * picked).sum(-1)[targets != -100].mean()
            loss = loss + config.distill_weight * soft
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        opt.step()
        losses.append(float(loss.detach()))
        steps += 1
        if steps % 200 == 0:
            logger.info("GRU LM step %d: loss %.4f", steps, sum(losses[-200:]) / 200)
        if valid and steps % config.valid_every == 0:
            validate()
    out = {"steps": steps}
    if valid:
        validate()
        model.load_state_dict(best["state"])
        out.update(best_step=best["step"], best_valid_nll=best["nll"])
    model.eval()
    return {**out, "cpu_seconds": time.process_time() - cpu0,
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
