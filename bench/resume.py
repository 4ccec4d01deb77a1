"""Resume at scale: re-run a finished 100,000-task run. It must send nothing.

First builds the finished run for real (batcher against an instant built-in server, chat tasks,
every completion on disk), unless output/bench/resume already holds it; then times the re-run.

    python bench/resume.py [--tasks 100000]
"""

from __future__ import annotations

import argparse
import json

from common import BENCH_ROOT, batcher, run_child, start_server, workdir, write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100_000)
    args = parser.parse_args()
    server = start_server(max_records=None)
    folder = BENCH_ROOT / "resume"
    summary_path = folder / "output/resume/summary.json"
    try:
        fresh = (not summary_path.exists()
                 or json.loads(summary_path.read_text())["ok"] != args.tasks)
        if fresh:
            folder = workdir("resume")
        prompts = 100
        write(folder / "resume.yaml", f"""
            name: resume
            providers:
              bench: {{base_url: "{server.api_url}", concurrency: 64, rate_limit: null}}
            jobs:
              - name: captions
                type: chat
                provider: bench
                model: llama-3.1-8b-instruct
                prompt: "Caption {{n}} for poster {{i}}"
                vars: {{n: [{", ".join(str(n) for n in range(prompts))}],
                        i: [{", ".join(str(i) for i in range(args.tasks // prompts))}]}}
                params: {{max_tokens: 8}}
        """)
        if fresh:
            first = run_child(batcher("run", "resume.yaml", "--no-progress"), folder)
            print(f"resume: first run of {args.tasks} tasks took {first.seconds:.0f} s "
                  f"(exit {first.exit_code})")
        before = len(server.stats.requests)
        again = run_child(batcher("run", "resume.yaml", "--no-progress"), folder)
        sent = len(server.stats.requests) - before
    finally:
        server.stop_thread()
    print(f"resume: re-run of a finished {args.tasks}-task run: exit {again.exit_code}, "
          f"requests sent {sent}, wall {again.seconds:.2f} s, peak RSS {again.peak_rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
