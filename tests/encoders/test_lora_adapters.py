import copy

import pytest
import torch
from torch import nn

from vmt.encoders.features import LMFeatureExtractor
from vmt.encoders.lora import LoRAConfig, LoRALinear, add_lora, lora_parameters, merge_lora
from vmt.testing import tiny_llama


def _model():
    return tiny_llama(vocab_size=41, num_layers=2, dtype=torch.float64)


def _inputs():
    return torch.randint(0, 41, (2, 6)), torch.tensor([6, 4])


def test_lora_linear_equals_the_merged_weight():
    base = nn.Linear(5, 3, dtype=torch.float64)
    layer = LoRALinear(base, rank=2, alpha=6.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    # Closed form: (W + alpha/rank * B A) x + bias.
    weight = base.weight + 3.0 * layer.lora_b @ layer.lora_a
    torch.testing.assert_close(layer(x), x @ weight.T + base.bias, atol=1e-12, rtol=1e-12)
    assert not base.weight.requires_grad and layer.lora_a.requires_grad


def test_zero_initialised_adapters_reproduce_the_base_model():
    base = LMFeatureExtractor(_model(), layer=-1)
    adapted = LMFeatureExtractor(_model(), layer=-1, trainable="lora", lora=LoRAConfig(rank=4))
    tokens, lengths = _inputs()
    # B = 0 makes the update exactly zero; the sums are identical in float64.
    torch.testing.assert_close(adapted(tokens, lengths), base(tokens, lengths), atol=0, rtol=0)
    names = [n for n, m in adapted.lm.named_modules() if isinstance(m, LoRALinear)]
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)


def test_only_adapter_parameters_receive_gradients():
    ex = LMFeatureExtractor(_model(), layer=-1, trainable="lora")
    ex(*_inputs()).square().sum().backward()
    adapters = set(map(id, lora_parameters(ex.lm)))
    assert {id(p) for p in ex.trainable_parameters()} == adapters
    for name, p in ex.lm.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None, name
        else:
            assert p.grad is None and not p.requires_grad, name
    # With B = 0 the gradient reaches B (not A, whose gradient is B^T times something).
    assert all(m.lora_b.grad.abs().sum() > 0 for m in ex.lm.modules() if isinstance(m, LoRALinear))


def test_trained_adapters_change_the_output_and_merge_back():
    ex = LMFeatureExtractor(_model(), layer=-1, trainable="lora")
    tokens, lengths = _inputs()
    before = ex(tokens, lengths).detach()
    with torch.no_grad():
        for m in ex.lm.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.1)
    adapted = ex(tokens, lengths).detach()
    assert (adapted - before).abs().max() > 1e-3
    merged_model = copy.deepcopy(ex.lm)
    assert merge_lora(merged_model) == 4
    merged = LMFeatureExtractor(merged_model, layer=-1)
    # Merging only reassociates (W + BA)x vs Wx + B(Ax): float64 rounding.
    torch.testing.assert_close(merged(tokens, lengths), adapted, atol=1e-10, rtol=1e-10)


def test_add_lora_errors():
    model = _model()
    add_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(ValueError, match="no nn.Linear submodule"):
        add_lora(_model(), LoRAConfig(targets=("nothing",)))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
