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


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster on a busy machine, and kernels then match the single-threaded workers.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: a ChatML template, so the tiny tokenizer can stand in for a chat model's
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def plain_tokenizer():
    from tiny_checkpoint import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    from tiny_checkpoint import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(params=["plain", "chat"])
def tokenizer(request, plain_tokenizer, chat_tokenizer):
    """The tiny tokenizer without, then with, a chat template."""
    return plain_tokenizer if request.param == "plain" else chat_tokenizer


@pytest.fixture(scope="session")
def saved_bases(tmp_path_factory):
    """Tiny Llama and GPT-2 checkpoints on disk (quantized loading needs a checkpoint)."""
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("bases")
    for family in ("llama", "gpt2"):
        tiny_model(family).save_pretrained(root / family)
    return root
