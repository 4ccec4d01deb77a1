"""Memory of the user-id check (issue 18): a manifest's task files with a million ids.

Prints the peak traced memory of validating one JSONL file of N lines with ids (the check
holds a 64-bit digest per id), next to what holding the ids themselves would take.

    python bench/user_ids.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from batcher.manifest.jsonl import check_jsonl


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "tasks.jsonl")
        with path.open("w") as handle:
            for n in range(count):
                handle.write(f'{{"id": "product-{n:09d}", "model": "flux.1-schnell", '
                             f'"prompt": "A product shot of item {n}"}}\n')
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
          f"id), {elapsed:.1f} s; a set of the ids themselves: {as_strings / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
