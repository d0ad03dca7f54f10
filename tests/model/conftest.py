"""Model tests run their tiny tensors on one intra-op thread: at these sizes thread hand-offs cost
more than the work, and on a busy 2-core machine two threads made a training step ~14x slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
