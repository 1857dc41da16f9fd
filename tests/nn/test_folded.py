import pytest
import torch

from vmt.nn.blocks import RelativePositionBias, reverse_padded
from vmt.nn.folded import FoldedTransformer, FoldedTransformerConfig
from vmt.nn.lm import Streamer

# All comparisons run in float64; outputs agree to round-off (~1e-15 relative), so 1e-10
# leaves ample margin while any masking or offset bug gives O(0.1) differences.
TOL = 1e-10


def make(l=4, vocab=11, input_dim=None, **kw):  # noqa: E741
    cfg = FoldedTransformerConfig(
        segment_length=l,
        d_model=16,
        n_heads=2,
        d_ff=24,
        n_local=kw.pop("n_local", 2),
        n_global=kw.pop("n_global", 2),
        vocab_size=None if input_dim else vocab,
        input_dim=input_dim,
        **kw,
    )
    model = FoldedTransformer(cfg).double().eval()
    with torch.no_grad():  # non-zero position biases so that offset bugs show
        for m in model.modules():
            if isinstance(m, RelativePositionBias):
                m.table.normal_()
    return model


def local_ref(model, ref, x, valid):
    """Reference local stack applied to each segment separately."""
    l = model.config.segment_length  # noqa: E741
    out = []
    for s in range(0, x.shape[1], l):
        out.append(ref.stack(model.local_blocks, model.local_bias, x[:, s : s + l],
                             valid[:, s : s + l]))
    return torch.cat(out, 1)


@pytest.mark.parametrize("time", [4, 3, 1])
def test_one_segment_equals_plain_causal_transformer(ref, time):
    model = make(l=4)
    tokens = torch.randint(11, (3, time))
    x = model.embed(tokens)
    valid = torch.ones(3, time, dtype=torch.bool)
    h = ref.stack(list(model.local_blocks) + list(model.global_blocks),
                  list(model.local_bias) + list(model.global_bias), x, valid)
    expected = model.norm(h)
    assert (model(tokens) - expected).abs().max() < TOL


def test_carry_off_equals_independent_segments(ref):
    model = make(l=4, carry=False)
    tokens = torch.randint(11, (2, 12))
    plain = make(l=4)
    plain.load_state_dict(model.state_dict())
    out = model(tokens)
    for s in range(3):
        seg = tokens[:, 4 * s : 4 * s + 4]
        assert (out[:, 4 * s : 4 * s + 4] - plain(seg)).abs().max() < TOL


@pytest.mark.parametrize("refresh", [True, False])
def test_second_segment_reads_condensed_first_segment(ref, refresh):
    """Segment 2 = global stack over [global output of segment 1 ; local output of segment 2]."""
    model = make(l=4, refresh_memory=refresh)
    tokens = torch.randint(11, (2, 8))
    x = model.embed(tokens)
    valid = torch.ones(2, 8, dtype=torch.bool)
    loc = local_ref(model, ref, x, valid)
    c1 = ref.stack(model.global_blocks, model.global_bias, loc[:, :4], valid[:, :4])
    if refresh:
        z = ref.stack(model.global_blocks, model.global_bias, torch.cat([c1, loc[:, 4:]], 1),
                      valid)
        g2 = z[:, 4:]
    else:
        g2 = loc[:, 4:]
        for block, rel in zip(model.global_blocks, model.global_bias, strict=True):
            g2 = ref.layer(block, rel, g2, torch.cat([c1, g2], 1), torch.arange(4),
                           torch.arange(-4, 4), valid)
    expected = model.norm(torch.cat([c1, g2], 1))
    assert (model(tokens) - expected).abs().max() < TOL


@pytest.mark.parametrize("features", [False, True])
def test_streaming_equals_forward(features):
    model = make(l=4, input_dim=5 if features else None)
    inputs = torch.randn(3, 19, 5, dtype=torch.float64) if features else torch.randint(11, (3, 19))
    full = model(inputs)
    # segment by segment
    state = model.initial_state(3)
    outs = []
    for s in range(0, 19, 4):
        h, state = model.step(inputs[:, s : s + 4], state)
        outs.append(h)
    assert (torch.cat(outs, 1) - full).abs().max() < TOL
    # token by token, and in uneven chunks
    stream = Streamer(model, 3)
    tok = torch.cat([stream.push(inputs[:, t : t + 1]) for t in range(19)], 1)
    assert (tok - full).abs().max() < TOL
    stream = Streamer(model, 3)
    chunks = torch.cat([stream.push(inputs[:, a:b]) for a, b in [(0, 3), (3, 10), (10, 19)]], 1)
    assert (chunks - full).abs().max() < TOL


