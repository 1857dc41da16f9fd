"""Writing: sampling filters against hand-computed distributions, forward / reverse /
unconditional generation, the chat loop, and a reverse model that learned its prefixes."""

import math

import pytest
import torch

from vmt.encoders.small_readers import GRUReader
from vmt.inference.generation import (
    Conversation,
    SamplingConfig,
    filter_logits,
    sample_unconditional,
    write,
    write_prequel,
)
from vmt.inference.reading import ReadConfig, read
from vmt.inference.reverse import reverse_documents
from vmt.inference.train import TrainConfig, fit
from vmt.models import VMTConfig
from vmt.models.vmt import VariationalMarkovTransformer

P = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)


def probs(config):
    return filter_logits(P.log(), config).softmax(-1)


@pytest.mark.parametrize(
    "config, expected",
    [
        (SamplingConfig(), [0.5, 0.2, 0.15, 0.1, 0.05]),
        (SamplingConfig(top_k=2), [5 / 7, 2 / 7, 0, 0, 0]),
        # mass strictly before each sorted token: 0, .5, .7, .85, .95 -> keep those < 0.8
        (SamplingConfig(top_p=0.8), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        (SamplingConfig(top_p=0.5), [1, 0, 0, 0, 0]),
        (SamplingConfig(top_p=0.01), [1, 0, 0, 0, 0]),
        # top-k first (renormalised .588 .235 .176), then top-p 0.6 keeps two
        (SamplingConfig(top_k=3, top_p=0.6), [5 / 7, 2 / 7, 0, 0, 0]),
    ],
)
def test_filters_match_hand_computed_distributions(config, expected):
    # float64 softmax of exact logs: agreement to 1e-12
    torch.testing.assert_close(probs(config), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_temperature_takes_the_power_of_the_probabilities():
    got = probs(SamplingConfig(temperature=2.0))
    root = P.sqrt()
    torch.testing.assert_close(got, root / root.sum(), rtol=0, atol=1e-12)


def test_bad_sampling_settings_raise():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def tiny(reverse=False, vocab=7, reader=True):
    config = VMTConfig(state_dim=3, obs_dim=vocab, feature_dim=4, guide_hidden=8,
                       transition_hidden=8, prior_components=2, max_window=32, reverse=reverse)
    r = GRUReader("tokens", 4, vocab_size=vocab, embed_dim=4) if reader else None
    return VariationalMarkovTransformer(config, reader=r)


def test_written_tokens_follow_the_filtered_emission():
    vmt = tiny()
    state = torch.randn(1, 3).expand(20000, -1)
    cfg = SamplingConfig(temperature=0.7, top_k=4)
    out = write(vmt, state, 1, cfg)
    with torch.no_grad():
        x = out.states[:, 0]
        expected = filter_logits(vmt.emission.logits(x), cfg).softmax(-1).mean(0)
    freq = torch.bincount(out.tokens[:, 0], minlength=7).double() / 20000
    # 20000 draws: binomial sd <= 0.0036 per token; 5 sd
    assert float((freq - expected.double()).abs().max()) < 0.018
    assert out.tokens.shape == (20000, 1) and out.states.shape == (20000, 1, 3)


def test_shapes_and_bad_requests():
    vmt = tiny()
    w = write(vmt, torch.zeros(3), 5)
    assert w.tokens.shape == (1, 5) and w.states.shape == (1, 5, 3)
    torch.testing.assert_close(w.last_state, w.states[:, -1])
    u = sample_unconditional(vmt, 4, samples=6)
    assert u.tokens.shape == (6, 4) and u.states.shape == (6, 4, 3)
    for n in (0, -2):
        with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
            write(vmt, torch.zeros(3), n)
        with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
            sample_unconditional(vmt, n)
    with pytest.raises(ValueError, match="no reverse parts"):
        write_prequel(vmt, torch.zeros(3), 3)
    with pytest.raises(ValueError, match="state must be"):
        write(vmt, torch.zeros(2, 4), 3)


def test_prequel_uses_the_reverse_transition_in_reading_order():
    vmt = tiny(reverse=True)
    with torch.no_grad():
        # make p_r deterministic-looking: a tiny scale, so the path is (nearly) its means
        vmt.reverse_transition.to_scale.bias.fill_(-20.0)
        vmt.reverse_transition.to_scale.weight.zero_()
    start = torch.randn(1, 3)
    out = write_prequel(vmt, start, 3)
    with torch.no_grad():
        m1 = vmt.reverse_transition.loc_scale(start)[0]
        m2 = vmt.reverse_transition.loc_scale(m1)[0]
        m3 = vmt.reverse_transition.loc_scale(m2)[0]
    # scale = softplus(-20) + min_scale ~ 1e-3: states within 1e-2 of the means
    torch.testing.assert_close(out.states[0], torch.cat([m3, m2, m1]), rtol=0, atol=1e-2)
    torch.testing.assert_close(out.last_state, out.states[:, 0])


def test_unconditional_reverse_starts_from_the_prior_at_the_end():
    """``direction="reverse"``: the prior draw is the last state; the path before it follows
    ``p_r`` and comes back in reading order (same draws as the forward roll with ``p_r``)."""
    vmt = tiny(reverse=True)
    with torch.no_grad():
        vmt.reverse_transition.to_scale.bias.fill_(-20.0)
        vmt.reverse_transition.to_scale.weight.zero_()
    torch.manual_seed(3)
    out = sample_unconditional(vmt, 3, samples=2, direction="reverse")
    torch.manual_seed(3)
    last = vmt.prior.distribution().sample((2,))
    with torch.no_grad():
        m1 = vmt.reverse_transition.loc_scale(last)[0]
        m2 = vmt.reverse_transition.loc_scale(m1)[0]
    torch.testing.assert_close(out.states, torch.stack([m2, m1, last], 1), rtol=0, atol=1e-2)
    assert out.tokens.shape == (2, 3)
    with pytest.raises(ValueError, match="no reverse parts"):
        sample_unconditional(tiny(), 3, direction="reverse")
    with pytest.raises(ValueError, match="direction must be"):
        sample_unconditional(vmt, 3, direction="sideways")


def test_conversation_carries_the_state_across_turns():
    vmt = tiny()
    chat = Conversation(vmt, read_config=ReadConfig(window=4), samples=2)
    with pytest.raises(ValueError, match="nothing has been read"):
        chat.reply(3)
    first = chat.hear(torch.tensor([1, 2, 3, 4, 5]))
    assert first.scored == 5
    reply = chat.reply(3)
    assert reply.shape == (2, 3)
    carried = chat.state.clone()
    # the next turn continues from the carried state: its first term is a transition out of
    # it, so reading the same turn from the prior instead gives different guide terms
    torch.manual_seed(5)
    second = chat.hear(torch.tensor([6, 0]))
    torch.manual_seed(5)
    cold = read(vmt, torch.tensor([6, 0]), ReadConfig(window=4), samples=2)
    torch.manual_seed(5)
    warm = read(vmt, torch.tensor([6, 0]), ReadConfig(window=4), samples=2, x0=carried)
    torch.testing.assert_close(second.log_guide, warm.log_guide)
    assert not torch.allclose(second.log_guide, cold.log_guide)
    assert chat.turns == 2 and chat.tokens_seen == 10
    with pytest.raises(ValueError, match="empty input"):
        chat.hear(torch.zeros(0, dtype=torch.long))


def determined_prefix_corpus(docs, noise, generator):
    """Documents ``[b(e), r, e]``: the first token is a function of the last one.

    ends ``e`` in {0,1,2,3}, beginnings ``b(e) = 4 + (e + 1) % 4``, a noise token ``r`` in
    8..8+noise between them (so the reverse chain must carry ``e`` through a step).
    """
    out = []
    for _ in range(docs):
        e = int(torch.randint(0, 4, (1,), generator=generator))
        r = int(torch.randint(8, 8 + noise, (1,), generator=generator))
        out.append(torch.tensor([4 + (e + 1) % 4, r, e]))
    return out


@pytest.mark.integration
def test_reverse_model_writes_the_determined_prefix():
    torch.set_num_threads(1)
    vocab = 12
    config = VMTConfig(state_dim=6, obs_dim=vocab, feature_dim=16, guide_hidden=32,
                       transition_hidden=32, prior_components=4, max_window=8, reverse=True,
                       emission_hidden=32)
    vmt = VariationalMarkovTransformer(
        config, reader=GRUReader("tokens", 16, vocab_size=vocab, embed_dim=8))
    docs = determined_prefix_corpus(256, 4, torch.Generator().manual_seed(0))
    result = fit(vmt, reverse_documents(docs),
                 # KL annealing from 0.05 keeps the state from collapsing to the marginals
                 TrainConfig(direction="reverse", steps=600, batch_size=32, learning_rate=1e-2,
                             min_length=3, max_length=3, aux_weight=0.0, annealing_start=0.05,
                             annealing_steps=360),
                 progress=False)
    assert result.ok
    # Prequels of held-out endings [r, e]: read them in reverse with q_r, then one step
    # back with p_r and the shared emission.
    held = determined_prefix_corpus(50, 4, torch.Generator().manual_seed(1))
    hits = 0
    draws = 8
    for doc in held:
        state = read(vmt, doc[1:].flip(0), ReadConfig(window=8), direction="reverse",
                     samples=draws).state
        first = write_prequel(vmt, state, 1, SamplingConfig()).tokens[:, 0]
        hits += int((first == doc[0]).sum())
    accuracy = hits / (len(held) * draws)
    # chance is 1/4 even for a model that learned which tokens may begin a document
    # (1/12 over the vocabulary); far above chance: > 0.5, twice chance (observed ~0.67;
    # 400 draws over 50 endings, binomial sd ~0.024)
    assert accuracy > 0.5, accuracy
    assert not math.isnan(accuracy)
