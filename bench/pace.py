"""Pace: how close batcher runs to a provider's real limit, and whether it ever crosses it.

A server enforcing a strict rolling window (default 20 per second) with 100 ms latency; 200 image
tasks with the manifest stating that same limit. Efficiency = ideal / actual, where ideal is the
time the limit allows: (tasks - 1) / rate between the first start and the last, as the server saw
them. Also prints the wall-time figure and the 429s.

    python bench/pace.py [--tasks 200] [--rate 20] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import json

from common import batcher, run_child, start_server, workdir, write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    server = start_server(rate_limit=(args.rate, 1.0), latency=args.latency, max_records=None)
    folder = workdir("pace")
    try:
        manifest = write(folder / "pace.yaml", f"""
            name: pace
            providers:
              bench: {{base_url: "{server.api_url}", rate_limit: {args.rate}/s, concurrency: 16}}
            jobs:
              - name: tiles
                type: image
                provider: bench
                model: flux.1-schnell
                prompt: "A tile"
                seeds: {args.tasks}
                params: {{size: 256x256, response_format: b64_json}}
        """)
        result = run_child(batcher("run", str(manifest), "--no-progress"), folder)
        if result.exit_code != 0:
            raise SystemExit(f"batcher exited {result.exit_code}: {result.stderr[-2000:]}")
    finally:
        server.stop_thread()
    starts = sorted(server.stats.starts("/images/generations"))
    ideal = (args.tasks - 1) / args.rate
    span = starts[-1] - starts[0]
    summary = json.loads((folder / "output/pace/summary.json").read_text())
    run_ideal = ideal + args.latency
    print(f"pace: {args.tasks} tasks at {args.rate}/s, {args.latency * 1000:.0f} ms latency: "
          f"efficiency {ideal / span:.3f} (server-side span {span:.2f} s vs ideal {ideal:.2f} s), "
          f"run efficiency {run_ideal / summary['elapsed_s']:.3f} "
          f"(run {summary['elapsed_s']:.2f} s), 429s {server.stats.rate_limited}, "
          f"requests {len(starts)}")


if __name__ == "__main__":
    main()
