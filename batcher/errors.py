"""The exception tree of batcher.

Everything batcher raises on purpose derives from :class:`BatcherError`; the CLI turns each
family into one exit code and a plain message; no other exception leaves a command.

    BatcherError
    ├── UsageError            exit 2: a bad command line or option
    │   └── ManifestError     exit 2: a manifest that cannot be run (file, line, field)
    ├── ConfigError           exit 2: a provider that cannot be reached as configured (missing key)
    ├── AuthError             exit 3: the provider refused the key or the config (401/403)
    ├── Interrupted           exit 130: Ctrl-C or SIGTERM; the same command resumes
    ├── StoreError            exit 1: an object store stayed down or refused the credentials
    └── ProviderError         one request went wrong; the run's course retries it or records it
        ├── HTTPStatusError   the provider answered with a non-2xx status
        ├── ResponseError     a 2xx answer without what it promises (bad JSON, no data, bad base64)
        ├── TransportError    timeout, refused or reset connection, truncated body
        ├── DownloadError     an image URL that could not be fetched or is not an image
        ├── InternalError     anything else one task's answer raised (a bug): that task fails
        └── NameTaken         the task's file names belong to another task: never sent

Lower-level exceptions (aiohttp, json, binascii, yaml) are translated into these in exactly one
place each, with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any


class BatcherError(Exception):
    """Base class of every error batcher raises on purpose."""

    exit_code = 1


class UsageError(BatcherError):
    """The command line or an option is wrong; nothing was sent."""

    exit_code = 2


class ManifestError(UsageError):
    """A manifest that cannot be run: names the file, the line where known, and the field."""

    def __init__(
        self, message: str, *, file: str, line: int | None = None, field: str | None = None
    ) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.reason = message
        where = f"{file}:{line}" if line else file
        what = f"{field}: {message}" if field else message
        super().__init__(f"{where}: {what}")


class ConfigError(BatcherError):
    """A provider is configured in a way that cannot work (a missing key); nothing was sent."""

    exit_code = 2


class AuthError(BatcherError):
    """The provider refused the key or the configuration (401/403); the run stopped early."""

    exit_code = 3


class Interrupted(BatcherError):
    """The run was interrupted by a signal; everything finished is saved.

    A run reports this through its exit code rather than by raising: its summary and ledger
    are written on the way out."""

    exit_code = 130


class StoreError(BatcherError):
    """An object store kept failing past its retry deadline, or refused the credentials.
    Tasks not yet uploaded stay pending; the same command resumes once the store is back."""

    exit_code = 1


class ProviderError(BatcherError):
    """One request to a provider went wrong. ``reason`` is a short stable name for reports."""

    reason = "provider_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class HTTPStatusError(ProviderError):
    """A non-2xx answer; ``message`` and ``code`` come from the provider's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status
        self.code = code
        self.request_id = request_id  # the provider's x-request-id header
        self.body = body  # the error body as JSON, where it was a small JSON object
        self.reason = f"http_{status}"

    def __str__(self) -> str:
        code = f" ({self.code})" if self.code else ""
        return f"HTTP {self.status}{code}: {self.message}"


class ResponseError(ProviderError):
    """A 2xx answer that does not hold what it promises. ``usage`` is the answer's own usage
    object where it had one: the answer was paid for, and is charged by it."""

    def __init__(self, message: str, *, reason: str = "bad_response",
                 usage: Any = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.usage = usage


class TransportError(ProviderError):
    """The request never got a whole answer: timeout, refused or reset connection."""

    def __init__(self, message: str, *, reason: str = "connection", reached: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.reached = reached  # False: no connection was made at all (refused, no route)


class DownloadError(ProviderError):
    """An image URL could not be downloaded, or what came back is not an image.

    ``status`` is the image host's HTTP status, where it answered one."""

    def __init__(
        self, message: str, *, reason: str = "download", retryable: bool = True,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
        self.status = status


class InternalError(ProviderError):
    """An exception batcher did not expect while handling one task's answer; only that task
    fails (reason ``internal``), never the run."""

    reason = "internal"


class NameTaken(ProviderError):
    """The files a task would write are another task's (the ledger's claim on their stem):
    the task fails (reason ``name_taken``) before it is sent, and those files stay as they
    are."""

    reason = "name_taken"
