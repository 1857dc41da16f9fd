"""A folded-transformer LM serves as the MEP module's short-window base model q_T."""

import numpy as np
import torch

from vmt.mep.bases import WindowedLM
from vmt.nn.folded import FoldedTransformer, FoldedTransformerConfig
from vmt.nn.lm import SegmentLM


def test_folded_segment_lm_is_a_windowed_mep_base():
    vocab, window = 7, 6
    body = FoldedTransformer(FoldedTransformerConfig(segment_length=4, d_model=16, n_heads=2,
                                                     d_ff=32, vocab_size=vocab))
    lm = SegmentLM(body, vocab).eval()
    base = WindowedLM(lm, window=window, batch_size=3)
    tokens = np.random.default_rng(0).integers(0, vocab, 40)
    positions = np.arange(window, 40, 5)
    logp = base.log_probs_at(tokens, positions)
    assert logp.shape == (len(positions), vocab)
    # Each row is the LM's next-token distribution given exactly the `window` tokens before
    # the position (float32 model, log-probabilities compared to 1e-5).
    for row, pos in enumerate(positions):
        ctx = torch.as_tensor(tokens[pos - window : pos])[None]
        with torch.no_grad():
            direct = torch.log_softmax(lm(ctx)[0, -1].double(), -1).numpy()
        np.testing.assert_allclose(logp[row], direct, atol=1e-5)
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, atol=1e-9)
