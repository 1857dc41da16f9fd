from vmt.benchmarks.memory_tasks import FULL, QUICK, SIRLLM_DECAY, _rps_rounds_within
from vmt.memory.tasks import RPS_INTRO, rps_player_moves, rps_round_prompt


def _stream_length(moves, n_rounds):
    """Characters of the RPS stream after ``n_rounds`` rounds (one character per option)."""
    text = RPS_INTRO
    previous = None
    for move in moves[:n_rounds]:
        text += (")\n" if previous else "") + rps_round_prompt(previous) + "A"
        previous = move
    return len(text)


def test_full_context_rps_rounds_are_the_most_that_fit_the_window():
    def tokenize(text):  # one token per character
        return [ord(c) for c in text]

    moves = rps_player_moves(300, "rock", seed=0)
    for window in (500, 4000, 8192):
        n = _rps_rounds_within(tokenize, moves, window)
        assert _stream_length(moves, n) <= window < _stream_length(moves, n + 1)
    assert _rps_rounds_within(tokenize, moves, 10**9) == 300


def test_sizes_and_tasks():
    assert FULL.rps_rounds == 2000 and len(FULL.rps_players) >= 1
    assert set(SIRLLM_DECAY) == {"rps", "grocery", "passkey", "dialogue"}
    assert all(0 < d <= 1 for d in SIRLLM_DECAY.values())
    assert QUICK.budgets == (256,)


def test_vmt_description_states_the_carried_state_beside_the_kv_caches():
    from vmt.benchmarks.memory_tasks import _vmt_description

    text = _vmt_description((16, 64), {256: 11.25, 1024: 45.0})
    assert "16 x 64 floats (4 KB" in text and "11.2 MB for a 256-token" in text
    assert _vmt_description(None, {256: 11.25}) == ""
