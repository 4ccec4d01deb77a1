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

import pytest
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
    code, text = _run_on_a_terminal(manifest, tmp_path, 40, 160)
    assert code == 0, text
    assert "\r" in text and "task/s" in text  # a tqdm bar, redrawn in place
    assert "10/10" in text and "ok=10" in text and "429s=0" in text


def _run_on_a_terminal(manifest: Path, cwd: Path, rows: int, columns: int,
                       *args: str) -> tuple[int, str]:
    """Run batcher with stderr on a pseudo-terminal of the given size; (exit code, output)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(manifest), *args], cwd=cwd,
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
    code = process.wait(timeout=60)
    os.close(leader)
    return code, output.decode(errors="replace")


@pytest.mark.parametrize(("rows", "columns"), [(0, 0), (24, 20)])
def test_a_terminal_too_narrow_for_a_bar_gets_plain_lines(
    tmp_path: Path, thread_server, rows: int, columns: int
) -> None:
    # CI pseudo-terminals and `script` often report 0x0: a bar there is trimmed to nothing.
    server = thread_server(latency=0.02)
    manifest = _manifest(tmp_path, server, 10)  # about 1 s at 10/s

    code, text = _run_on_a_terminal(manifest, tmp_path, rows, columns, "--log-every", "0.2")

    assert code == 0, text
    lines = [line.strip() for line in text.splitlines()]
    progress = [line for line in lines if line.startswith("progress ")]
    assert len(progress) >= 2, text
    assert all("/10 " in line and "ok=" in line for line in progress)
    assert "task/s" not in text  # no tqdm bar was drawn
    assert any(line.startswith("batcher: 10 ok, 0 failed") for line in lines), text
