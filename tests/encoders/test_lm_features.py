import pytest
import torch

from vmt.encoders.features import LMFeatureExtractor, flip_within_lengths
from vmt.testing import tiny_llama

VOCAB = 53


def _model(num_layers=3, seed=0):
    # float64 so direct and batched computations agree to rounding (1e-10 tolerances below).
    return tiny_llama(vocab_size=VOCAB, num_layers=num_layers, seed=seed, dtype=torch.float64)


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, 9), generator=g)
    lengths = torch.tensor([9, 5, 1])
    return tokens, lengths


def _direct(model, ids, layer):
    """Hidden state of the last position of ``ids`` at ``layer`` (HF's own computation)."""
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
    return out.hidden_states[layer][0, -1]


def test_flip_within_lengths_is_a_per_row_reversal():
    x = torch.arange(12).reshape(2, 6)
    y = flip_within_lengths(x, torch.tensor([6, 3]))
    assert y[0].tolist() == [5, 4, 3, 2, 1, 0]
    assert y[1, :3].tolist() == [8, 7, 6]
    z = flip_within_lengths(x[:, :, None].expand(2, 6, 2), torch.tensor([6, 3]))
    assert torch.equal(z[..., 1], y)


@pytest.mark.parametrize("layer", [1, 2, -1])
def test_reverse_features_equal_a_direct_reversed_reading_of_each_suffix(layer):
    model = _model()
    ex = LMFeatureExtractor(model, layer=layer, direction="reverse", model_name="tiny")
    tokens, lengths = _batch()
    feats = ex(tokens, lengths)
    assert feats.shape == (3, 9, 32)
    hf_layer = 3 if layer == -1 else layer  # HF's last hidden state includes the final norm
    for b in range(3):
        n = int(lengths[b])
        for k in range(n):
            expected = _direct(model, tokens[b, k:n].flip(0), hf_layer)
            # float64 throughout; only summation order differs between batched and direct.
            torch.testing.assert_close(feats[b, k], expected, atol=1e-10, rtol=1e-10)
        assert torch.all(feats[b, n:] == 0)


def test_forward_features_equal_a_direct_reading_of_each_prefix():
    model = _model()
    ex = LMFeatureExtractor(model, layer=2, direction="forward", model_name="tiny")
    tokens, lengths = _batch()
    feats = ex(tokens, lengths)
    for b in range(3):
        n = int(lengths[b])
        for k in range(n):
            expected = _direct(model, tokens[b, : k + 1], 2)
            torch.testing.assert_close(feats[b, k], expected, atol=1e-10, rtol=1e-10)
        assert torch.all(feats[b, n:] == 0)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_padding_content_is_ignored(direction):
    ex = LMFeatureExtractor(_model(), layer=2, direction=direction)
    tokens, lengths = _batch()
    other = tokens.clone()
    other[1, 5:] = (other[1, 5:] + 7) % VOCAB
    other[2, 1:] = 0
    torch.testing.assert_close(ex(tokens, lengths), ex(other, lengths), atol=0, rtol=0)


@pytest.mark.parametrize("layer", [1, 2])
def test_truncated_layers_equal_hidden_states_of_the_full_model(layer):
    model = _model()
    ex = LMFeatureExtractor(model, layer=layer, direction="forward")
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        full = model(tokens, output_hidden_states=True).hidden_states
    feats = ex(tokens, torch.tensor([7, 7]))
    torch.testing.assert_close(feats, full[layer], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ex.hidden_size, 32)


def test_only_the_first_layer_blocks_run():
    model = _model(num_layers=4)
    calls = []
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    norm_calls = []
    model.model.norm.register_forward_hook(lambda *_: norm_calls.append(1))
    ex = LMFeatureExtractor(model, layer=2)
    ex(torch.randint(0, VOCAB, (1, 5)), torch.tensor([5]))
    assert calls == [0, 1] and norm_calls == []
    calls.clear()
    LMFeatureExtractor(model, layer=-1)(torch.randint(0, VOCAB, (1, 5)), torch.tensor([5]))
    assert calls == [0, 1, 2, 3] and norm_calls == [1]


def test_frozen_mode_has_no_gradients_and_keeps_the_lm_in_eval():
    ex = LMFeatureExtractor(_model(), layer=2)
    ex.train()
    assert not ex.lm.training
    assert all(not p.requires_grad for p in ex.parameters())
    assert ex.trainable_parameters() == []
    out = ex(*_batch())
    assert not out.requires_grad


def test_full_mode_trains_the_lm():
    ex = LMFeatureExtractor(_model(), layer=2, trainable="full")
    out = ex(*_batch())
    out.square().sum().backward()
    used = [*ex.lm.model.layers[:2].parameters(), ex.lm.model.embed_tokens.weight]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)
    assert all(p.grad is None for p in ex.lm.model.layers[2].parameters())


def test_fingerprint_tracks_layer_direction_and_weights():
    fps = {
        LMFeatureExtractor(_model(), layer=2, direction="reverse").fingerprint,
        LMFeatureExtractor(_model(), layer=1, direction="reverse").fingerprint,
        LMFeatureExtractor(_model(), layer=2, direction="forward").fingerprint,
        LMFeatureExtractor(_model(seed=1), layer=2, direction="reverse").fingerprint,
        LMFeatureExtractor(_model(num_layers=4), layer=2, direction="reverse").fingerprint,
    }
    assert len(fps) == 5
    a = LMFeatureExtractor(_model(), layer=2, model_name="tiny").fingerprint
    b = LMFeatureExtractor(_model(), layer=2, model_name="tiny").fingerprint
    assert a == b and a.startswith("tiny|")


def test_invalid_arguments_are_rejected():
    model = _model()
    with pytest.raises(ValueError, match="layer must be in 1..3"):
        LMFeatureExtractor(model, layer=4)
    with pytest.raises(ValueError, match="direction"):
        LMFeatureExtractor(model, direction="backward")
    with pytest.raises(ValueError, match="trainable"):
        LMFeatureExtractor(model, trainable="some")
    ex = LMFeatureExtractor(model, layer=1)
    tokens, _ = _batch()
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 9\]"):
        ex(tokens, torch.tensor([9, 0, 1]))
    with pytest.raises(ValueError, match=r"lengths must be \(3,\)"):
        ex(tokens, torch.tensor([9, 1]))
    with pytest.raises(ValueError, match="int64"):
        ex(tokens.int(), torch.tensor([9, 5, 1]))
