import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run the model: measured on the shared 2-core test machine, with other jobs
    running two torch threads made generation several times slower than one (threads spin-waiting on
    each other's cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
