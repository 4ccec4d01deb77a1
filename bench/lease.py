"""The store lock's lease, against moto's S3 server on 127.0.0.1: how long a user waits.

- refused: seconds until a second run on a store held by a live run exits 2 (one heartbeat);
- same machine: seconds from a `kill -9` to a rerun on the same machine finishing (no wait);
- fresh machine: the same when the dead holder was on another machine (waits one lease);
- heartbeat: lock writes a holder makes per minute of run.

    python bench/lease.py [--lease 60] [--tasks 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import boto3
from common import batcher, run_child, start_server, workdir, write
from store import MotoProcess


def manifest(folder: Path, api_url: str, url: str, tasks: int) -> Path:
    return write(folder / "lease.yaml", f"""
        name: lease
        output: {url}
        providers:
          bench: {{base_url: "{api_url}", concurrency: 4}}
        jobs:
          - name: captions
            type: chat
            provider: bench
            model: llama-3.1-8b-instruct
            prompt: "Caption {{n}}"
            vars: {{n: [{", ".join(map(str, range(tasks)))}]}}
            params: {{max_tokens: 8}}
        """)


def _client(moto: MotoProcess) -> Any:
    return boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                        aws_access_key_id="bench", aws_secret_access_key="bench")


def lock_body(moto: MotoProcess, bucket: str) -> dict[str, Any]:
    answer = _client(moto).get_object(Bucket=bucket, Key="p/.batcher.lock")
    return dict(json.loads(answer["Body"].read()))


def put_lock(moto: MotoProcess, bucket: str, body: dict[str, Any]) -> None:
    _client(moto).put_object(Bucket=bucket, Key="p/.batcher.lock",
                             Body=json.dumps(body).encode())


def start_holder(folder: Path, path: Path, moto: MotoProcess, cache: str) -> subprocess.Popen[str]:
    moto.env(folder / cache)
    holder = subprocess.Popen(batcher("run", str(path), "--no-progress"), cwd=folder,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    time.sleep(3)  # well into its run
    return holder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    os.environ["BATCHER_LOCK_LEASE"] = str(args.lease)
    folder = workdir("lease")
    server = start_server(latency=0.5)
    moto = MotoProcess()
    try:
        bucket = moto.bucket()
        path = manifest(folder, server.api_url, f"s3://{bucket}/p", args.tasks)

        holder = start_holder(folder, path, moto, "holder")
        moto.env(folder / "second")
        refused = run_child(batcher("run", str(path), "--no-progress"), folder)
        beats_before = lock_body(moto, bucket)["beat"]
        time.sleep(5)
        beats = int(lock_body(moto, bucket)["beat"]) - int(beats_before)
        print(f"refused: exit {refused.exit_code} after {refused.seconds:.1f} s (lease "
              f"{args.lease:g} s)")
        print(f"heartbeat: {beats * 12} lock writes per minute")
        holder.kill()
        holder.wait()

        moto.env(folder / "rerun")
        same = run_child(batcher("run", str(path), "--no-progress"), folder)
        print(f"kill -9, rerun on the same machine: exit {same.exit_code} in "
              f"{same.seconds:.1f} s")

        bucket = moto.bucket()
        path = manifest(folder, server.api_url, f"s3://{bucket}/p", args.tasks)
        holder = start_holder(folder, path, moto, "holder2")
        holder.kill()
        holder.wait()
        body = lock_body(moto, bucket)
        body["machine"] = "a-vanished-runner"
        put_lock(moto, bucket, body)
        moto.env(folder / "fresh")
        fresh = run_child(batcher("run", str(path), "--no-progress"), folder)
        print(f"kill -9, rerun on a fresh machine: exit {fresh.exit_code} in "
              f"{fresh.seconds:.1f} s")
    finally:
        moto.stop()
        server.stop_thread()


if __name__ == "__main__":
    main()
