"""Token counting for usage events. Upstream MCP servers do not report tokens, so the default
is an estimate: one token per 4 bytes of the JSON-RPC message (rounded up), the usual rule of
thumb for English text and JSON with GPT-style tokenizers. Swap it with
``EXTERNAL_MCP_TOKEN_COUNTER = "package.module.Class"`` (a class with ``count(data: bytes) -> int``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

from django.conf import settings
from django.utils.module_loading import import_string


class TokenCounter(Protocol):
    def count(self, data: bytes) -> int: ...


class ByteEstimate:
    def count(self, data: bytes) -> int:
        return (len(data) + 3) // 4


@lru_cache(maxsize=4)
def _load(path: str) -> TokenCounter:
    return import_string(path)()


def token_counter() -> TokenCounter:
    return _load(getattr(settings, "EXTERNAL_MCP_TOKEN_COUNTER", "usage.tokens.ByteEstimate"))
