import pytest
import torch

from vmt.nn.baselines import (
    SegmentCacheConfig,
    segment_cache_transformer,
    windowed_transformer,
)
from vmt.nn.blocks import RelativePositionBias
from vmt.nn.folded import FoldedTransformer, FoldedTransformerConfig
from vmt.nn.lm import Streamer

# float64 throughout; agreement is to round-off, 1e-10 leaves margin while a wrong mask or
# offset changes outputs by O(0.1).
TOL = 1e-10
KW = dict(d_model=16, n_heads=2, d_ff=24, vocab_size=11)


def randomise_biases(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RelativePositionBias):
                m.table.normal_()
    return model.double().eval()


def test_windowed_equals_dense_band_attention(ref):
    """Every layer: position i attends to j in (i - 2l, i], computed densely over the sequence."""
    model = randomise_biases(windowed_transformer(4, n_layers=3, **KW))
    tokens = torch.randint(11, (3, 21))
    lengths = torch.tensor([21, 13, 9])
    valid = torch.arange(21)[None] < lengths[:, None]
    x = model.embed(tokens)
    h = ref.stack(model.blocks, model.bias, x, valid)  # rel.window = 8 gives the band
    expected = model.norm(h) * valid[..., None]
    assert (model(tokens, lengths) - expected).abs().max() < TOL


def test_segment_cache_equals_reference_loop(ref):
    """Transformer-XL: layer n of segment s attends to layer-n inputs of segment s-1 and s."""
    model = randomise_biases(segment_cache_transformer(4, n_layers=3, **KW))
    tokens = torch.randint(11, (2, 12))
    x = model.embed(tokens)
    valid = torch.ones(2, 8, dtype=torch.bool)
    prev = None
    outs = []
    for s in range(3):
        h = x[:, 4 * s : 4 * s + 4]
        inputs = []
        for n, (block, rel) in enumerate(zip(model.blocks, model.bias, strict=True)):
            inputs.append(h)
            if prev is None:
                h = ref.layer(block, rel, h, h, torch.arange(4), torch.arange(4), valid[:, :4])
            else:
                keys = torch.cat([prev[n], h], 1)
                h = ref.layer(block, rel, h, keys, torch.arange(4), torch.arange(-4, 4), valid)
        prev = inputs
        outs.append(h)
    expected = model.norm(torch.cat(outs, 1))
    assert (model(tokens) - expected).abs().max() < TOL


@pytest.mark.parametrize("factory", [windowed_transformer, segment_cache_transformer])
def test_streaming_equals_forward(factory):
    model = randomise_biases(factory(4, n_layers=2, **KW))
    tokens = torch.randint(11, (2, 17))
    full = model(tokens)
    stream = Streamer(model, 2)
    out = torch.cat([stream.push(tokens[:, t : t + 1]) for t in range(17)], 1)
    assert (out - full).abs().max() < TOL


def test_reach_is_bounded():
    """With n layers of window 2l the reach is n (2l - 1) positions and no more."""
    l, n = 4, 2  # noqa: E741
    reach = n * (2 * l - 1)
    for factory in (windowed_transformer, segment_cache_transformer):
        model = randomise_biases(factory(l, n_layers=n, **KW))
        tokens = torch.randint(11, (1, 40))
        other = tokens.clone()
        other[0, 5] = (other[0, 5] + 1) % 11
        diff = (model(tokens) - model(other)).abs().amax(-1)[0]
        assert diff[5 + reach + 1 :].max() == 0
        assert diff[5] > 1e-6


def test_segment_cache_stops_the_gradient():
    model = segment_cache_transformer(4, n_layers=2, d_model=16, n_heads=2, d_ff=24, input_dim=3)
    model = randomise_biases(model)
    x = torch.randn(1, 12, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 16, dtype=torch.float64)
    (model(x)[0, 8:] * w).sum().backward()
    assert x.grad[0, 4:8].abs().max() == 0  # the cache is a constant for the gradient
    windowed = randomise_biases(
        windowed_transformer(4, n_layers=2, d_model=16, n_heads=2, d_ff=24, input_dim=3)
    )
    x.grad = None
    (windowed(x)[0, 8:] * w).sum().backward()
    assert x.grad[0, 4:8].abs().max() > 1e-8


def test_parameter_counts_match_folded():
    l, heads = 16, 4  # noqa: E741
    kw = dict(d_model=64, n_heads=heads, d_ff=128, vocab_size=40)
    folded = FoldedTransformer(FoldedTransformerConfig(segment_length=l, n_local=2, n_global=2,
                                                       **kw))
    count = sum(p.numel() for p in folded.parameters())
    for factory in (windowed_transformer, segment_cache_transformer):
        base = sum(p.numel() for p in factory(l, n_layers=4, **kw).parameters())
        # the only difference: the two local bias tables have l offsets instead of 2l
        assert base - count == 2 * heads * l


def test_bad_config():
    with pytest.raises(ValueError, match="window=40"):
        SegmentCacheConfig(segment_length=8, cache_segments=1, window=40, vocab_size=5)
    with pytest.raises(ValueError, match="segment_length"):
        SegmentCacheConfig(segment_length=0, vocab_size=5)
    model = windowed_transformer(4, **KW)
    with pytest.raises(ValueError, match="1 to 4 time steps"):
        model.step(torch.zeros(1, 6, dtype=torch.int64), model.initial_state(1))
