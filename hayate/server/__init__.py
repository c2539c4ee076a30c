"""hayate serve: the OpenAI / GroqCloud-compatible HTTP API (FastAPI)."""
from hayate.server.app import create_app
from hayate.server.state import ServedModel, ServerSettings

__all__ = ["create_app", "ServedModel", "ServerSettings"]
