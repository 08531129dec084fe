import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # transformers warns about tiny configs' special token ids; irrelevant to these tests
    warnings.filterwarnings("ignore", message=".*token_id must be.*")
