import pytest
import torch

from vmt.encoders.small_readers import GRUReader, TransformerReader

VOCAB, FEAT = 13, 5


def _make(cls, kind, direction="reverse"):
    kwargs = {"vocab_size": VOCAB, "embed_dim": 6} if kind == "tokens" else {"feature_dim": FEAT}
    if cls is GRUReader:
        return GRUReader(kind, 8, num_layers=2, direction=direction, **kwargs).double()
    return TransformerReader(
        kind, 8, num_layers=2, direction=direction, num_heads=2, **kwargs
    ).double()


def _inputs(kind, batch=3, time=7):
    if kind == "tokens":
        return torch.randint(0, VOCAB, (batch, time))
    return torch.randn(batch, time, FEAT, dtype=torch.float64)


def _perturb(x, sl):
    x = x.clone()
    if x.dtype == torch.int64:
        x[sl] = (x[sl] + 1) % VOCAB
    else:
        x[sl] = x[sl] + 1.0
    return x


CASES = [(c, k) for c in (GRUReader, TransformerReader) for k in ("tokens", "features")]


@pytest.mark.parametrize(("cls", "kind"), CASES)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_batched_output_equals_a_direct_reading_of_each_suffix_or_prefix(cls, kind, direction):
    reader = _make(cls, kind, direction).eval()
    # The oracle reads each suffix (reversed by hand) or prefix alone, left to right, with a
    # forward-direction twin holding the same weights.
    twin = _make(cls, kind, "forward").eval()
    twin.load_state_dict(reader.state_dict())
    x = _inputs(kind)
    lengths = torch.tensor([7, 4, 1])
    out = reader(x, lengths)
    assert out.shape == (3, 7, 8)
    for b in range(3):
        n = int(lengths[b])
        for k in range(n):
            row = (x[b, k:n].flip(0) if direction == "reverse" else x[b, : k + 1])[None]
            expected = twin(row, torch.tensor([row.shape[1]]))[0, -1]
            # float64; batched vs single-row kernels differ only in rounding.
            torch.testing.assert_close(out[b, k], expected, atol=1e-10, rtol=1e-10)
        assert torch.all(out[b, n:] == 0)


@pytest.mark.parametrize(("cls", "kind"), CASES)
def test_reverse_output_ignores_the_past_and_the_padding(cls, kind):
    reader = _make(cls, kind).eval()
    x = _inputs(kind)
    lengths = torch.tensor([7, 5, 3])
    out = reader(x, lengths)
    k = 2
    past_changed = reader(_perturb(x, (slice(None), slice(0, k))), lengths)
    torch.testing.assert_close(past_changed[:, k:], out[:, k:], atol=0, rtol=0)
    assert (past_changed[:, :k] - out[:, :k]).abs().max() > 1e-6  # the test can see changes
    padding_changed = _perturb(x, (slice(1, 3), slice(5, None)))
    torch.testing.assert_close(reader(padding_changed, lengths), out, atol=0, rtol=0)
    future_changed = reader(_perturb(x, (slice(None), slice(k, k + 1))), lengths)
    assert (future_changed[0, : k + 1] - out[0, : k + 1]).abs().min() > 0  # k and before see it


def test_gradients_reach_every_parameter():
    for cls, kind in CASES:
        reader = _make(cls, kind)
        reader(_inputs(kind), torch.tensor([7, 4, 1])).square().sum().backward()
        missing = [n for n, p in reader.named_parameters() if p.grad is None]
        assert missing == [], (cls.__name__, kind, missing)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        GRUReader("tokens", 8)
    with pytest.raises(ValueError, match="feature_dim"):
        TransformerReader("features", 8)
    with pytest.raises(ValueError, match="input must be"):
        GRUReader("pixels", 8, feature_dim=3)
    with pytest.raises(ValueError, match="divisible"):
        TransformerReader("features", 10, num_heads=4, feature_dim=3)
    reader = GRUReader("features", 8, feature_dim=FEAT)
    with pytest.raises(ValueError, match=r"\(batch, time, 5\)"):
        reader(torch.randn(2, 4, 3), torch.tensor([4, 4]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        reader(torch.randn(2, 4, FEAT), torch.tensor([5, 4]))
    tokens = GRUReader("tokens", 8, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="int64"):
        tokens(torch.zeros(2, 4), torch.tensor([4, 4]))


@pytest.mark.parametrize(("cls", "kind"), CASES)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_rows_without_padding_read_as_padded_rows_do(cls, kind, direction):
    """Full-length rows skip the masking and read with a plain flip: the same values as the
    masked path, which a row padded by one position takes."""
    torch.manual_seed(0)
    reader = _make(cls, kind, direction).eval()
    x = _inputs(kind, batch=3, time=6)
    padded = torch.cat([x, _inputs(kind, batch=3, time=1)], dim=1)
    lengths = torch.full((3,), 6)
    with torch.no_grad():
        full, reference = reader(x, lengths), reader(padded, lengths)[:, :6]
    torch.testing.assert_close(full, reference, rtol=0, atol=1e-9)
