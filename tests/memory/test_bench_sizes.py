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
    fit = {"train_tokens": 302680, "steps": 900, "test_tokens": 20000, "neg_elbo": 1.5, "neg_iwae": 1.4,
           "particles": 8, "unigram": 5.0, "bigram": 3.0, "lm": 1.2, "kl": 0.3, "explained_dims": 150,
           "state_dim": 192}
    text = _vmt_description((16, 192), {256: 11.25}, fit)
    assert "302,680 training tokens, 900 steps" in text and "1.500 nats/token" in text
    assert "unigram 5.000, bigram 3.000, SmolLM2 1.200" in text and "150 of 192 state" in text
    assert "reverse GRU reader trained with it" in text
    text = _vmt_description((16, 192), {256: 11.25}, {**fit, "first_guide": "fixed"})
    assert "reads nothing ahead" in text and "reverse GRU reader" not in text
    assert "weights the ELBO term" not in text and "3,000 grocery sessions of up to 6 distractors" in text
    text = _vmt_description((16, 192), {256: 11.25}, {**fit, "emphasis": 20.0, "emphasis_cue": "A: buy"})
    assert 'token after every "A: buy" (the grocery answer) 20 times' in text


def test_finished_cells_are_kept_and_read_back(tmp_path, monkeypatch):
    import vmt.benchmarks.memory_tasks as bench

    played = []

    def play(name, budget, sizes, quick):
        played.append((name, budget))
        return name, str(budget), {"rps": [1, 0]}

    monkeypatch.setattr(bench, "_play_cell", play)
    monkeypatch.setattr(bench, "CELLS", tmp_path / "cells")
    first = bench._kept_cell("window", 256, FULL, quick=False)
    again = bench._kept_cell("window", 256, FULL, quick=False)
    assert first == again and played == [("window", 256)]  # the second is read back
    bench._kept_cell("window", 1024, FULL, quick=False)  # another budget: another cell
    bench._kept_cell("window", 256, QUICK, quick=True)  # quick runs keep nothing
    bench._kept_cell("VMT", 256, FULL, quick=False)  # the VMT depends on its fitted model
    bench._kept_cell("VMT", 256, FULL, quick=False)
    assert played[1:] == [("window", 1024), ("window", 256), ("VMT", 256), ("VMT", 256)]
    assert bench._cell_key("window", 256, FULL) != bench._cell_key("window", 256, QUICK)


def test_a_cell_key_follows_what_the_cell_runs(monkeypatch):
    import vmt.benchmarks.memory_tasks as bench

    key = bench._cell_key("SirLLM", 256, FULL)
    monkeypatch.setattr(bench, "SIRLLM_DECAY", {**bench.SIRLLM_DECAY, "rps": 0.8})
    assert bench._cell_key("SirLLM", 256, FULL) != key  # a constant the cell reads
    monkeypatch.undo()
    monkeypatch.setattr(bench, "_window", lambda model, tok, budget, task: None)
    assert bench._cell_key("SirLLM", 256, FULL) != key  # a function that plays cells
    monkeypatch.undo()
    monkeypatch.setattr(bench, "VMT_ONLY_MODULES", ())
    assert bench._cell_key("SirLLM", 256, FULL) != key  # the VMT's modules are left out
    monkeypatch.undo()
    assert bench._cell_key("SirLLM", 256, FULL) == key


def test_the_reading_states_the_vmt_recall_against_chance():
    from dataclasses import replace

    import numpy as np

    from vmt.benchmarks.memory_tasks import _reading

    sizes = replace(FULL, budgets=(256,))

    def row(grocery, dialogue):
        return {"rps": np.array([1, 0, -1, 1]), "passkey": np.array([1.0, 0.0]),
                "grocery": {m: np.array(grocery) for m in sizes.grocery_checkpoints},
                "dialogue": {m: np.array(dialogue) for m in sizes.dialogue_checkpoints}}

    results = [("full context", "all", row([1.0] * 24, [0.75] * 8)),
               ("window", "256", row([0.0, 1.0] * 12, [0.25] * 8)),
               ("VMT", "256", row([1.0] * 20 + [0.0] * 4, [0.0, 0.5] * 4))]
    text = " ".join(_reading(results, sizes))
    assert "VMT at budget 256 recalls the grocery item after N=25 in 0.83" in text
    assert "the interval excludes chance (0.25)" in text and "the interval contains chance (0.25)." in text


def test_the_full_run_plays_vmt_cells_here_one_after_another(monkeypatch):
    """Language-model cells go to the workers; the VMT's cells (which resume one fitted run,
    locked by one process at a time) are played in this process; the order is kept."""
    import vmt.benchmarks.memory_tasks as bench

    submitted, here = [], []

    class Inline:
        def __init__(self, workers, mp_context=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            from concurrent.futures import Future

            submitted.append(args[:2])
            future = Future()
            future.set_result((args[0], str(args[1]), {}))
            return future

    def played_here(name, budget, sizes, quick):
        here.append((name, budget))
        return name, str(budget), {}

    monkeypatch.setattr(bench, "ProcessPoolExecutor", Inline)
    monkeypatch.setattr(bench, "_kept_cell", played_here)
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    results = bench._play(FULL, quick=False)
    jobs = [("full context", None)] + [(n, b) for b in FULL.budgets for n in bench.METHOD_FACTORIES]
    assert [(r[0], r[1]) for r in results] == [(n, str(b)) for n, b in jobs]
    assert here == [(n, b) for n, b in jobs if n == "VMT"] and len(here) == len(FULL.budgets)
    assert not any(n == "VMT" for n, _ in submitted) and len(submitted) == len(jobs) - len(here)
