"""What one task came to, as a value: its :class:`Record` (status, files, usage, cost) and each
saved :class:`FileRecord`. The ledger (:mod:`batcher.store.ledger`) keeps them; the run makes
them, reports render them, and a task's sidecar carries one as JSON."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from batcher import fastjson


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A saved file, relative to the output folder."""

    path: str
    size: int
    sha256: str


@dataclass(slots=True)
class Record:
    """The outcome of one task in one run; ``attempts`` adds to earlier runs' count."""

    id: str
    job: str
    provider: str
    kind: str
    model: str
    prompt: str
    seed: int | None
    status: str
    attempts: int
    vars: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    http_status: int | None = None
    files: list[FileRecord] = field(default_factory=list)
    usage: Mapping[str, Any] | None = None
    response: Mapping[str, Any] | None = None
    started: float | None = None
    finished: float | None = None
    # finished - started: the task's whole course in this run, from when a worker took it
    # (before its pacer's turn) through retries, 429 pauses, downloads and writes; not one
    # request's latency.
    elapsed: float | None = None
    request_id: str | None = None  # the provider's x-request-id of the last answer
    # What this task's run paid for it in USD, retries and re-generations included; None when
    # a price was unknown (never 0 for unknown).
    cost_usd: float | None = None
    derived: Mapping[str, Any] | None = None  # files made from the images (batcher.outputs)

    def as_dict(self) -> dict[str, Any]:
        """The record as plain JSON values (a task's sidecar carries this)."""
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["vars"], data["params"] = dict(self.vars), dict(self.params)
        data["files"] = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """The record a sidecar carries; raises ``ValueError`` when it is not one."""
        try:
            values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            values["files"] = [FileRecord(str(f["path"]), int(f["size"]), str(f["sha256"]))
                               for f in data["files"]]
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a task record: {exc!r}") from None

    def as_row(self) -> tuple[Any, ...]:
        return (
            self.id, self.job, self.provider, self.kind, self.model, self.prompt, self.seed,
            _dumps(dict(self.vars)) if self.vars else None,
            _dumps(dict(self.params)) if self.params else None, self.status, self.attempts,
            self.reason, self.error, self.error_code, self.http_status,
            _dumps([[f.path, f.size, f.sha256] for f in self.files]),
            _dumps(self.usage), _dumps(self.response), self.started, self.finished, self.elapsed,
            self.request_id, self.cost_usd, _dumps(self.derived),
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Record:
        """A record from a row of ``records()``'s query (its columns in field order)."""
        values = list(row)
        for index, empty in _JSON_FIELDS:
            values[index] = fastjson.loads(values[index]) if values[index] else empty()
        values[_FILES] = [FileRecord(*item) for item in values[_FILES]]
        return cls(*values)


# Fields kept as JSON text: their position among the fields, and what makes the value of an
# empty column.
_JSON_FIELDS: tuple[tuple[int, Callable[[], Any]], ...] = tuple(
    (index, {"vars": dict, "params": dict, "files": list}.get(f.name, lambda: None))
    for index, f in enumerate(fields(Record))
    if f.name in {"vars", "params", "files", "usage", "response", "derived"}
)


_FIELD_NAMES = tuple(f.name for f in fields(Record))


_FILES = _FIELD_NAMES.index("files")


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    return fastjson.dumps(value)


class RecordSource(Protocol):
    """What hands out records: a ledger, or the merged view of an output's ledgers."""

    def records(self) -> Iterator[Record]:
        """Every record, in the order first written."""

    def ok_costs(self) -> Iterator[tuple[str, str, float | None]]:
        """(id, job, cost) of every ok record."""
