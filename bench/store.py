"""Object stores: what writing to s3:// costs a run, against moto's S3 server on 127.0.0.1.

Three figures, each with batcher run as a user runs it (a subprocess) and moto's server in a
process of its own:
- pace: 2,000 chat tasks paced at 100/s (and 50/s) into a folder and into s3://, alternating;
  the store run should keep at least 0.95x the folder run's tasks/s (uploads never slow a paced
  run) as long as the store takes two PUTs per task at that pace: the PUT rate moto's server
  manages here is measured and printed first;
- resume: a finished 20,000-task store re-run on an empty cache: requests sent, wall, peak RSS;
- images: 100, 200 and 400 photo-sized (3 MB) images into s3://: peak RSS, flat in the task count.

    python bench/store.py [--rounds 2] [--skip-resume] [--skip-images]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from common import ServedProcess, batcher, run_child, start_server, workdir, write


class MotoProcess:
    """moto's S3 server in its own process, like a remote store."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto's server did not start")

    def bucket(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:10]}"
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/{name}", method="PUT")).read()
        return name

    def env(self, cache: Path) -> None:
        os.environ.update({
            "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url,
            "XDG_CACHE_HOME": str(cache)})

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)


def chat_manifest(folder: Path, api_url: str, tasks: int, rate: str, name: str) -> None:
    per = 100
    write(folder / f"{name}.yaml", f"""
        name: {name}
        providers:
          bench: {{base_url: "{api_url}", concurrency: 16, rate_limit: {rate}}}
        jobs:
          - name: captions
            type: chat
            provider: bench
            model: llama-3.1-8b-instruct
            prompt: "Caption {{n}} for poster {{i}}"
            vars: {{n: [{", ".join(map(str, range(per)))}],
                    i: [{", ".join(map(str, range(tasks // per)))}]}}
            params: {{max_tokens: 8}}
    """)


def put_rate(moto: MotoProcess) -> float:
    """PUTs per second the store takes from 16 writers at once: a paced run into the store can
    only be as fast as this allows (two objects per chat task, the text and its sidecar)."""
    import asyncio

    from batcher.location import StoreURL
    from batcher.store.objects import ObjectStore

    async def measure() -> float:
        store = ObjectStore(StoreURL("s3", moto.bucket(), "probe"))
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with gate:
                await store.put_bytes(f"{i}.txt", b"x" * 300)
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(400)))
        return 400 / (time.perf_counter() - started)
    return asyncio.run(measure())


def list_seconds(url: str) -> float:
    """How long one listing of the whole prefix takes: a resume lists it once."""
    import asyncio

    from batcher.location import parse_store_url
    from batcher.store.objects import ObjectStore

    target = parse_store_url(url)
    assert target is not None
    started = time.perf_counter()
    asyncio.run(ObjectStore(target).sizes())
    return time.perf_counter() - started


def pace(moto: MotoProcess, rounds: int, rate: int) -> None:
    served = ServedProcess()
    folder = workdir(f"store-pace-{rate}")
    tasks = 2000
    ratios, folder_rates, store_rates = [], [], []
    try:
        for index in range(rounds):
            chat_manifest(folder, served.api_url, tasks, f"{rate}/s", f"pace{index}")
            moto.env(folder / f"cache-{index}")
            local = run_child(batcher("run", f"pace{index}.yaml", "--no-progress"), folder)
            store = run_child(batcher("run", f"pace{index}.yaml", "--no-progress", "--output",
                                      f"s3://{moto.bucket()}/pace"), folder)
            assert local.exit_code == 0 and store.exit_code == 0, store.stderr
            folder_rates.append(tasks / local.seconds)
            store_rates.append(tasks / store.seconds)
            ratios.append(local.seconds / store.seconds)
    finally:
        served.stop()
    print(f"store pace: {tasks} chat tasks at {rate}/s, {rounds} alternating rounds: folder "
          f"{statistics.median(folder_rates):.1f} tasks/s, s3 {statistics.median(store_rates):.1f}"
          f" tasks/s, ratio of medians {statistics.median(ratios):.3f} "
          f"(each: {', '.join(f'{r:.3f}' for r in ratios)}) (target >= 0.95)")


def resume(moto: MotoProcess) -> None:
    server = start_server(max_records=None)
    folder = workdir("store-resume")
    tasks = 20_000
    url = f"s3://{moto.bucket()}/resume"
    try:
        chat_manifest(folder, server.api_url, tasks, "null", "resume")
        moto.env(folder / "cache-first")
        first = run_child(batcher("run", "resume.yaml", "--no-progress", "--output", url), folder)
        before = len(server.stats.requests)
        moto.env(folder / "cache-empty")
        again = run_child(batcher("run", "resume.yaml", "--no-progress", "--output", url), folder)
        sent = len(server.stats.requests) - before
        listing = list_seconds(url)
    finally:
        server.stop_thread()
    print(f"store resume: listing the store's objects alone takes {listing:.1f} s here "
          f"(moto pages through every key for each page of 1000)")
    print(f"store resume: first run of {tasks} tasks into s3 took {first.seconds:.0f} s "
          f"(exit {first.exit_code}); re-run on an empty cache: exit {again.exit_code}, requests "
          f"sent {sent}, wall {again.seconds:.2f} s, peak RSS {again.peak_rss_mb:.0f} MB "
          f"(targets 0, <= 15 s, <= 250 MB)")


def images(moto: MotoProcess) -> None:
    server = start_server(max_records=None, image_grain=True)
    folder = workdir("store-images")
    try:
        for count in (100, 200, 400):
            write(folder / f"images{count}.yaml", f"""
                name: images{count}
                providers:
                  bench: {{base_url: "{server.api_url}", concurrency: 16, rate_limit: null}}
                jobs:
                  - name: big
                    type: image
                    provider: bench
                    model: flux.1-dev
                    prompt: "A large poster"
                    seeds: {count}
                    params: {{size: 1024x1024, response_format: b64_json}}
            """)
            moto.env(folder / f"cache-{count}")
            result = run_child(batcher("run", f"images{count}.yaml", "--no-progress",
                                       "--output", f"s3://{moto.bucket()}/img"), folder)
            print(f"store images: {count} 1024x1024 images (~3 MB) into s3 at concurrency 16: "
                  f"{count / result.seconds:.1f} tasks/s, peak RSS {result.peak_rss_mb:.0f} MB, "
                  f"exit {result.exit_code}")
    finally:
        server.stop_thread()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=int, nargs="+", default=[100, 50],
                        help="paces to measure, tasks/s")
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    args = parser.parse_args()
    moto = MotoProcess()
    try:
        moto.env(workdir("store-probe"))
        print(f"store: moto's server takes {put_rate(moto):.0f} PUT/s from 16 writers here")
        for rate in args.rate:
            pace(moto, args.rounds, rate)
        if not args.skip_images:
            images(moto)
        if not args.skip_resume:
            resume(moto)
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
