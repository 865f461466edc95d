import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread runs them several times faster than
    threads that wait on each other for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
