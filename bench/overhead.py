"""Overhead: batcher end to end against a bare aiohttp loop, same requests, same server, one run.

An unlimited, instant server (`batcher serve` in its own process); a few thousand chat tasks at
concurrency 64. batcher keeps its durable ledger and writes every completion to disk. The two
clients alternate for a few rounds (the machine's load drifts); prints the median of each and the
ratio of medians. Times are whole processes, start-up included.

    python bench/overhead.py [--tasks 3000] [--concurrency 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from common import ServedProcess, batcher, file_creation_cost, run_child, workdir, write

BARE_LOOP = r'''
import asyncio, sys
import aiohttp

async def main(url, count, concurrency):
    queue = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    async def worker(session):
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": "llama-3.1-8b-instruct", "messages": [
                {"role": "user", "content": f"Write a caption for poster {i}"}], "max_tokens": 20}
            async with session.post(url + "/chat/completions", json=body) as response:
                data = await response.json()
                assert data["choices"][0]["message"]["content"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server = ServedProcess()
    folder = workdir("overhead")
    bare_times, our_times = [], []
    try:
        manifest = write(folder / "overhead.yaml", f"""
            name: overhead
            providers:
              bench: {{base_url: "{server.api_url}", concurrency: {args.concurrency},
                       rate_limit: null}}
            jobs:
              - name: captions
                type: chat
                provider: bench
                model: llama-3.1-8b-instruct
                prompt: "Write a caption for poster {{i}}"
                vars: {{i: [{", ".join(str(i) for i in range(args.tasks))}]}}
                params: {{max_tokens: 20}}
        """)
        disk = file_creation_cost(folder)
        for round_number in range(args.rounds):
            # A fresh output folder each round: deleting thousands of files just before a run
            # leaves the file system busy and would be measured as batcher's time.
            output = folder / f"round-{round_number}"
            bare = run_child([sys.executable, "-c", BARE_LOOP, server.api_url, str(args.tasks),
                              str(args.concurrency)], folder)
            ours = run_child(batcher("run", str(manifest), "--no-progress", "--output",
                                     str(output)), folder)
            if ours.exit_code != 0 or bare.exit_code != 0:
                sys.exit(f"a run failed: batcher {ours.exit_code}, bare {bare.exit_code}\n"
                         f"{ours.stderr[-2000:]}{bare.stderr[-2000:]}")
            bare_times.append(bare.seconds)
            our_times.append(ours.seconds)
    finally:
        server.stop()
    bare_rate = args.tasks / statistics.median(bare_times)
    our_rate = args.tasks / statistics.median(our_times)
    print(f"overhead: {args.tasks} chat tasks at concurrency {args.concurrency}, median of "
          f"{args.rounds} rounds: bare aiohttp {bare_rate:.0f} tasks/s, batcher {our_rate:.0f} "
          f"tasks/s (ledger + files on), ratio {our_rate / bare_rate:.2f}; "
          f"disk: {disk:.0f} us per new file")


if __name__ == "__main__":
    main()
