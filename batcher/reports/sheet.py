"""index.html: a contact sheet of a run, self-contained, with relative links only.

Image jobs are grids: one row per prompt (vars filled in; per asset, with its picked, rejected
and published variants marked, when given the marks of an asset set), one column per model and
seed, each
cell a lazy-loaded thumbnail (the smallest derived size, when the job has sizes) linking to the
full image, the task id and params on hover, after an edit task's input images. Chat
jobs are a table of prompt and completion. Failed tasks stand in place with their reason.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from batcher.outputs import entries
from batcher.providers.prices import Cost
from batcher.records import Record
from batcher.wording import usd

MAX_CELLS_PER_JOB = 5000
MAX_COMPLETION_CHARS = 2000

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #ddd;padding:.4rem;vertical-align:top;text-align:left;font-size:.85rem}
th{background:#f0f0f0}td.prompt{max-width:22rem}
img{width:160px;height:160px;object-fit:cover;display:block;background:#eee}
img.input{width:64px;height:64px;display:inline-block;margin:0 .2rem .2rem 0;opacity:.9}
.failed{color:#a00;max-width:160px;word-break:break-word}.muted{color:#888}
pre{white-space:pre-wrap;margin:0;max-width:48rem}
img.picked{outline:4px solid #2a2;outline-offset:-4px}img.rejected{opacity:.3}
img.published{outline:2px dashed #2a2;outline-offset:-2px}
.mark{font-size:.75rem}.mark.picked,.mark.published{color:#2a2}.mark.rejected{color:#a00}
"""


@dataclass(frozen=True, slots=True)
class Mark:
    """A task's place in an asset set (batcher.publish): its asset's name, and the state of
    each of its images: "picked", "rejected", "published" (the default choice) or ""."""

    asset: str
    states: tuple[str, ...] = ()


@dataclass(slots=True)
class _Job:
    total: int = 0
    ok: int = 0
    cost: Cost = field(default_factory=Cost)  # what the ok tasks cost
    shown: list[Record] = field(default_factory=list)


class ContactSheet:
    """Collects records as they stream past (keeping at most ``MAX_CELLS_PER_JOB`` of each job),
    then renders the page."""

    def __init__(self, marks: Mapping[str, Mark] | None = None) -> None:
        self._jobs: dict[str, _Job] = {}
        self._marks = marks or {}

    def add(self, record: Record) -> Record:
        job = self._jobs.setdefault(record.job, _Job())
        job.total += 1
        job.ok += record.status == "ok"
        if record.status == "ok":
            job.cost.add(record.cost_usd)
        if len(job.shown) < MAX_CELLS_PER_JOB:
            job.shown.append(record)
        return record

    def render(self, root: Path, title: str | None = None) -> Iterator[str]:
        """The page, in pieces; ``root`` is where it lives (its links are relative to it);
        ``title`` names the output (default: the folder's name)."""
        title = title or root.name
        yield ("<!doctype html><html><head><meta charset='utf-8'>"
               f"<title>batcher: {html.escape(title)}</title><style>{_STYLE}</style>"
               f"</head><body><h1>{html.escape(title)}</h1>")
        if not self._jobs:
            yield "<p class='muted'>Nothing has finished yet.</p>"
        else:
            total = Cost()
            for job in self._jobs.values():
                total.merge(job.cost)
            yield f"<p class='spend'>spent: {html.escape(total.text())}</p>"
        for name, job in self._jobs.items():
            yield (f"<h2>{html.escape(name)} <span class='muted'>{job.ok} ok, "
                   f"{job.total - job.ok} failed, spent {html.escape(job.cost.text())}"
                   "</span></h2>")
            images = [record for record in job.shown if record.kind == "image"]
            chats = [record for record in job.shown if record.kind == "chat"]
            if images:  # a JSONL job may hold both kinds
                yield from _image_grid(images, self._marks)
            if chats:
                yield from _chat_table(root, chats)
            if job.total > len(job.shown):
                yield (f"<p class='muted'>{job.total - len(job.shown)} more tasks are listed "
                       "in results.jsonl.</p>")
        yield "</body></html>\n"


def _column(record: Record) -> tuple[str, int]:
    return (record.model, -1 if record.seed is None else record.seed)


