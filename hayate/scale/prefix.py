"""Prefix affinity: requests whose prompts begin alike go to the same replica, whose prefix
cache then holds those tokens' KV blocks. The ingress has no tokenizer, so the key is the first
PREFIX_CHARS characters of the request's text in order (tools, then each message's role and
content); rendezvous hashing maps a key to one of the live replicas, and moves only the keys
of a replica that leaves."""
from __future__ import annotations

import hashlib
import json
from typing import Iterable

# ~64 tokens of English: enough to tell system prompts apart, short enough that conversations
# sharing one (and their follow-up turns) land together.
PREFIX_CHARS = 256
ROUTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def prefix_key(body: bytes) -> str | None:
    """The routing key of a chat or completions request body; None when it has no text to key
    on (not JSON, no messages or prompt), which leaves the choice to load alone."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(request, dict):
        return None
    text = _leading_text(request)
    return text[:PREFIX_CHARS] if text else None


def _leading_text(request: dict) -> str:
    parts = [json.dumps(request["tools"], sort_keys=True)] if request.get("tools") else []
    messages = request.get("messages")
    if isinstance(messages, list):
        parts += [f"{m.get('role', '')}:{_content_text(m.get('content'))}" for m in messages if isinstance(m, dict)]
    else:
        parts.append(_prompt_text(request.get("prompt")))
    return "\n".join(part for part in parts if part)


def _content_text(content) -> str:
    """A message's text; of a list of parts, the text parts (an image part counts by its URL's start)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    pieces = []
    for part in (p for p in content if isinstance(p, dict)):
        url = part.get("image_url")
        pieces.append(part.get("text") or str(url.get("url", "") if isinstance(url, dict) else url or "")[:64])
    return " ".join(pieces)


def _prompt_text(prompt) -> str:
    """/v1/completions' prompt: a string, token ids, or a batch of either (keyed by its first)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return " ".join(map(str, prompt))
    return prompt if isinstance(prompt, str) else ""


def rank_replicas(key: str, replica_ids: Iterable[str]) -> list[str]:
    """Replica ids by preference for `key` (rendezvous hashing: highest score first); the same
    key ranks the same replicas alike in every ingress process, with no shared state."""
    def score(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()
    return sorted(replica_ids, key=score, reverse=True)
