import sys
from pathlib import Path

import openai
import pytest

# Test helpers (tiny_models) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

from server_harness import openai_client  # noqa: E402


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    """The official client against the module's `server` fixture."""
    return openai_client(server)


@pytest.fixture(scope="module")
def model(server) -> str:
    """The name the module's server serves its model under."""
    return server.state.model.name
