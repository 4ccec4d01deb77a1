"""The Provider interface and the answers it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from batcher.providers.config import ProviderConfig


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One generated image as the provider sent it: base64 bytes, or a URL to fetch at once."""

    b64: str | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class ImageAnswer:
    items: tuple[ImageItem, ...]
    body: Mapping[str, Any]  # the response body with the image payloads taken out
    usage: Mapping[str, Any] | None = None
    request_id: str | None = None  # the provider's x-request-id header, where it sent one


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    texts: tuple[str, ...]  # every choice's content, by its index (n > 1 gives several)
    body: Mapping[str, Any]  # the completion object (assembled from chunks when streamed)
    usage: Mapping[str, Any] | None = None
    request_id: str | None = None  # the provider's x-request-id header, where it sent one

    @property
    def text(self) -> str:
        """The first choice's content."""
        return self.texts[0]


class Provider(Protocol):
    """An image and chat API. :class:`~batcher.providers.openai_compat.OpenAICompatible` is the
    one implementation batcher ships."""

    config: ProviderConfig

    async def generate_image(self, body: Mapping[str, Any]) -> ImageAnswer: ...

    async def complete_chat(self, body: Mapping[str, Any]) -> ChatAnswer: ...

    async def list_models(self) -> list[str]: ...
