import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny forward calls; with two threads on a busy 2-core machine
    the thread hand-off dominates (measured ~100x slower), so they run on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
