"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op thread (restored afterwards).

    Tiny tensor ops are far slower multi-threaded on a busy few-core machine; use it with
    ``pytestmark = pytest.mark.usefixtures("torch_single_thread")`` in modules of small-tensor tests.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
