"""Providers: profiles and keys (config), rate limits (rates), prices and costs (prices),
parameter rules (rules), the interface (base), the OpenAI-compatible client (openai_compat),
what an answer holds (answers) and image downloads (download)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import aiohttp

from batcher.providers.base import ChatAnswer, ImageAnswer, ImageItem, Provider
from batcher.providers.config import ProviderConfig, builtin_providers, resolve_key
from batcher.providers.openai_compat import OpenAICompatible

__all__ = [
    "ChatAnswer", "ImageAnswer", "ImageItem", "OpenAICompatible", "Provider", "ProviderConfig",
    "builtin_providers", "open_clients", "resolve_key",
]


@asynccontextmanager
async def open_clients(
    configs: Mapping[str, ProviderConfig],
    keys: Mapping[str, str | None],
    session: aiohttp.ClientSession,
) -> AsyncIterator[dict[str, OpenAICompatible]]:
    """A client per provider on one session; starts the built-in server if one is ``local``."""
    server = None
    if any(config.is_local for config in configs.values()):
        from batcher.server import LocalServer  # only runs that use it pay for importing it

        server = LocalServer()
        await server.start()
    try:
        yield {
            name: OpenAICompatible(
                config, session, keys.get(name),
                base_url=server.api_url if server is not None and config.is_local else None,
            )
            for name, config in configs.items()
        }
    finally:
        if server is not None:
            await server.stop()
