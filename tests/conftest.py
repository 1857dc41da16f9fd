import numpy as np
import pytest
import torch

# Test problems are small: one intra-op thread is as fast and never oversubscribes the cores
# when several test processes (subprocess workers, notebook kernels) run at once.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds, so a failure reproduces."""
    import pyro

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (loaded once per session)."""
    from vmt.encoders.pretrained import load_pretrained_lm

    return load_pretrained_lm()
