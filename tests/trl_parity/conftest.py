"""The TRL parity suite runs tiny models: one intra-op thread is the fastest on a shared machine."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(torch_single_thread):
    """Every test of the suite with one torch thread (``tests/conftest.py``'s ``torch_single_thread``)."""
