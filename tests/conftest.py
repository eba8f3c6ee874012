"""Shared pytest set-up. Tests use tiny shapes, which run fastest on one thread (and far faster
than two spinning threads when other processes share the 2 cores); subprocesses set their own."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