def test_streaming_state_has_constant_size():
    model = make(l=4)
    state = model.initial_state(2)
    sizes = []
    for _ in range(6):
        _, state = model.step(torch.randint(11, (2, 4)), state)
        sizes.append(state.nbytes())
    assert len(set(sizes)) == 1


def test_length_not_multiple_of_l_is_padded_and_masked():
    model = make(l=4)
    tokens = torch.randint(11, (3, 10))  # 2.5 segments
    lengths = torch.tensor([10, 7, 5])
    out = model(tokens, lengths)
    assert out.shape == (3, 10, 16)
    for b in range(3):
        n = int(lengths[b])
        alone = model(tokens[b : b + 1, :n])
        assert (out[b, :n] - alone[0]).abs().max() < TOL
        assert torch.all(out[b, n:] == 0)
    # padding content never matters
    other = tokens.clone()
    other[1, 7:] = (other[1, 7:] + 1) % 11
    assert (model(other, lengths) - out).abs().max() < TOL


def test_context_reaches_many_segments_back():
    model = make(l=4)
    tokens = torch.randint(11, (1, 40))
    other = tokens.clone()
    other[0, 0] = (other[0, 0] + 1) % 11
    diff = (model(tokens) - model(other)).abs()
    # position 39 is 9 segments (36+ tokens) after position 0, beyond any window of 2l = 8
    assert diff[0, 39].max() > 1e-6
    cut = make(l=4, carry=False)
    diff_cut = (cut(tokens) - cut(other)).abs()
    assert diff_cut[0, 4:].max() == 0


@pytest.mark.parametrize("k,reaches", [(None, True), (4, True), (2, False), (1, False)])
def test_gradient_truncation(k, reaches):
    model = make(l=4, input_dim=3, grad_segments=k)
    x = torch.randn(1, 16, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 16, dtype=torch.float64)  # (a plain sum of layer-normed rows is flat)
    (model(x)[0, 12:] * w).sum().backward()  # loss on segment 3 (0-based)
    g0 = x.grad[0, :4].abs().max()  # gradient reaching segment 0
    assert (g0 > 1e-8) == reaches
    assert x.grad[0, 12:].abs().max() > 1e-8


def test_reverse_reader():
    model = make(l=4, input_dim=3)
    x = torch.randn(2, 11, 3, dtype=torch.float64)
    lengths = torch.tensor([11, 6])
    out = model(x, lengths, reverse=True)
    expected = reverse_padded(model(reverse_padded(x, lengths), lengths), lengths)
    assert (out - expected).abs().max() < TOL
    # out[b, k] depends on x[b, k:len] only: changing x[:, :5] leaves out[:, 5:] alone
    y = x.clone()
    y[:, :5] += 1.0
    out_y = model(y, lengths, reverse=True)
    assert (out_y[:, 5:] - out[:, 5:]).abs().max() < TOL
    assert (out_y[:, 4] - out[:, 4]).abs().max() > 1e-6
    # and it does see far ahead: position 0 of row 0 depends on the last input (10 steps)
    z = x.clone()
    z[0, 10] += 1.0
    assert (model(z, lengths, reverse=True)[0, 0] - out[0, 0]).abs().max() > 1e-6


def test_bad_inputs():
    with pytest.raises(ValueError, match="segment_length"):
        FoldedTransformerConfig(segment_length=0, vocab_size=5)
    with pytest.raises(ValueError, match="exactly one"):
        FoldedTransformerConfig(vocab_size=5, input_dim=3)
    with pytest.raises(ValueError, match="exactly one"):
        FoldedTransformerConfig()
    with pytest.raises(ValueError, match="must divide"):
        FoldedTransformerConfig(vocab_size=5, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="grad_segments"):
        FoldedTransformerConfig(vocab_size=5, grad_segments=0)
    feat = make(l=4, input_dim=3)
    with pytest.raises(ValueError, match=r"\(batch, time, 3\).*\(2, 5, 4\)"):
        feat(torch.randn(2, 5, 4, dtype=torch.float64))
    tok = make(l=4)
    with pytest.raises(ValueError, match="token ids"):
        tok(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        tok(torch.tensor([[0, 11]]))
    with pytest.raises(ValueError, match="lengths"):
        tok(torch.zeros(2, 5, dtype=torch.int64), torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        tok(torch.zeros(2, 5, dtype=torch.int64), torch.tensor([5]))
    with pytest.raises(ValueError, match="1 to 4 time steps"):
        tok.step(torch.zeros(2, 5, dtype=torch.int64), tok.initial_state(2))
    with pytest.raises(ValueError, match="state has batch 3"):
        tok.step(torch.zeros(2, 4, dtype=torch.int64), tok.initial_state(3))