def _image_grid(records: list[Record], marks: Mapping[str, Mark]) -> Iterator[str]:
    columns = sorted({_column(r) for r in records})
    # Tasks that differ only in params share a cell; each keeps its thumbnail. In an asset
    # set, a row is an asset (its variants side by side).
    rows: dict[str, dict[tuple[str, int], list[Record]]] = {}
    prompts: dict[str, set[str]] = {}
    for record in records:
        mark = marks.get(record.id)
        key = f"asset:{mark.asset}" if mark else record.prompt
        rows.setdefault(key, {}).setdefault(_column(record), []).append(record)
        prompts.setdefault(key, set()).add(record.prompt)
    head = "".join(
        f"<th>{html.escape(model)}{'' if seed < 0 else f'<br>seed {seed}'}</th>"
        for model, seed in columns
    )
    yield f"<table><tr><th>{'asset' if marks else 'prompt'}</th>{head}</tr>"
    order = sorted(rows, key=lambda key: (not key.startswith("asset:"),
                                          key if key.startswith("asset:") else ""))
    for key in order:  # assets by name; other prompts after them, as they finished
        cells = rows[key]
        if key.startswith("asset:") and marks:
            name = key.removeprefix("asset:")
            texts = "<br>".join(html.escape(p) for p in sorted(prompts[key]))
            yield (f"<tr data-asset='{html.escape(name, quote=True)}'><td class='prompt'>"
                   f"<b>{html.escape(name)}</b><br><span class='muted'>{texts}</span></td>")
        else:
            yield f"<tr><td class='prompt'>{html.escape(key)}</td>"
        for column in columns:
            cell = "".join(_image_cell(record, marks.get(record.id))
                           for record in cells.get(column, ()))
            yield f"<td>{cell}</td>"
        yield "</tr>"
    yield "</table>"


def _hover(record: Record) -> str:
    """What a thumbnail tells on hover: the task id, its vars and its params."""
    lines = [f"task {record.id}"]
    if record.cost_usd is not None:
        lines.append(f"cost {usd(record.cost_usd)}")
    lines += [f"{name} = {value}" for name, value in record.vars.items()]
    lines += [f"{name}: {json.dumps(value)}" for name, value in record.params.items()]
    return "\n".join(lines)


def _image_cell(record: Record, mark: Mark | None = None) -> str:
    if record.status != "ok":
        return (f"<div class='failed' title='{html.escape(record.id)}'>failed: "
                f"{html.escape(record.error or record.reason or 'unknown')}</div>")
    title = html.escape(_hover(record), quote=True)
    derived = entries(record.derived)
    parts = [f"<a href='{_href(e['path'])}'><img class='input' loading='lazy' "
             f"src='{_href(e['path'])}' title='input image' alt='input image'></a>"
             for e in derived if e.get("role") == "input"]
    for index, file in enumerate(record.files):
        state = mark.states[index] if mark and index < len(mark.states) else ""
        # The smallest resized copy as the thumbnail, linking to the full-size file (in the
        # job's format when it has one).
        own = [e for e in derived if e.get("of") == file.path]
        sizes = sorted((e for e in own if isinstance(e.get("side"), int)),
                       key=lambda e: int(e["side"]))
        full = next((e["path"] for e in own if e.get("role") == "full"), file.path)
        href = _href(full)
        src = _href(sizes[0]["path"]) if sizes else href
        css = f" class='{state}'" if state else ""
        parts.append(f"<a href='{href}'><img{css} loading='lazy' src='{src}' title='{title}' "
                     f"alt='{html.escape(record.prompt, quote=True)}'></a>")
        if state:
            parts.append(f"<div class='mark {state}'>{state}</div>")
    return "".join(parts)


def _href(path: object) -> str:
    return quote(str(path), safe="/@")  # "@" of "<stem>@thumb.webp" is fine in a path


def _chat_table(root: Path, records: list[Record]) -> Iterator[str]:
    yield "<table><tr><th>prompt</th><th>model</th><th>seed</th><th>completion</th></tr>"
    for record in records:
        if record.status == "ok" and record.files:
            text = _completion_text(record) or _read_text(root / record.files[0].path)
            cell = f"<pre>{html.escape(text[:MAX_COMPLETION_CHARS])}</pre>"
        else:
            cell = f"<span class='failed'>failed: {html.escape(record.error or '')}</span>"
        seed = "" if record.seed is None else str(record.seed)
        yield (f"<tr title='{html.escape(record.id)}'><td class='prompt'>"
               f"{html.escape(record.prompt)}</td><td>{html.escape(record.model)}</td>"
               f"<td>{seed}</td><td>{cell}</td></tr>")
    yield "</table>"


def _completion_text(record: Record) -> str | None:
    """The completion as the ledger kept it (the saved response), without opening the file."""
    try:
        content = record.response["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _read_text(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return handle.read(MAX_COMPLETION_CHARS)
    except OSError:
        return "(file missing)"
