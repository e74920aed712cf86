"""Shared test setup: every test starts from the same seed, on the CPU, in float32."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
