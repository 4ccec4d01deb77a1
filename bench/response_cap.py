"""Response cap: batcher's peak RSS against chat answers that inflate (gzip) to a given size.

A server on 127.0.0.1 answers every request with a gzip body of zeros; batcher reads it with
the provider's ``max_response_bytes`` (default 64 MiB) and fails the task as ``too_large``.
Prints, per inflated size, batcher's own peak RSS and the task's failure reason. With
``--valid`` the answer is a whole completion of that size instead (under the cap it is kept:
the peak shows what an answer just under the cap costs in memory).

    python bench/response_cap.py [--sizes 16,600] [--cap BYTES] [--valid]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import threading
import zlib

from aiohttp import web
from common import batcher, run_child, workdir, write


def gzip_zeros(megabytes: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    return b"".join(packer.compress(block) for _ in range(megabytes)) + packer.flush()


def gzip_completion(megabytes: int) -> bytes:
    """A chat completion whose one choice is ``megabytes`` MiB of text, gzipped."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"a" * (1 << 20)
    head = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"'
    tail = b'"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    return (packer.compress(head) + b"".join(packer.compress(block) for _ in range(megabytes))
            + packer.compress(tail) + packer.flush())


def serve(body: list[bytes]) -> str:
    """Start the bomb server on a thread; returns its API URL. ``body[0]`` is what it sends."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    url: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body[0], content_type="application/json",
                            headers={"Content-Encoding": "gzip"})

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url.append(f"http://127.0.0.1:{runner.addresses[0][1]}/v1")

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(10)
    return url[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="16,600", help="inflated sizes in MiB")
    parser.add_argument("--cap", type=int, default=None, help="max_response_bytes")
    parser.add_argument("--valid", action="store_true", help="a whole completion, not zeros")
    args = parser.parse_args()
    body = [b""]
    url = serve(body)
    folder = workdir("response-cap")
    cap = f"max_response_bytes: {args.cap}" if args.cap else ""
    print(f"{'inflated':>10} {'gzip':>10} {'peak RSS':>10}  reason")
    for size in (int(text) for text in args.sizes.split(",")):
        body[0] = gzip_completion(size) if args.valid else gzip_zeros(size)
        out = folder / f"out-{size}"
        manifest = write(folder / f"cap-{size}.yaml", f"""
            name: cap
            output: {out}
            providers:
              test:
                base_url: {url}
                concurrency: 1
                {cap}
            jobs:
              - name: talk
                type: chat
                provider: test
                model: m
                prompt: hello
        """)
        measured = run_child(batcher("run", str(manifest), "--no-progress"), folder,
                             own_rss=True)
        with sqlite3.connect(out / "ledger.sqlite") as db:
            reason = db.execute("SELECT status || ' ' || coalesce(reason, '') FROM tasks"
                                ).fetchone()[0]
        print(f"{size:>7} MiB {len(body[0]) / 1024:>6.0f} KiB {measured.peak_rss_mb:>6.0f} MiB"
              f"  {reason}")


if __name__ == "__main__":
    main()
