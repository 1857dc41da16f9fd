"""The reading speed-ups compute what one-window-at-a-time reading computes (float64, seeded)."""

import pytest
import torch

from vmt.inference.reading import ReadConfig, read
from vmt.models.vmt import token_rnn_vmt

VOCAB = 11
SIZES = dict(vocab=VOCAB, state_dim=4, width=6, hidden=8, embed_dim=5, max_skip=8)


def _model(kind: str, small_vmt):
    torch.manual_seed(0)
    if kind == "token":
        return token_rnn_vmt(VOCAB, 3, 2, 8, 64, embed_dim=5).eval()
    return small_vmt(**SIZES, reverse=True, guide=kind).eval()


def _terms(res) -> list:
    """Everything a read returns, tensors and counts."""
    return [res.state, res.path, res.log_lik, res.log_latent, res.log_guide,
            res.scored, res.windows, res.position, res.skipped_to]


def _assert_same(a, b) -> None:
    for x, y in zip(_terms(a), _terms(b), strict=True):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-9, equal_nan=True)
        else:
            assert x == y


def _seeded_read(vmt, tokens, config, **kwargs):
    torch.manual_seed(1)
    return read(vmt, tokens, config, samples=3, **kwargs)


READS = [(1, False, True), (4, False, True), (3, False, False), (1, True, True), (2, True, False)]
CASES = [(kind, *read) for kind in ("gaussian", "flow", "full", "token") for read in READS
         if not (kind == "token" and read[1])]  # the token VMT has no reverse networks to jump with


@pytest.mark.parametrize("kind,skip,jump,score", CASES)
@pytest.mark.parametrize("n", [5, 23, 64])
def test_windows_encoded_together_read_as_one_at_a_time(kind, skip, jump, score, n, float64,
                                                        small_vmt):
    vmt = _model(kind, small_vmt)
    tokens = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n))
    for window in (8, 9):
        one = _seeded_read(vmt, tokens, ReadConfig(window=window, skip=skip, jump=jump, score=score,
                                                   keep_path=True, encode_windows=1))
        for group in (2, 4, 16):
            config = ReadConfig(window=window, skip=skip, jump=jump, score=score, keep_path=True,
                                encode_windows=group)
            _assert_same(one, _seeded_read(vmt, tokens, config))


def test_carried_and_reverse_reads_match_too(float64, small_vmt):
    vmt = _model("gaussian", small_vmt)
    tokens = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(x0=x0), dict(direction="reverse")):
        config = ReadConfig(window=8, skip=2, keep_path=True, encode_windows=1)
        one = _seeded_read(vmt, tokens, config, **kwargs)
        many = _seeded_read(vmt, tokens, ReadConfig(window=8, skip=2, keep_path=True), **kwargs)
        _assert_same(one, many)


def test_encode_windows_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="encode_windows"):
        ReadConfig(encode_windows=0)
