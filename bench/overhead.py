"""Overhead: batcher end to end against a bare aiohttp loop, same requests, same server, one run.

An unlimited, instant server; a few thousand chat tasks at concurrency 64. batcher keeps its
durable ledger and writes every completion to disk. Prints tasks/s for both and the ratio.

    python bench/overhead.py [--tasks 3000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import sys

from common import batcher, run_child, start_server, workdir, write

BARE_LOOP = r'''
import asyncio, json, sys, time
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
    args = parser.parse_args()
    server = start_server(max_records=None)
    try:
        folder = workdir("overhead")
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
        bare = run_child([sys.executable, "-c", BARE_LOOP, server.api_url, str(args.tasks),
                          str(args.concurrency)], folder)
        ours = run_child(batcher("run", str(manifest), "--no-progress"), folder)
        if ours.exit_code != 0 or bare.exit_code != 0:
            sys.exit(f"a run failed: batcher {ours.exit_code}, bare {bare.exit_code}\n"
                     f"{ours.stderr[-2000:]}{bare.stderr[-2000:]}")
    finally:
        server.stop_thread()
    bare_rate = args.tasks / bare.seconds
    our_rate = args.tasks / ours.seconds
    print(f"overhead: {args.tasks} chat tasks at concurrency {args.concurrency}: "
          f"bare aiohttp {bare_rate:.0f} tasks/s, batcher {our_rate:.0f} tasks/s "
          f"(ledger + files on), ratio {our_rate / bare_rate:.2f}, "
          f"batcher peak RSS {ours.peak_rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
