import pytest
import torch

from vmt.encoders.features import LMFeatureExtractor

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.mark.lm
def test_smollm2_reverse_features_match_a_direct_reversed_forward(smollm2):
    model, tokenizer = smollm2
    mid = LMFeatureExtractor(model, layer=12, direction="reverse", model_name="smollm2")
    top = LMFeatureExtractor(model, layer=-1, direction="reverse", model_name="smollm2")
    ids = torch.tensor(tokenizer.encode(TEXT, add_special_tokens=False))
    n = len(ids)
    assert 8 <= n <= 16
    tokens = torch.stack([ids, torch.cat([ids[:6], ids[:1].expand(n - 6)])])
    lengths = torch.tensor([n, 6])
    feats = {12: mid(tokens, lengths), 30: top(tokens, lengths)}
    for f in feats.values():
        assert f.shape == (2, n, 576) and torch.isfinite(f).all()
        assert torch.all(f[1, 6:] == 0)
    for b, k in [(0, 0), (0, n - 1), (1, 2)]:
        suffix = tokens[b, k : int(lengths[b])].flip(0)
        with torch.no_grad():
            hidden = model.model(suffix[None], output_hidden_states=True).hidden_states
        for layer, f in feats.items():
            # float32 with 576-wide sums over up to 30 blocks; batched and single-row kernels
            # round differently. Mid-layer activations reach a few hundred, hence the atol.
            torch.testing.assert_close(f[b, k], hidden[layer][0, -1], rtol=1e-4, atol=1e-3)
