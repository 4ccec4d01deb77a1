"""Provider profiles: the built-in ones, overrides from a manifest, and API key lookup."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batcher.errors import ConfigError
from batcher.providers.prices import PriceList
from batcher.providers.rates import Rate, parse_rate

#: Set by ``provider: local``: open_clients() starts the built-in server and fills the URL in.
LOCAL_URL = "local:"


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """How to reach one OpenAI-compatible endpoint and how hard to push it."""

    name: str
    base_url: str
    api_key_env: str | None = None
    api_key_file: str | None = None
    key_required: bool = False
    rate_limit: Rate | None = None
    concurrency: int = 8
    timeout: float = 120.0
    connect_timeout: float = 10.0
    retries: int = 5
    max_wait: float = 120.0
    download_cap: int = 50 * 1024 * 1024
    # The most bytes one API answer may hold once decoded (gzip inflation counted): a real
    # answer never comes near it; a larger one fails its task (too_large), read no further.
    max_response_bytes: int = 64 * 1024 * 1024
    regenerations: int = 1  # generations paid again when their images cannot be downloaded
    max_input_bytes: int = 20 * 1024 * 1024  # largest local input image, before any request
    # The body field a task's seed travels in; None ("none" in a manifest) for an API that
    # documents no seed: seeds then only repeat a task (a repeat index), none is sent.
    seed_param: str | None = "seed"
    prices: PriceList = PriceList()  # USD by model; a model not listed has an unknown price

    @property
    def is_local(self) -> bool:
        return self.base_url == LOCAL_URL


def builtin_providers() -> dict[str, ProviderConfig]:
    """The providers every manifest knows without defining them."""
    return {
        "vultr": ProviderConfig(
            "vultr", "https://api.vultrinference.com/v1", api_key_env="VULTR_API_KEY",
            api_key_file="~/.config/vultr/api_key", key_required=True,
            rate_limit=Rate(60, 60.0), concurrency=4, seed_param=None,
        ),
        "modelverse": ProviderConfig(
            "modelverse", "https://api.modelverse.cn/v1", api_key_env="MODELVERSE_API_KEY",
            key_required=True, rate_limit=Rate(60, 60.0), concurrency=4,
        ),
        "openai": ProviderConfig(
            "openai", "https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
            key_required=True, rate_limit=Rate(60, 60.0), concurrency=8,
        ),
        "local": ProviderConfig("local", LOCAL_URL, concurrency=8, timeout=30.0),
    }


_FIELD_TYPES = {
    "base_url": str, "api_key_env": str, "api_key_file": str, "rate_limit": str,
    "concurrency": int, "timeout": float, "connect_timeout": float, "retries": int,
    "max_wait": float, "download_cap": int, "max_response_bytes": int, "regenerations": int,
    "max_input_bytes": int, "seed_param": str,
}

_KIND_NAMES = {str: "a string", int: "a whole number", float: "a number"}


def provider_from_mapping(
    name: str, data: Mapping[str, Any], base: ProviderConfig | None
) -> ProviderConfig:
    """A provider defined or overridden in a manifest.

    Raises ``ValueError("<field>: <message>")`` for the manifest loader to place.
    """
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key == "prices":
            if not isinstance(value, PriceList):
                raise TypeError("prices: the manifest loader turns them into a PriceList")
            changes[key] = value
            continue
        kind = _FIELD_TYPES.get(key)
        if kind is None:
            raise ValueError(f"{key}: unknown field (expected one of: "
                             f"{', '.join([*_FIELD_TYPES, 'prices'])})")
        if value is None and key in {"rate_limit", "api_key_env", "api_key_file"}:
            changes[key] = None
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{key}: must be {_KIND_NAMES[kind]}, not {value!r}")
        changes[key] = _checked(key, value)
    if base is None:
        if "base_url" not in changes:
            raise ValueError("base_url: required for a provider batcher does not know")
        base = ProviderConfig(name, changes["base_url"])
    config = replace(base, **changes)
    if ("api_key_env" in changes or "api_key_file" in changes) and not config.is_local:
        config = replace(config, key_required=bool(config.api_key_env or config.api_key_file))
    return config


def _checked(key: str, value: Any) -> Any:
    if key == "base_url":
        parts = urlsplit(value)
        if value != LOCAL_URL and (parts.scheme not in {"http", "https"} or not parts.netloc):
            raise ValueError(f"{key}: must be an http(s) URL such as https://host/v1")
        return value.rstrip("/")
    if key == "rate_limit":
        try:
            return parse_rate(value)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    if key in {"concurrency", "download_cap", "max_input_bytes", "max_response_bytes"} \
            and value < 1:
        raise ValueError(f"{key}: must be at least 1")
    if key in {"retries", "regenerations"} and value < 0:
        raise ValueError(f"{key}: must be 0 or more")
    if key in {"timeout", "connect_timeout", "max_wait"} and value <= 0:
        raise ValueError(f"{key}: must be more than 0 seconds")
    if key == "seed_param":
        if not value.isidentifier():
            raise ValueError(f"{key}: must be a body field name such as seed, or none")
        return None if value == "none" else value
    return value


def resolve_key(config: ProviderConfig) -> str | None:
    """The API key: the named environment variable first, then the key file.

    Raises :class:`ConfigError` naming both places when a key is required and neither has one,
    and when a key holds spaces or control characters (it could not travel in a header).
    """
    if config.api_key_env:
        value = os.environ.get(config.api_key_env, "").strip()
        if value:
            return _checked_key(value, f"the environment variable {config.api_key_env}", config)
    if config.api_key_file:
        path = Path(config.api_key_file).expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            value = ""
        if value:
            return _checked_key(value, f"the file {config.api_key_file}", config)
    if not config.key_required:
        return None
    places = []
    if config.api_key_env:
        places.append(f"set the environment variable {config.api_key_env}")
    if config.api_key_file:
        places.append(f"write the key to {config.api_key_file}")
    raise ConfigError(f"provider {config.name}: no API key; {' or '.join(places)}")


def _checked_key(key: str, source: str, config: ProviderConfig) -> str:
    if any(char.isspace() or not char.isprintable() for char in key):
        raise ConfigError(f"provider {config.name}: the API key in {source} holds spaces or "
                          "control characters; it must be one line with nothing else")
    return key
