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


class _Targets:
    """Soft targets that put all mass on the token after the true one (mod vocabulary)."""

    def __init__(self, docs, vocab):
        self.ids = [((d + 1) % vocab)[:, None] for d in docs]

    def __len__(self):
        return len(self.ids)

    def window(self, documents, offsets, steps):
        ids = torch.zeros(len(documents), steps, 1, dtype=torch.long)
        probs = torch.zeros(len(documents), steps, 1)
        for r, (d, o) in enumerate(zip(documents, offsets)):
            seg = self.ids[d][o : o + steps]
            ids[r, : len(seg)], probs[r, : len(seg)] = seg, 1.0
        return ids, probs


def test_distillation_pulls_the_model_towards_the_teacher():
    """With a teacher that always names the *next* symbol, a heavily distilled model puts
    most of its mass there instead of on the true token."""
    docs = [torch.arange(60) % 5 for _ in range(4)]
    torch.manual_seed(0)
    model = GRULanguageModel(5, 16)
    train_for(model, docs, 1e9, GRUTrainConfig(batch_size=4, length=16, max_steps=150, distill_weight=20.0),
              teacher=_Targets(docs, 5))
    logits, _ = model(torch.cat([torch.tensor([5]), docs[0][:-1]])[None])
    shifted = torch.log_softmax(logits[0], -1).gather(-1, ((docs[0] + 1) % 5)[:, None])
    assert shifted.exp().mean() > 0.5
    with pytest.raises(ValueError, match="teacher"):
        train_for(model, docs, 0.0, GRUTrainConfig(distill_weight=1.0))


def test_validation_keeps_the_best_parameters():
    """Model selection: the returned parameters are those of the best validation pass, and
    their validation NLL is the one reported."""
    from vmt.nn.gru_lm import validation_nll

    torch.manual_seed(0)
    train = [torch.arange(60) % 5 for _ in range(4)]
    valid = [(torch.arange(40) * 2) % 5]  # another cycle: training on ``train`` hurts it
    model = GRULanguageModel(5, 16, dropout=0.1)
    out = train_for(model, train, 1e9, GRUTrainConfig(batch_size=4, length=16, max_steps=120, valid_every=20),
                    valid=valid)
    assert out["best_valid_nll"] == pytest.approx(validation_nll(model, valid), abs=1e-9)
    assert out["best_step"] in range(20, 121, 20)
    assert not model.training
    with pytest.raises(ValueError, match="dropout"):
        GRULanguageModel(5, 4, dropout=1.0)
