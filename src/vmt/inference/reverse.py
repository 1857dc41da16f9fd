"""Training data for the reverse VMT, and freezing the parts it shares with a forward one.

The reverse VMT is a forward VMT in reversed time: ``z_j = y_{n+1-j}``, with the reverse
transition ``p_r(x_{k-1} | x_k)`` and guide ``q_r`` reading features ``h_k`` of a *forward*
reading (``h_k`` summarises ``y_1 .. y_k``). Reversed in time alongside the tokens, those
features summarise ``z_j .. z_n``, exactly what the training loops expect of a guide's input,
so :func:`vmt.inference.train.fit` with ``TrainConfig(direction="reverse")`` trains ``p_r`` and
``q_r`` on :func:`reverse_documents` (a suffix of a reversed document is a prefix of the
original: the suffix-parallel ELBO becomes the prefix-parallel one). The prior ``p(x)`` and
the emission ``p(y | x)`` are shared; :func:`freeze_shared_parts` keeps those of a fitted
forward model fixed while the reverse parts train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from vmt.inference.subsequences import FeatureLookup

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer


def reverse_documents(documents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each document ``(time,)`` or ``(time, obs)`` reversed along time."""
    out = []
    for i, doc in enumerate(documents):
        if doc.dim() not in (1, 2) or doc.shape[0] == 0:
            raise ValueError(f"document {i} must be a non-empty (time,) or (time, obs), got {tuple(doc.shape)}")
        out.append(doc.flip(0))
    return out


def reverse_feature_lookup(forward_features: FeatureLookup) -> FeatureLookup:
    """Time-reverse a lookup of forward-reading features.

    Args:
        forward_features: ``i -> (features (time, feature), ahead (time,))`` for document ``i``
            in its original order, with ``features[k]`` summarising ``y_1 .. y_k`` (e.g. a
            :class:`~vmt.encoders.cache.FeatureCache` built with a forward
            :class:`~vmt.encoders.features.LMFeatureExtractor`).

    Returns:
        A lookup for the reversed document: features flipped in time, and ``ahead`` the number
        of reversed tokens still to come (``time - j``).
    """

    def lookup(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        features, ahead = forward_features(i)
        if features.dim() != 2:
            raise ValueError(f"features of document {i} must be (time, feature), got {tuple(features.shape)}")
        steps = features.shape[0]
        return features.flip(0), torch.arange(steps, 0, -1, dtype=torch.long, device=features.device)

    return lookup


def features_lookup_from(features: Sequence[torch.Tensor]) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """A :data:`FeatureLookup` over a list of ``(time, feature)`` tensors."""
    feats = list(features)

    def lookup(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = feats[i]
        return f, torch.arange(f.shape[0], 0, -1, dtype=torch.long, device=f.device)

    return lookup


def freeze_shared_parts(vmt: VariationalMarkovTransformer, freeze_reader: bool = True) -> list[str]:
    """Stop gradients into the prior and emission (and the reader) of a fitted model.

    Returns the names of the parameters that stay trainable (the reverse parts, plus whatever
    else was not frozen). Raises ``ValueError`` if the model has no reverse networks.
    """
    vmt.guide_net_for("reverse")  # raises without reverse networks
    parts = [vmt.prior, vmt.emission, vmt.transition, vmt.guide_net]
    if getattr(vmt, "tokens", None) is not None:  # the token family's shared embeddings and head
        parts.append(vmt.tokens)
    if freeze_reader and vmt.reader is not None:
        parts.append(vmt.reader)
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(False)
    return [name for name, p in vmt.named_parameters() if p.requires_grad]
