"""Reverse-model training data: reversed documents, reversed forward features, frozen sharing."""

import pytest
import torch

from vmt.encoders.features import LMFeatureExtractor
from vmt.inference.reverse import (
    features_lookup_from,
    freeze_shared_parts,
    reverse_documents,
    reverse_feature_lookup,
)
from vmt.inference.train import TrainConfig, fit
from vmt.models import VMTConfig
from vmt.models.vmt import VariationalMarkovTransformer
from vmt.testing import tiny_llama


def test_reversed_forward_features_summarise_what_follows_in_reversed_time():
    lm = tiny_llama(vocab_size=23, hidden_size=16)
    fwd = LMFeatureExtractor(lm, layer=2, direction="forward")
    docs = [torch.randint(2, 23, (n,)) for n in (7, 4)]
    with torch.no_grad():
        feats = [fwd(d[None], torch.tensor([len(d)]))[0] for d in docs]
    lookup = reverse_feature_lookup(features_lookup_from(feats))
    rev = reverse_documents(docs)
    for i, d in enumerate(docs):
        f, ahead = lookup(i)
        torch.testing.assert_close(rev[i], d.flip(0))
        assert ahead.tolist() == list(range(len(d), 0, -1))
        # position j of the reversed document (token y_{n-j}) carries the forward reading of
        # y_1 .. y_{n-j}: the same as reading that prefix alone (causal attention; float32
        # rounding only)
        for j in range(len(d)):
            prefix = d[: len(d) - j]
            with torch.no_grad():
                alone = fwd(prefix[None], torch.tensor([len(prefix)]))[0, -1]
            torch.testing.assert_close(f[j], alone, rtol=1e-4, atol=1e-5)


def test_bad_documents_raise():
    with pytest.raises(ValueError, match="document 1 must be a non-empty"):
        reverse_documents([torch.zeros(3, dtype=torch.long), torch.zeros(0, dtype=torch.long)])


def test_reverse_training_moves_only_the_reverse_parts_when_shared_parts_are_frozen():
    config = VMTConfig(state_dim=3, obs_dim=9, feature_dim=5, guide_hidden=8, transition_hidden=8,
                       prior_components=2, max_window=8, reverse=True)
    vmt = VariationalMarkovTransformer(config)
    docs = [torch.randint(0, 9, (6,)) for _ in range(8)]
    feats = [torch.randn(6, 5) for _ in docs]
    trainable = freeze_shared_parts(vmt)
    assert trainable and all(n.startswith(("reverse_transition", "reverse_guide_net")) for n in trainable)
    before = {n: p.detach().clone() for n, p in vmt.named_parameters()}
    result = fit(vmt, reverse_documents(docs),
                 TrainConfig(direction="reverse", steps=3, batch_size=4, max_length=6, log_every=1),
                 features=reverse_feature_lookup(features_lookup_from(feats)), progress=False)
    assert result.ok
    for name, p in vmt.named_parameters():
        if name not in trainable:  # prior, emission, forward parts: untouched
            assert torch.equal(before[name], p.detach()), name
    assert any(not torch.equal(before[n], dict(vmt.named_parameters())[n]) for n in trainable)
    with pytest.raises(ValueError, match="no reverse parts"):
        freeze_shared_parts(VariationalMarkovTransformer(VMTConfig(state_dim=3, obs_dim=9)))
