import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny volumes gain nothing from threads, and on a shared 2-core CI box OpenMP spin-waits
    make 2 threads ~5x slower than 1. Bit-identity holds per thread count either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
