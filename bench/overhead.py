"""Overhead: batcher end to end against a bare aiohttp loop, same requests, same server, one run.

An unlimited, instant server in its own process; a few thousand chat tasks at concurrency 64.
``--server serve`` (the default) is `batcher serve`; ``--server fast`` a minimal HTTP/1.1 server
answering every request with one fixed completion, many times faster than `batcher serve`: there
the client's own time per task is what the ratio shows. batcher keeps its durable ledger and
writes every completion to disk. The two clients alternate for a few rounds (the machine's load
drifts); prints the median of each and the ratio of medians. Times are whole processes, start-up
included.

    python bench/overhead.py [--tasks 3000] [--concurrency 64] [--rounds 5] [--server fast]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import (
    ServedProcess,
    batcher,
    captions_manifest,
    earlier_batcher,
    file_creation_cost,
    run_child,
    workdir,
)

BARE_LOOP = r'''
import asyncio, sys, time
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

started = time.perf_counter()
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
print(f"loop {time.perf_counter() - started}", file=sys.stderr)
'''

# The fastest server we can write in Python: keep-alive HTTP/1.1, a request read by its
# Content-Length, one fixed chat completion as the answer.
FAST_SERVER = r'''
import asyncio, json, sys

BODY = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "A poster of a quiet harbour."}}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}}).encode()
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
          + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)

class Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(ANSWER)

async def main(port):
    server = await asyncio.get_running_loop().create_server(Http, "127.0.0.1", port)
    async with server:
        await server.serve_forever()

asyncio.run(main(int(sys.argv[1])))
'''


def fast_server() -> ServedProcess:
    """FAST_SERVER in its own process."""
    return ServedProcess(command=[sys.executable, "-c", FAST_SERVER], name="the fast server")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server", choices=["serve", "fast"], default="serve")
    parser.add_argument("--before", metavar="DIR",
                        help="also run the batcher package found in DIR (e.g. an earlier "
                             "commit's, from `git archive COMMIT batcher | tar -x -C DIR`), "
                             "interleaved with the others")
    args = parser.parse_args()
    server = ServedProcess() if args.server == "serve" else fast_server()
    folder = workdir("overhead")
    bare_times, our_times, before_times = [], [], []
    bare_loops, our_loops, before_loops = [], [], []  # without start-up (see below)
    try:
        manifest = captions_manifest(folder / "overhead.yaml", "overhead", server.api_url,
                                     args.tasks, args.concurrency)
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
            bare_loops.append(float(bare.stderr.split("loop ")[-1]))
            our_loops.append(json.loads((output / "summary.json").read_text())["elapsed_s"])
            if args.before:
                before_times.append(_run_before(args.before, manifest, folder, round_number))
                before_loops.append(json.loads((folder / f"before-{round_number}" / "summary.json")
                                               .read_text())["elapsed_s"])
    finally:
        server.stop()
    bare_rate = args.tasks / statistics.median(bare_times)
    our_rate = args.tasks / statistics.median(our_times)
    print(f"overhead ({args.server} server): {args.tasks} chat tasks at concurrency "
          f"{args.concurrency}, median of "
          f"{args.rounds} rounds: bare aiohttp {bare_rate:.0f} tasks/s, batcher {our_rate:.0f} "
          f"tasks/s (ledger + files on), ratio {our_rate / bare_rate:.2f}; "
          f"disk: {disk:.0f} us per new file")
    bare_loop, our_loop = (args.tasks / statistics.median(t) for t in (bare_loops, our_loops))
    print(f"without start-up (the bare loop's asyncio.run; batcher's summary.json elapsed_s, "
          f"from the output's opening to the summary): bare {bare_loop:.0f} tasks/s, batcher "
          f"{our_loop:.0f} tasks/s, ratio {our_loop / bare_loop:.2f}")
    if before_loops:
        before_loop = args.tasks / statistics.median(before_loops)
        print(f"  before without start-up: {before_loop:.0f} tasks/s, ratio "
              f"{before_loop / bare_loop:.2f}")
    if before_times:
        before_rate = args.tasks / statistics.median(before_times)
        paired = statistics.median(b / o for b, o in zip(before_times, our_times, strict=True))
        print(f"before ({args.before}): {before_rate:.0f} tasks/s, ratio "
              f"{before_rate / bare_rate:.2f}; this checkout is {paired:.2f}x as fast "
              "(median over rounds)")


def _run_before(package_dir: str, manifest: Path, folder: Path, round_number: int) -> float:
    before = run_child([*earlier_batcher(package_dir), "run", str(manifest), "--no-progress",
                        "--output", str(folder / f"before-{round_number}")], folder)
    if before.exit_code != 0:
        sys.exit(f"the earlier batcher failed: {before.exit_code}\n{before.stderr[-2000:]}")
    return before.seconds


if __name__ == "__main__":
    main()
