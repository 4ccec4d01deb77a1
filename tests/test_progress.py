"""Progress as people and CI see it: plain lines without a terminal, a tqdm bar on one."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

from conftest import provider_block, run_cli, write_manifest


def _manifest(folder: Path, server, tasks: int) -> Path:  # type: ignore[no-untyped-def]
    return write_manifest(folder, textwrap.dedent(f"""
        name: progress
        jobs:
          - name: tiles
            type: image
            provider: test
            model: flux.1-schnell
            prompt: "A tile"
            seeds: {tasks}
            params: {{size: 256x256, response_format: b64_json}}
    """) + provider_block(server, rate="10/s", concurrency=2))


def test_without_a_terminal_progress_is_plain_lines_and_a_summary(tmp_path: Path,
                                                                   thread_server) -> None:
    server = thread_server(latency=0.05)
    manifest = _manifest(tmp_path, server, 25)  # about 2.5 s at 10/s
    result = run_cli("run", str(manifest), "--log-every", "0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress ")]
    assert len(lines) >= 3, result.stderr
    assert all("/25 " in line and "ok=" in line and "eta=" in line for line in lines)
    done = [int(line.split()[1].split("/")[0]) for line in lines]
    assert done == sorted(done)
    assert result.stderr.strip().splitlines()[-1].startswith("batcher: 25 ok, 0 failed")


def test_no_progress_prints_only_the_summary(tmp_path: Path, thread_server) -> None:
    server = thread_server()
    manifest = _manifest(tmp_path, server, 5)
    result = run_cli("run", str(manifest), "--no-progress", "--log-every", "0.1", cwd=tmp_path)
    assert result.returncode == 0
    assert not [line for line in result.stderr.splitlines() if line.startswith("progress ")]
    assert "batcher: 5 ok" in result.stderr


def test_on_a_terminal_a_bar_shows_counts(tmp_path: Path, thread_server) -> None:
    server = thread_server(latency=0.02)
    manifest = _manifest(tmp_path, server, 10)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(manifest)], cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower,
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=60) == 0
    os.close(leader)
    text = output.decode(errors="replace")
    assert "\r" in text  # a bar redrawn in place
    assert "10/10" in text and "ok=10" in text and "429s=0" in text
