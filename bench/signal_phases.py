"""Signals outside the worker phase: seconds from a signal to the exit of `batcher run` into a
store that hangs in one phase (moto's S3 server behind tests/faultproxy.py), --grace 2 and the
default --store-timeout (300 s). Prints one line per case: the phase, the signals sent, the
exit code, the seconds, whether the lock was released.

    python bench/signal_phases.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import start_server  # noqa: E402
from conftest import pics_and_lines  # noqa: E402
from faultproxy import StoreProxy, is_listing, is_upload  # noqa: E402
from s3server import S3Server, store_env  # noqa: E402

GRACE = 2.0


def manifest(folder: Path, api_url: str, output: str, images: int) -> Path:
    path = folder / "jobs.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: bench
        output: {output}
        providers:
          test: {{base_url: {api_url}, concurrency: 4}}
        """) + pics_and_lines("boat", images=images))
    return path


def case(s3: S3Server, what: str, hang: Callable[[StoreProxy], Callable[[], bool]],
         images: int, signals: int) -> None:
    server = start_server()
    proxy = StoreProxy(s3.url)
    bucket = s3.bucket()
    with tempfile.TemporaryDirectory() as tmp:
        path = manifest(Path(tmp), server.api_url, f"s3://{bucket}/set", images)
        ready = hang(proxy)
        env = {**os.environ, **store_env(proxy.url, f"{tmp}/cache")}
        proc = subprocess.Popen([sys.executable, "-m", "batcher", "run", str(path),
                                 "--no-progress", "--grace", str(GRACE)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not ready():
            time.sleep(0.02)
        started = time.monotonic()
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        code = proc.wait(timeout=120)
        took = time.monotonic() - started
    lock = any(key.endswith(".lock") for key in s3.keys(bucket))
    print(f"{what:<34} signals {signals}  exit {code}  {took:5.1f} s  "
          f"lock {'LEFT' if lock else 'released'}")
    proxy.stop()
    server.stop_thread()


def main() -> None:
    s3 = S3Server()
    print(f"--grace {GRACE:g}, --store-timeout 300 (default)")
    for signals in (1, 2):
        case(s3, "startup listing hangs", lambda p: (p.hang(is_listing),
             lambda: p.seen(is_listing) >= 1)[1], 8, signals)
        case(s3, "uploads of results hang (drain)", lambda p: (p.hang(is_upload("pics/")),
             lambda: p.seen(is_upload("pics/")) >= 4)[1], 4, signals)
        case(s3, "final listings hang", lambda p: (p.hang(is_upload("results.jsonl")),
             lambda: p.seen(is_upload("results.jsonl")) >= 1)[1], 8, signals)
    s3.stop()


if __name__ == "__main__":
    main()
