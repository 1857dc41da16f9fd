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


@pytest.fixture
def float64():
    """The test runs with float64 as torch's default dtype (restored afterwards), so models
    and tensors it builds are float64; yields the dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(before)


def _periodic_documents(n: int = 12, seed: int = 0, vocab: int = 12, lengths: tuple[int, int] = (20, 40)):
    """``n`` documents ``(time,)`` int64 of a noisy period-4 pattern over ids ``0..3`` (10% of the
    tokens replaced by ids ``4..vocab-1``), lengths drawn in ``[lengths[0], lengths[1])``."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1], (1,), generator=g))
        phase = int(torch.randint(0, 4, (1,), generator=g))
        base = (torch.arange(length) + phase) % 4
        noise = torch.rand(length, generator=g) < 0.1
        docs.append(torch.where(noise, torch.randint(4, vocab, (length,), generator=g), base))
    return docs


@pytest.fixture
def periodic_documents():
    """Factory ``(n=12, seed=0, vocab=12, lengths=(20, 40)) -> list of (time,) documents``:
    a learnable pattern, so a training ELBO must improve on it."""
    return _periodic_documents


def _small_vmt(vocab: int, state_dim: int, width: int, hidden: int, max_window: int = 64,
               embed_dim: int | None = None, **config):
    """A small token VMT whose reader is a GRU over tokens (``width`` features), built from a
    reader spec so checkpoints can rebuild it; ``config`` are further :class:`VMTConfig` fields."""
    from vmt.models import VariationalMarkovTransformer, VMTConfig

    vmt_config = VMTConfig(state_dim=state_dim, obs_dim=vocab, feature_dim=width, guide_hidden=hidden,
                           transition_hidden=hidden, prior_components=2, max_window=max_window, **config)
    kwargs = {"input": "tokens", "hidden_size": width, "vocab_size": vocab}
    if embed_dim is not None:
        kwargs["embed_dim"] = embed_dim
    return VariationalMarkovTransformer(vmt_config, reader_spec={"kind": "gru", "kwargs": kwargs})


@pytest.fixture
def small_vmt():
    """Factory ``(vocab, state_dim, width, hidden, max_window=64, embed_dim=None, **config)``
    of a small token VMT with a trainable GRU reader (in the default dtype: add ``float64``)."""
    return _small_vmt


def _train_oracle_guide(vmt, ssm, steps: int, length: int, rows: int = 64, lr: float = 1e-2, seed: int = 1):
    """Train the guide and reader of a linear-Gaussian VMT (:func:`vmt.models.oracles.
    linear_gaussian_vmt`) on fresh draws of ``ssm``: ``rows`` sequences of ``length`` per step,
    Adam with a cosine schedule on ``-mean ELBO / length``. Returns ``vmt``."""
    from vmt.inference.elbo import elbo_terms
    from vmt.models import ChainBatch

    params = [p for p in vmt.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((rows,), length)
    for _ in range(steps):
        _, y = ssm.simulate(length, rows, g)
        batch = ChainBatch(obs=y, start=torch.zeros(rows, dtype=torch.long), end=lengths,
                           reader_input=y, reader_lengths=lengths)
        loss = -elbo_terms(vmt, batch).elbo_per_row().mean() / length
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return vmt


@pytest.fixture
def train_oracle_guide():
    """Factory ``(vmt, ssm, steps, length, rows=64, lr=1e-2, seed=1) -> vmt``: the oracle
    training loop of the linear-Gaussian tests."""
    return _train_oracle_guide
