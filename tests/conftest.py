import sys
from pathlib import Path

import openai
import pytest

# Test helpers (tiny_models) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

from server_harness import openai_client  # noqa: E402
from tiny_models import byte_tokenizer  # noqa: E402

from hayate.loading.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    """The official client against the module's `server` fixture."""
    return openai_client(server)


@pytest.fixture(scope="module")
def model(server) -> str:
    """The name the module's server serves its model under."""
    return server.state.model.name


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """The tiny models' byte-level tokenizer (every byte a token, ChatML specials) as hayate reads it."""
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    byte_tokenizer().save_pretrained(folder)
    return Tokenizer.from_folder(folder)
