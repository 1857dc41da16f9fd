"""The cache keyword follows the installed transformers: ``cache`` where declared, else ``past_key_values``."""

import dataclasses
import functools

import pytest
import transformers
from packaging.version import Version

from vmt.hf_compat import cache_keyword, cache_kwargs, output_cache


def new_forward(input_ids=None, cache=None, use_cache=None):
    return cache


def old_forward(input_ids=None, past_key_values=None, use_cache=None):
    return past_key_values


def shimmed(fn):
    """Like transformers' ``deprecate_kwarg``: accepts the old name, keeps the new signature."""

    @functools.wraps(fn)
    def wrapper(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return fn(*args, **kwargs)

    return wrapper


def test_new_signature_gets_cache():
    assert cache_keyword(new_forward) == "cache"


def test_old_signature_gets_past_key_values():
    assert cache_keyword(old_forward) == "past_key_values"


def test_a_deprecation_shim_does_not_hide_the_new_name():
    assert cache_keyword(shimmed(new_forward)) == "cache"


def test_neither_name_is_a_clear_error():
    def forward(input_ids=None):
        return input_ids

    with pytest.raises(ValueError, match="takes neither 'cache' nor 'past_key_values'"):
        cache_keyword(forward)


@pytest.mark.parametrize("forward", [new_forward, old_forward])
def test_the_chosen_keyword_reaches_the_cache_argument(forward):
    class Model:
        def forward(self, **kwargs):
            return forward(**kwargs)

    Model.forward = staticmethod(forward)
    sentinel = object()
    assert Model.forward(input_ids=None, **cache_kwargs(Model(), sentinel)) is sentinel


def test_output_cache_reads_either_field():
    @dataclasses.dataclass
    class New:
        logits: object = None
        cache: object = None

    @dataclasses.dataclass
    class Old:
        logits: object = None
        past_key_values: object = None

    sentinel = object()
    assert output_cache(New(cache=sentinel)) is sentinel
    assert output_cache(Old(past_key_values=sentinel)) is sentinel
    with pytest.raises(ValueError, match="neither a 'cache' nor a 'past_key_values' field"):
        output_cache(dataclasses.make_dataclass("Neither", ["logits"])(logits=None))


def test_installed_transformers_gets_the_keyword_of_its_release():
    from transformers import LlamaForCausalLM, masking_utils
    from transformers.modeling_outputs import CausalLMOutputWithPast

    expected = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"
    assert cache_keyword(LlamaForCausalLM.forward) == expected
    assert cache_keyword(masking_utils.create_causal_mask) == expected
    assert cache_keyword(masking_utils.create_sliding_window_causal_mask) == expected
    sentinel = object()
    assert output_cache(CausalLMOutputWithPast(**{expected: sentinel})) is sentinel


def test_benchmark_decoding_extends_the_cache_it_is_given():
    """The generation-speed benchmark's prefill/decode pass the cache under the right keyword:
    every decoding step lands in the prefilled cache (a dropped cache would leave it unchanged)."""
    import torch

    from vmt.benchmarks.generation_speed import lm_decode, lm_prefill
    from vmt.testing import tiny_llama

    lm = tiny_llama().eval()
    context = torch.randint(0, lm.config.vocab_size, (12,))
    past, last = lm_prefill(lm, context)
    assert past.get_seq_length() == 11 and last.shape == (1, 1)
    assert lm_decode(lm, past, last, 5) > 0
    assert past.get_seq_length() == 16
