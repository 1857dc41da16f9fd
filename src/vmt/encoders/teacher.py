"""Teacher-forced next-token distributions of a pretrained LM, for distillation.

For every position ``k`` of a document the frozen causal LM gives ``p_LM(y_k | y_<k)`` (the
first position conditions on the beginning-of-text token). Only the ``k`` most likely tokens
are kept, renormalised, and mapped into a compact emission vocabulary (tokens merged into
``<unk>`` keep their own entries, all with ``<unk>``'s id). Documents are read in windows of
``window`` tokens that overlap by ``context`` tokens, so every position but the first
``window`` of a document sees at least ``context`` tokens before it.

Targets are computed once per (model, corpus, vocabulary, k, window) and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vmt.paths import cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherTargets:
    """Per document: ``ids (time, k)`` compact token ids and ``probs (time, k)`` summing to 1."""

    ids: list[torch.Tensor]
    probs: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, doc: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[doc], self.probs[doc]

    def window(self, documents: Sequence[int], offsets: Sequence[int], steps: int):
        """``(ids, probs)`` each ``(batch, time, k)`` for rows reading ``documents`` from
        ``offsets``; positions past a document's end get probability 0."""
        k = self.ids[0].shape[1]
        ids = torch.zeros(len(documents), steps, k, dtype=torch.long)
        probs = torch.zeros(len(documents), steps, k)
        for r, (d, o) in enumerate(zip(documents, offsets)):
            seg_ids, seg_probs = self.ids[d][o : o + steps], self.probs[d][o : o + steps]
            ids[r, : len(seg_ids)] = seg_ids
            probs[r, : len(seg_probs)] = seg_probs
        return ids, probs

    @classmethod
    @torch.no_grad()
    def build(cls, lm, documents: Sequence[torch.Tensor], encode, *, bos_id: int, key: str,
              top_k: int = 32, window: int = 512, context: int = 128, progress: bool = True,
              root: str | Path | None = None) -> TeacherTargets:
        """Run ``lm`` over ``documents`` (LM ids) or load the cached result.

        Args:
            lm: a causal LM returning ``.logits`` ``(1, time, lm_vocab)``.
            documents: ``(time,)`` int64 LM ids.
            encode: maps LM ids to compact emission ids (e.g. ``Vocabulary.encode``).
            bos_id: the token the first position conditions on.
            key: identifies model, corpus and vocabulary (part of the cache key).
        """
        if not 0 <= context < window:
            raise ValueError(f"need 0 <= context < window, got context={context}, window={window}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        spec = json.dumps({"key": key, "k": top_k, "window": window, "context": context,
                           "bos": bos_id, "documents": [len(d) for d in documents]}, sort_keys=True)
        digest = hashlib.sha256(spec.encode()).hexdigest()[:24]
        folder = (Path(root) if root is not None else cache_dir() / "teacher") / digest
        path = folder / "targets.safetensors"
        if path.is_file():
            try:
                data = load_file(str(path))
                n = len(documents)
                return cls([data[f"ids_{i}"] for i in range(n)], [data[f"probs_{i}"] for i in range(n)])
            except Exception as err:  # a damaged cache is rebuilt, never used
                logger.warning("teacher cache %s unreadable (%s); rebuilding", path, err)
        lm.eval()
        ids, probs = [], []
        bar = tqdm(total=sum(len(d) for d in documents), desc="teacher", unit="tok",
                   disable=not progress)
        stride = window - context
        for doc in documents:
            doc = torch.as_tensor(doc, dtype=torch.long)
            inputs = torch.cat([torch.tensor([bos_id]), doc[:-1]])  # inputs[k] predicts doc[k]
            top_ids = torch.zeros(len(doc), top_k, dtype=torch.long)
            top_p = torch.zeros(len(doc), top_k)
            start = 0
            while True:
                chunk = inputs[start : start + window]
                logits = lm(chunk[None]).logits[0].float()  # (time, lm_vocab)
                keep = 0 if start == 0 else context
                p, i = torch.softmax(logits[keep:], -1).topk(top_k, dim=-1)
                top_ids[start + keep : start + len(chunk)] = i
                top_p[start + keep : start + len(chunk)] = p / p.sum(-1, keepdim=True)
                bar.update(len(chunk) - keep)
                if start + window >= len(inputs):
                    break
                start += stride
            ids.append(encode(top_ids.flatten()).view(len(doc), top_k))
            probs.append(top_p)
        bar.close()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".targets.{torch.randint(0, 1 << 30, ()).item()}.tmp"
        save_file({**{f"ids_{n}": t.contiguous() for n, t in enumerate(ids)},
                   **{f"probs_{n}": t.contiguous() for n, t in enumerate(probs)}}, str(tmp))
        tmp.replace(path)
        return cls(ids, probs)


def soft_cross_entropy(log_probs: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """``mean over active positions of -sum_j probs_j log_probs[ids_j]``.

    ``log_probs (batch, time, vocab)``, ``ids``/``probs (batch, time, k)``, ``mask (batch, time)``.
    """
    picked = log_probs.gather(-1, ids)  # (batch, time, k)
    per = -(probs.to(picked.dtype) * picked).sum(-1)
    return per[mask].mean()
