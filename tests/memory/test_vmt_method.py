"""The VMT as a memory method: bounded buffering, answers from the model's predictive,
independent forks, and the protocol's runners on a tiny model."""

import pytest
import torch

from vmt.data.vocab import Vocabulary
from vmt.encoders.small_readers import GRUReader
from vmt.memory.methods import play_rps
from vmt.memory.vmt_method import VMTMethod
from vmt.models import VMTConfig
from vmt.models.vmt import VariationalMarkovTransformer

FULL = 30  # LM vocabulary of the toy tokenizer
KEPT = tuple(range(2, 22))  # ids 2..21 have their own emission id; 0, 1, 22..29 are <unk>


def tiny_method(window=8, samples=4, favourite=None):
    vocab = Vocabulary(KEPT, FULL)
    config = VMTConfig(state_dim=3, obs_dim=vocab.size, feature_dim=5, guide_hidden=8,
                       transition_hidden=8, prior_components=2, max_window=32)
    vmt = VariationalMarkovTransformer(config)
    reader = GRUReader("tokens", 5, vocab_size=FULL, embed_dim=4)  # reads LM ids
    if favourite is not None:
        with torch.no_grad():  # make one LM id by far the most probable emission
            vmt.emission.net.bias[int(vocab.encode(torch.tensor([favourite])))] += 30.0
    return VMTMethod("VMT", vmt, vocab, reader, window=window, samples=samples), reader


def test_tokens_are_buffered_at_most_one_window_and_read_by_lm_id():
    method, reader = tiny_method(window=8)
    seen = []
    method.feature_fn = lambda ids, n: (seen.append(ids[0].tolist()), reader(ids, n))[1]
    session = method.new_session()
    session.read_tokens([23, 5, 6])  # 23 is <unk> for the emission but not for the reader
    assert session.state is None and len(session.pending) == 3
    session.read_tokens(list(range(2, 8)))  # 9 >= 8: read now
    assert session.pending == [] and session.state.shape == (4, 3)
    assert seen[0][:3] == [23, 5, 6]


def test_choices_follow_the_model_predictive_and_the_choice_is_read():
    method, _ = tiny_method(favourite=7)
    session = method.new_session()
    session.read_tokens([3, 4, 5])
    # 7 carries +30 nats of emission bias: every particle makes it the likeliest token
    assert session.choose_tokens([6], [[9], [7], [10, 11]]) == 1
    assert session.pending == [7]  # the prompt was read to choose; the choice waits
    assert session.choose_tokens([], [[7, 7], [7, 9]]) == 0


def test_greedy_match_and_merged_answers():
    method, _ = tiny_method(favourite=7)
    session = method.new_session()
    session.read_tokens([3, 4])
    ok, logp = session.greedy_match([7, 7])
    assert ok and logp > -1e-3  # p(7) ~ 1 - 20 e^{-30} at each step
    ok, logp = session.greedy_match([7, 9])
    assert not ok and logp < -10
    # id 25 is merged into <unk>: never a greedy match, and it pays log(#merged) = log 10
    _, unk_logp = session.fork().greedy_match([25])
    assert unk_logp < -torch.log(torch.tensor(10.0)).item()


def test_forks_are_independent():
    method, _ = tiny_method()
    session = method.new_session()
    session.read_tokens([3, 4, 5])
    probe = session.fork()
    probe.read_tokens([6, 7, 8, 9, 10, 11, 12, 13])  # reads a window in the fork only
    assert session.pending == [3, 4, 5] and session.state is None
    assert probe.state is not None


def test_bad_use_is_refused():
    method, _ = tiny_method()
    session = method.new_session()
    with pytest.raises(ValueError, match="read a context"):
        session.greedy_match([3])
    with pytest.raises(ValueError, match="at least one token"):
        session.choose_tokens([3], [[4], []])
    with pytest.raises(ValueError, match="samples"):
        VMTMethod("x", method.vmt, method.vocabulary, method.feature_fn, window=8, samples=0)
    with pytest.raises(ValueError, match="emission ids"):
        VMTMethod("x", method.vmt, Vocabulary(KEPT[:-1], FULL), method.feature_fn, window=8)


def test_plays_rock_paper_scissors_through_the_protocol():
    method, _ = tiny_method(window=16)

    def tokenize(text: str) -> list[int]:
        return [2 + ord(c) % 20 for c in text]

    outcomes = play_rps(method, tokenize, ["rock", "paper", "rock", "scissors"])
    assert len(outcomes) == 4 and set(outcomes) <= {-1, 0, 1}


def test_state_shape_is_what_a_session_carries():
    method, _ = tiny_method(samples=4)
    session = method.new_session()
    session.read_tokens([3, 4, 5])
    session.greedy_match([6])
    assert method.state_shape == tuple(session.state.shape) == (4, 3)


def test_a_trained_reader_reads_the_emission_ids():
    vocab = Vocabulary(KEPT, FULL)
    config = VMTConfig(state_dim=3, obs_dim=vocab.size, feature_dim=5, guide_hidden=8,
                       transition_hidden=8, prior_components=2, max_window=32)
    reader = GRUReader("tokens", 5, vocab_size=vocab.size, embed_dim=4)  # reads emission ids
    seen = []
    reader.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    method = VMTMethod("VMT", VariationalMarkovTransformer(config, reader=reader), vocab, None, window=8)
    session = method.new_session()
    session.read_tokens([23, 5, 6, 29])  # 23 and 29 are merged into <unk> (emission id 0)
    session.greedy_match([7])
    assert [x.tolist() for x in seen] == [[[0, 4, 5, 0]]]  # one window, emission ids
