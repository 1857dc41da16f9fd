"""The same-budget GRU language model: sizing by parameters, chunked scoring, training."""

import math

import pytest
import torch

from vmt.nn.gru_lm import GRULanguageModel, GRUTrainConfig, document_log_probs, train_for


@pytest.mark.parametrize(("budget", "vocab"), [(5_000, 30), (99_899, 883), (250_000, 4096)])
def test_hidden_for_is_the_largest_width_within_the_budget(budget, vocab):
    h = GRULanguageModel.hidden_for(budget, vocab)
    model = GRULanguageModel(vocab, h)
    count = sum(p.numel() for p in model.parameters())
    assert count == GRULanguageModel.parameter_count(vocab, h) <= budget
    assert GRULanguageModel.parameter_count(vocab, h + 1) > budget


def test_chunked_scoring_carries_the_state_and_normalises():
    torch.manual_seed(0)
    model = GRULanguageModel(7, 5).double()
    doc = torch.randint(0, 7, (23,))
    whole = document_log_probs(model, doc, chunk=100)
    assert torch.allclose(document_log_probs(model, doc, chunk=4), whole, atol=1e-12)
    # the first token is predicted from the beginning-of-document input alone
    logits, _ = model(torch.tensor([[7]]))
    assert whole[0].item() == pytest.approx(torch.log_softmax(logits[0, 0], -1)[doc[0]].item(), abs=1e-12)
    assert bool((whole < 0).all())


def test_training_within_a_cpu_budget_learns_a_periodic_source():
    docs = [torch.arange(60) % 5 for _ in range(4)]
    model = GRULanguageModel(5, 16)
    before = -document_log_probs(model, docs[0]).mean().item()
    out = train_for(model, docs, cpu_seconds=0.0, config=GRUTrainConfig(batch_size=4, length=16, max_steps=150))
    after = -document_log_probs(model, docs[0]).mean().item()
    assert out["steps"] == 1  # a zero budget still takes one step
    out = train_for(model, docs, cpu_seconds=1e9, config=GRUTrainConfig(batch_size=4, length=16, max_steps=150))
    after = -document_log_probs(model, docs[0]).mean().item()
    assert out["steps"] == 150 and out["cpu_seconds"] > 0
    assert before > 0.9 * math.log(5) and after < 0.2
