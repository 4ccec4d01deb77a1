"""Helpers shared by the benchmarks: the built-in server on a thread, batcher as a user runs it."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from batcher.server import LocalServer, ServerOptions


def start_server(**options: object) -> LocalServer:
    """The built-in server on its own thread in this process (batcher runs in another)."""
    server = LocalServer(ServerOptions(**options))  # type: ignore[arg-type]
    server.start_in_thread()
    return server


BENCH_ROOT = Path(os.environ.get("BATCHER_BENCH_DIR")
                  or Path(__file__).resolve().parent.parent / "output" / "bench")


def workdir(name: str) -> Path:
    """A fresh folder for one benchmark under output/bench (git-ignored).

    Not /tmp: on the machines we measure on, creating files there costs ~1 ms each, ten times
    the project disk, and would be measured instead of batcher.

    A previous run's folder is moved aside and deleted only when the benchmark exits. On ext4
    without a journal (these machines) the kernel will not reuse an inode freed in the last
    minute or so, and scans past every such inode for each new file: thousands of files
    deleted just before a run would make its file creation several times slower.
    """
    folder = BENCH_ROOT / name
    if folder.exists():
        old = BENCH_ROOT / f".old-{name}-{os.getpid()}"
        folder.rename(old)
        atexit.register(shutil.rmtree, old, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


class ServedProcess:
    """``batcher serve OPTIONS`` in its own process, like a remote endpoint: its CPU is not
    ours. ``command`` runs another server instead (its output shown), told its port as its
    last argument; ``name`` says which in the error when it does not start."""

    def __init__(self, *options: str, command: list[str] | None = None,
                 name: str = "batcher serve") -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{port}/v1"
        if command is None:
            self._process = subprocess.Popen(batcher("serve", "--port", str(port), *options),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            self._process = subprocess.Popen([*command, str(port)])
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{name} did not start")

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@dataclass(frozen=True, slots=True)
class Measured:
    seconds: float
    peak_rss_mb: float
    exit_code: int
    stderr: str


# Linux records in a process's peak RSS the peak of the memory it replaces at exec; subprocess
# starts children with vfork, so a child's ru_maxrss starts at the bench's own peak (hundreds of
# MB while the server thread renders photo-sized images). A small launcher forks the command
# from itself and reports the command's own figure.
_LAUNCHER = """
import os, sys
out, args = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(args[0], args)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as handle:
    handle.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_child(args: list[str], cwd: Path, *, kill_after: float | None = None,
              own_rss: bool = False) -> Measured:
    """Run a command, measuring its wall time and its peak RSS.

    Without ``own_rss`` the peak is the kernel's figure for the child, which starts at the
    bench's own peak (see ``_LAUNCHER``); with it, the command's own, through the launcher
    (which adds its start-up, some 20 ms, to the wall time). Not with ``kill_after``.
    """
    started = time.perf_counter()
    rss_file = cwd / f".rss-{os.getpid()}"
    if own_rss:
        assert kill_after is None, "a kill would hit the launcher"
        args = [sys.executable, "-c", _LAUNCHER, str(rss_file), *args]
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if kill_after is not None:
        time.sleep(kill_after)
        process.kill()
    assert process.stderr is not None
    stderr = process.stderr.read()
    try:
        _pid, status, usage = os.wait4(process.pid, 0)
        code, peak = os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024
    except ChildProcessError:  # already reaped elsewhere (a killed child): no usage to read
        code, peak = process.wait(), float("nan")
    process.returncode = code  # keep Popen from waiting on a pid that is gone
    if own_rss:
        peak = int(rss_file.read_text()) / 1024
        rss_file.unlink()
    return Measured(time.perf_counter() - started, peak, code, stderr)


def batcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "batcher", *args]


def earlier_batcher(package_dir: str) -> list[str]:
    """The command of the batcher package found in ``package_dir`` (an earlier commit's)."""
    path = str(Path(package_dir).resolve())
    return [sys.executable, "-c",
            f"import sys; sys.path.insert(0, {path!r}); from batcher.cli import entry; entry()"]


def captions_manifest(path: Path, name: str, api_url: str, tasks: int, concurrency: int) -> Path:
    """A manifest of ``tasks`` chat tasks (a caption each) on provider ``bench`` at ``api_url``,
    with no rate limit."""
    return write(path, f"""
        name: {name}
        providers:
          bench: {{base_url: "{api_url}", concurrency: {concurrency},
                   rate_limit: null}}
        jobs:
          - name: captions
            type: chat
            provider: bench
            model: llama-3.1-8b-instruct
            prompt: "Write a caption for poster {{i}}"
            vars: {{i: [{", ".join(str(i) for i in range(tasks))}]}}
            params: {{max_tokens: 20}}
    """)


def file_creation_cost(folder: Path, count: int = 500) -> float:
    """Microseconds to create, write and rename one small file in ``folder``, as batcher does.

    Printed beside figures that depend on it: the same machine gives 30 us on a quiet disk and
    300 us or more in a folder where thousands of files were deleted in the last few minutes.
    The probe's files stay until the benchmark's folder goes (deleting them now would slow the
    run that follows).
    """
    probe = folder / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for i in range(count):
        tmp = probe / f".tmp-{i}"
        tmp.write_bytes(b"x" * 200)
        tmp.rename(probe / f"{i}.txt")
    return (time.perf_counter() - started) / count * 1e6

