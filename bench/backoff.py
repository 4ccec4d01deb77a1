"""Backoff: tasks/s against a server that fails 30% of first attempts, before and after.

`batcher serve --fault-rate 0.3 --fault-kinds 500 --latency S` in its own process; a few hundred
chat tasks at concurrency 8. Each failed first attempt waits out a backoff (0.5-1 s) before its
retry. Before, a waiting task held its worker, so the provider sat idle while workers slept;
now the worker takes the next task meanwhile. Runs this checkout's batcher and the package in
``--before DIR`` (e.g. ``git archive eb29c09 batcher | tar -x -C DIR``), alternating, and prints
the median tasks/s of each and each run's requests (summary.json); each run has a fresh
server, so the same bodies fail their first try in both.

    python bench/backoff.py --before DIR [--tasks 600] [--concurrency 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from common import ServedProcess, batcher, captions_manifest, earlier_batcher, run_child, workdir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--before", metavar="DIR", required=True)
    args = parser.parse_args()
    folder = workdir("backoff")
    times: dict[str, list[float]] = {"before": [], "after": []}
    requests: dict[str, list[int]] = {"before": [], "after": []}
    for round_number in range(args.rounds):
        for which in ("before", "after"):
            # A fresh server for each run: the same bodies fail their first try in both.
            server = ServedProcess("--fault-rate", "0.3", "--fault-kinds", "500",
                                   "--latency", str(args.latency))
            try:
                manifest = captions_manifest(folder / f"{which}-{round_number}.yaml", "backoff",
                                             server.api_url, args.tasks, args.concurrency)
                output = folder / f"{which}-{round_number}"
                command = (earlier_batcher(args.before) if which == "before" else batcher()) + [
                    "run", str(manifest), "--no-progress", "--output", str(output)]
                measured = run_child(command, folder)
            finally:
                server.stop()
            if measured.exit_code != 0:
                sys.exit(f"{which} failed: {measured.exit_code}\n{measured.stderr[-2000:]}")
            times[which].append(measured.seconds)
            requests[which].append(json.loads((output / "summary.json").read_text())["requests"])
    rates = {which: args.tasks / statistics.median(seconds) for which, seconds in times.items()}
    print(f"backoff: {args.tasks} chat tasks at concurrency {args.concurrency}, 30% of first "
          f"attempts fail with 500, {args.latency * 1000:.0f} ms per answer, median of "
          f"{args.rounds} rounds: before {rates['before']:.0f} tasks/s, after "
          f"{rates['after']:.0f} tasks/s ({rates['after'] / rates['before']:.1f}x); requests "
          f"per round before {requests['before']}, after {requests['after']}")


if __name__ == "__main__":
    main()
