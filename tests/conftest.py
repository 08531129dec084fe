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


@pytest.fixture(scope="session")
def saved_bases(tmp_path_factory):
    """Tiny Llama and GPT-2 checkpoints on disk (quantized loading needs a checkpoint)."""
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("bases")
    for family in ("llama", "gpt2"):
        tiny_model(family).save_pretrained(root / family)
    return root
