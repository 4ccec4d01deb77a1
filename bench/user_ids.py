"""Memory and time of the user-id check (issue 18): a manifest's task files with a million ids.

Prints, for N lines with ids:

- the peak traced memory of validating one JSONL file (the check holds a 64-bit digest per
  id), next to what holding the ids themselves would take;
- the time to load a manifest whose ids look like batcher's computed ids (``uuid4().hex``:
  32 hex characters), beside a grid job: the computed ids are walked against the digests;
- the time to refuse that file read by two jobs (its first line is the first repeat).

    python bench/user_ids.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from batcher.errors import ManifestError
from batcher.manifest import load_manifest
from batcher.manifest.jsonl import check_jsonl

GRID = """\
name: bench
jobs:
  - {name: grid, type: image, provider: local, model: flux.1-schnell,
     prompt: "item {n}", vars: {n: [%s]}}
  - {name: listed, provider: local, file: tasks.jsonl}
"""


def write_tasks(path: Path, count: int, *, hexlike: bool) -> None:
    with path.open("w") as handle:
        for n in range(count):
            task_id = f"{n:032x}" if hexlike else f"product-{n:09d}"
            handle.write(f'{{"id": "{task_id}", "model": "flux.1-schnell", '
                         f'"prompt": "A product shot of item {n}"}}\n')


def memory(folder: str, count: int) -> None:
    path = Path(folder, "tasks.jsonl")
    write_tasks(path, count, hexlike=False)
    tracemalloc.start()
    started = time.perf_counter()
    check_jsonl(path, max_input_bytes=1 << 20)
    elapsed = time.perf_counter() - started
    _now, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    ids = {f"product-{n:09d}" for n in range(count)}
    _now, as_strings = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del ids
    print(f"{count} ids: peak {peak / 1e6:.1f} MB while validating ({peak / count:.0f} B an "
          f"id), {elapsed:.1f} s under tracemalloc; a set of the ids themselves: "
          f"{as_strings / 1e6:.1f} MB")


def computed(folder: str, count: int, grid: int) -> None:
    values = ", ".join(str(n) for n in range(grid))
    manifest = Path(folder, "m.yaml")
    manifest.write_text(GRID % values)
    for hexlike in (False, True):
        write_tasks(Path(folder, "tasks.jsonl"), count, hexlike=hexlike)
        started = time.perf_counter()
        load_manifest(manifest)
        elapsed = time.perf_counter() - started
        kind = "ids of a computed id's form (the computed ids walked)" if hexlike else \
            "plain ids (no walk)"
        print(f"load_manifest, {count} {kind} + a grid of {grid} tasks: {elapsed:.1f} s")
    manifest.write_text(manifest.read_text().replace("  - {name: grid", "  - {name: again, "
                        "provider: local, file: tasks.jsonl}\n  - {name: grid"))
    started = time.perf_counter()
    try:
        load_manifest(manifest)
    except ManifestError as exc:
        print(f"the file read by two jobs: refused in {time.perf_counter() - started:.1f} s "
              f"({exc})"[:160])


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as folder:
        memory(folder, count)
        computed(folder, count, 1000)


if __name__ == "__main__":
    main()
