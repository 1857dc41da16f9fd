"""The state, not the window, carries what was read: a token-family VMT trained on a tiny
recall stream answers a query whose value was written two windows earlier, and answers at
chance when its state is reset at the start of the query's window."""

import pytest
import torch

from vmt.data.synthetic_recall import (
    RecallTaskConfig,
    sample_eval_batch,
    sample_training_batch,
    single_query,
    write_answers,
)
from vmt.inference.predictive import next_token_probs
from vmt.inference.reading import ReadConfig, read
from vmt.inference.train import TrainConfig, fit
from vmt.models.vmt import VariationalMarkovTransformer, token_rnn_vmt

TASK = RecallTaskConfig(n_pairs=1, n_keys=2, n_values=4, n_filler=4)  # chance 0.25
WINDOW = 8
DISTANCE = 18  # the value sits more than two windows before the query
QUERIES = 64


def tiny_recall_vmt(generator: torch.Generator) -> VariationalMarkovTransformer:
    docs = []
    for _ in range(40):
        tokens, targets = sample_training_batch(TASK, 16, 40, 0.2, generator)
        docs.extend(write_answers(tokens, targets))
    vmt = token_rnn_vmt(TASK.vocab_size, memory_dim=32, token_dim=8, hidden=16, max_window=WINDOW, embed_dim=8)
    result = fit(vmt, docs, TrainConfig(regime="windows", window=WINDOW, batch_size=16, steps=300,
                                        learning_rate=1e-2, aux_weight=0.0, max_skip=0, log_every=1000),
                 progress=False)
    assert result.ok, result.stopped
    return vmt.eval()


@pytest.mark.integration
def test_the_carried_state_recalls_a_value_two_windows_back_and_a_reset_state_cannot():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    vmt = tiny_recall_vmt(generator)
    tokens, targets, query_pos = sample_eval_batch(TASK, QUERIES, [DISTANCE], generator)
    values = torch.arange(TASK.value_offset, TASK.vocab_size)
    config = ReadConfig(window=WINDOW, score=False)
    correct = {"carried": 0, "reset": 0}
    with torch.no_grad():
        for row in range(QUERIES):
            prefix = single_query(TASK, tokens[row], query_pos[row], 0, generator)
            answer = int(targets[row, query_pos[row, 0]])
            # reset: the state starts afresh at the query's window, which ends 8 tokens back
            for how, seq in (("carried", prefix), ("reset", prefix[-WINDOW:])):
                state = read(vmt, seq, config, samples=4).state
                guess = int(values[next_token_probs(vmt, state)[values].argmax()])
                correct[how] += guess == answer
    carried, reset = correct["carried"] / QUERIES, correct["reset"] / QUERIES
    # chance 0.25; 64 queries put a chance-level accuracy below 0.42 with probability > 0.99
    assert carried >= 0.85, correct
    assert reset <= 0.42, correct
