import pytest
import torch


@pytest.fixture(autouse=True)
def _small_threads():
    # CI has 2 cores; keep runs comparable and deterministic
    torch.set_num_threads(2)
    yield
