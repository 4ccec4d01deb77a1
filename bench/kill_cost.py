"""Kill cost: generations re-paid per `kill -9` of a running batcher, at a given concurrency.

The built-in server counts every generation it answers (paid work). batcher is killed at random
moments, then the same command finishes the run; re-paid = generations answered - tasks.

    python bench/kill_cost.py [--kills 10] [--concurrency 8] [--tasks 300]
"""

from __future__ import annotations

import argparse
import random
import sys

from common import batcher, run_child, start_server, workdir, write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    server = start_server(latency=0.05, max_records=None)
    folder = workdir("kill")
    try:
        write(folder / "kill.yaml", f"""
            name: kill
            providers:
              bench: {{base_url: "{server.api_url}", concurrency: {args.concurrency},
                       rate_limit: 200/s}}
            jobs:
              - name: tiles
                type: image
                provider: bench
                model: flux.1-schnell
                prompt: "A tile"
                seeds: {args.tasks}
                params: {{size: 256x256, response_format: b64_json}}
        """)
        command = batcher("run", "kill.yaml", "--no-progress")
        for _ in range(args.kills):
            run_child(command, folder, kill_after=rng.uniform(0.6, 1.2))
        final = run_child(command, folder)
    finally:
        server.stop_thread()
    paid = sum(server.stats.generations.values())
    repaid = paid - args.tasks
    if final.exit_code != 0:
        sys.exit(f"final run exited {final.exit_code}: {final.stderr[-1500:]}")
    print(f"kill cost: {args.kills} kills at concurrency {args.concurrency}: {paid} generations "
          f"for {args.tasks} tasks, re-paid {repaid} ({repaid / args.kills:.1f} per kill; "
          f"bound: {args.concurrency})")


if __name__ == "__main__":
    main()
