"""Issue 18, the hostile review of its file fixes (break18b): a user id names one task in the
whole manifest (one file read by two jobs, an id equal to a computed id), a CSV cell's line
breaks do not depend on the file's line endings, a cell of only invisible characters is empty
and a NUL is refused, a stdout closed as a descriptor, and the cosmetic edges (max_pixels: 0,
``--budget abc``, a byte order mark on a task file).

The CLI runs as a user runs it; requests are counted at the built-in server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from conftest import ledger_rows, provider_block, run_cli, write_manifest

from batcher.errors import ManifestError
from batcher.manifest import load_manifest
from batcher.manifest.tasks import expand


def paid(server: Any) -> int:
    return sum(server.stats.generations.values())


# --------------------------------------------------------------------------- user ids


HEROES = ('{"id": "hero-1", "model": "flux.1-schnell", "prompt": "a red fox", '
          '"params": {"size": "256x256"}}\n'
          '{"id": "hero-2", "model": "flux.1-schnell", "prompt": "a blue fox", '
          '"params": {"size": "256x256"}}\n')


def two_jobs_one_file(server: Any, folder: Path) -> Path:
    text = "name: d\noutput: out\n" + provider_block(server) + textwrap.dedent(f"""\
          other: {{base_url: "{server.api_url}"}}
        jobs:
          - {{name: a, provider: test, file: t.jsonl}}
          - {{name: b, provider: other, file: t.jsonl}}
        """)
    return write_manifest(folder, text)


def test_one_task_file_with_ids_read_by_two_jobs_is_a_manifest_error(
        tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    (tmp_path / "t.jsonl").write_text(HEROES)
    path = two_jobs_one_file(server, tmp_path)
    for command in ("validate", "plan", "run"):
        extra = ("--no-progress",) if command == "run" else ()
        result = run_cli(command, str(path), *extra, cwd=tmp_path)
        assert result.returncode == 2, (command, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr
        assert "t.jsonl:1: id: 'hero-1' is already the id of" in result.stderr, result.stderr
        assert "job a" in result.stderr, result.stderr
    assert paid(server) == 0 and not (tmp_path / "out").exists()


def test_one_task_file_without_ids_serves_two_jobs(tmp_path: Path, thread_server: Any) -> None:
    """Without ids a task's id includes its job: two jobs, two tasks a line, all kept."""
    server = thread_server()
    (tmp_path / "t.jsonl").write_text(HEROES.replace('"id": "hero-1", ', "")
                                      .replace('"id": "hero-2", ', ""))
    path = two_jobs_one_file(server, tmp_path)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert paid(server) == 4 and len(ledger_rows(tmp_path / "out")) == 4
    assert run_cli("status", str(path)).returncode == 0
    assert run_cli("run", str(path), "--no-progress").returncode == 0 and paid(server) == 4


def test_a_long_file_read_by_two_jobs_fails_at_its_first_line(tmp_path: Path) -> None:
    """The second reading fails at its first id (the review's quadratic case: every repeated
    digest made batcher read the file again, and found nothing)."""
    lines = [json.dumps({"id": f"id-{n}", "type": "chat", "model": "llama-3.1-8b-instruct",
                         "prompt": f"p {n}"}) for n in range(300)]
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    path = write_manifest(tmp_path, """\
        name: d
        jobs:
          - {name: a, provider: local, file: big.jsonl}
          - {name: b, provider: local, file: big.jsonl}
        """)
    try:
        load_manifest(path)
    except ManifestError as exc:
        assert exc.line == 1 and "'id-0' is already the id of" in str(exc)
    else:
        raise AssertionError("one file with ids in two jobs passed")


def heroes_and_retry(server: Any, folder: Path) -> tuple[Path, Path]:
    text = "name: y\noutput: out\n" + provider_block(server) + textwrap.dedent("""\
        jobs:
          - name: heroes
            provider: test
            type: image
            model: flux.1-schnell
            prompts: ["a red fox", "a blue fox"]
            params: {size: 256x256}
        """)
    first = write_manifest(folder, text, "y.yaml")
    second = write_manifest(folder, text + "  - {name: retry, provider: test, file: "
                                           "retry.jsonl}\n", "y2.yaml")
    return first, second


def test_a_user_id_equal_to_a_computed_id_is_a_manifest_error(tmp_path: Path,
                                                              thread_server: Any) -> None:
    """A custom_id copied from results.jsonl into a retry file would be one ledger row for two
    paid tasks: refused before anything is sent."""
    server = thread_server()
    first, second = heroes_and_retry(server, tmp_path)
    computed = [task.id for task in expand(load_manifest(first))]
    (tmp_path / "retry.jsonl").write_text(json.dumps({
        "custom_id": computed[0], "method": "POST", "url": "/v1/images/generations",
        "body": {"model": "flux.1-schnell", "prompt": "a red fox, sharper",
                 "size": "256x256"}}) + "\n")
    for command in ("validate", "run"):
        result = run_cli(command, str(second), cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr
        assert f"retry.jsonl:1: custom_id: '{computed[0]}'" in result.stderr, result.stderr
        assert "heroes" in result.stderr, result.stderr
    assert paid(server) == 0 and not (tmp_path / "out").exists()
    # An id that only looks like a computed one (uuid4().hex) is a user id like any other.
    (tmp_path / "retry.jsonl").write_text(json.dumps({
        "id": "0123456789abcdef0123456789abcdef", "model": "flux.1-schnell",
        "prompt": "a red fox, sharper", "params": {"size": "256x256"}}) + "\n")
    assert run_cli("run", str(second), "--no-progress").returncode == 0
    assert paid(server) == 3 and len(ledger_rows(tmp_path / "out")) == 3
    assert run_cli("status", str(second)).returncode == 0


def test_a_user_id_equal_to_a_computed_id_in_the_same_file(tmp_path: Path) -> None:
    """In a bare JSONL task file: a line without an id and a line reusing its computed id."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"model": "flux.1-schnell", "prompt": "a red fox"}\n')
    computed = next(expand(load_manifest(tasks, provider="local"))).id
    tasks.write_text(tasks.read_text() + json.dumps(
        {"id": computed, "model": "flux.1-schnell", "prompt": "a fox"}) + "\n")
    result = run_cli("validate", str(tasks), "--provider", "local")
    assert result.returncode == 2 and f"tasks.jsonl:2: id: '{computed}'" in result.stderr, \
        result.stderr
    # Under another provider the computed id differs: nothing to refuse.
    assert run_cli("validate", str(tasks), "--provider", "vultr").returncode == 0


# --------------------------------------------------------------------------- vars files


def chat_vars_manifest(server: Any, folder: Path, vars_file: str) -> Path:
    text = "name: v\noutput: out\n" + provider_block(server) + textwrap.dedent(f"""\
        jobs:
          - name: cat
            type: chat
            provider: test
            model: llama-3.1-8b-instruct
            vars_file: {vars_file}
            prompt: "a {{color}} {{name}}"
        """)
    return write_manifest(folder, text)


def test_a_csv_with_crlf_line_endings_makes_the_same_tasks(tmp_path: Path,
                                                           thread_server: Any) -> None:
    server = thread_server()
    rows = tmp_path / "ml.csv"
    rows.write_bytes(b'name,color\nSpoon,red\n"Multi\nline",blue\n')
    path = chat_vars_manifest(server, tmp_path, "ml.csv")
    lf_ids = [task.id for task in expand(load_manifest(path))]
    assert run_cli("run", str(path), "--no-progress").returncode == 0 and paid(server) == 2
    rows.write_bytes(rows.read_bytes().replace(b"\n", b"\r\n"))  # git autocrlf, a re-save
    assert [task.id for task in expand(load_manifest(path))] == lf_ids
    pruned = run_cli("prune", str(path))
    assert pruned.returncode == 0, pruned.stderr
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert paid(server) == 2, "the CRLF copy of the file was paid again"
    prompts = sorted(row["prompt"] for row in ledger_rows(tmp_path / "out"))
    assert prompts == ["a blue Multi\nline", "a red Spoon"]
    rows.write_bytes(b'name,color\nSpoon,red\n"Multi\rline",blue\n')  # a lone CR (old Macs)
    assert [task.id for task in expand(load_manifest(path))] == lf_ids


def test_a_cell_of_only_invisible_characters_is_no_value(tmp_path: Path,
                                                         thread_server: Any) -> None:
    server = thread_server()
    path = chat_vars_manifest(server, tmp_path, "c.csv")
    for cell, shown in ((b"\x00", "NUL"), (b"\xe2\x80\x8b", "zero-width space"),
                        (b"\xef\xbb\xbf", "BOM"), (b"\x07 \t", "bell"),
                        (b"\xe2\x80\x8e\xc2\xa0", "LRM, no-break space")):
        (tmp_path / "c.csv").write_bytes(b"name,color\nSpoon,red\nFork," + cell + b"\n")
        result = run_cli("validate", str(path), cwd=tmp_path)
        assert result.returncode == 2, (shown, result.stderr)
        assert "c.csv:3: color: " in result.stderr, (shown, result.stderr)
        assert run_cli("run", str(path), "--no-progress").returncode == 2
    assert paid(server) == 0


def test_a_nul_anywhere_in_a_value_is_a_manifest_error(tmp_path: Path,
                                                       thread_server: Any) -> None:
    server = thread_server()
    (tmp_path / "c.csv").write_bytes(b"name,color\nSpoon,red\nFo\x00rk,blue\n")
    path = chat_vars_manifest(server, tmp_path, "c.csv")
    result = run_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "c.csv:3: name: " in result.stderr, result.stderr
    assert "NUL" in result.stderr
    (tmp_path / "c.jsonl").write_text('{"name": "Spoon", "color": "red"}\n'
                                      '{"name": "Fork", "color": "\\u0000"}\n'
                                      '{"name": "Knife", "color": "gr\\u0000een"}\n')
    path = chat_vars_manifest(server, tmp_path, "c.jsonl")
    result = run_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "c.jsonl:2: color: " in result.stderr, result.stderr
    assert run_cli("run", str(path), "--no-progress").returncode == 2
    assert paid(server) == 0
    # Visible text around an invisible character is a value.
    (tmp_path / "c.csv").write_bytes(b"name,color\nSpoon,red\nFork,bl\xe2\x80\x8bue\n")
    assert run_cli("validate", str(chat_vars_manifest(server, tmp_path, "c.csv"))) \
        .returncode == 0


# --------------------------------------------------------------------------- command line


def run_with_closed_stdout(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``batcher ARGS >&-``: stdout closed as a descriptor, as some schedulers start a job."""
    return subprocess.run(["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "-m", "batcher",
                           *args], stderr=subprocess.PIPE, text=True, timeout=120, cwd=cwd)


def test_a_stdout_closed_as_a_descriptor_keeps_the_commands_own_exit_code(
        tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = write_manifest(tmp_path, "name: x\noutput: out\n" + provider_block(server) + (
        "jobs:\n"
        "  - {name: a, type: chat, provider: test, model: llama-3.1-8b-instruct, prompt: hi}\n"
        "  - {name: b, type: chat, provider: test, model: llama-3.1-8b-instruct, prompt: ho}\n"))
    ran = run_with_closed_stdout("run", str(path), "--no-progress", "--limit", "1",
                                 cwd=tmp_path)
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
    assert paid(server) == 1 and len(ledger_rows(tmp_path / "out")) == 1
    pending = run_with_closed_stdout("status", str(path), cwd=tmp_path)
    assert pending.returncode == 1 and "Traceback" not in pending.stderr, pending.stderr
    ran = run_with_closed_stdout("run", str(path), "--no-progress", cwd=tmp_path)
    assert ran.returncode == 0 and paid(server) == 2, ran.stderr
    done = run_with_closed_stdout("status", str(path), cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    version = run_with_closed_stdout("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stderr == "", version.stderr
    bad = run_with_closed_stdout("validate", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr, bad.stderr


def test_max_pixels_0_says_what_it_must_be(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """\
        name: px
        jobs:
          - name: a
            type: image
            provider: local
            model: flux.1-schnell
            prompt: a fox
            outputs: {sizes: {thumb: 64}, max_pixels: 0}
        """)
    result = run_cli("validate", str(path))
    assert result.returncode == 2 and "max_pixels" in result.stderr
    assert "a whole number above 0" in result.stderr, result.stderr


def test_a_budget_that_is_not_a_number_reads_well(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """\
        name: b
        jobs:
          - {name: a, type: chat, provider: local, model: llama-3.1-8b-instruct, prompt: hi}
        """)
    result = run_cli("plan", str(path), "--budget", "abc")
    assert result.returncode == 2 and "'abc' is not an amount in USD" in result.stderr, \
        result.stderr
    result = run_cli("run", str(path), "--concurrency", "many")
    assert result.returncode == 2 and "'many' is not a whole number" in result.stderr, \
        result.stderr


def test_a_task_file_starting_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"model": "flux.1-schnell", "prompt": "a red fox"}\n'
                     '{"id": "x-1", "model": "flux.1-schnell", "prompt": "a blue fox"}\n')
    marked = tmp_path / "marked" / "plain.jsonl"
    marked.parent.mkdir()
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    result = run_cli("validate", str(marked), "--provider", "local")
    assert result.returncode == 0, result.stderr
    ids = [task.id for task in expand(load_manifest(plain, provider="local"))]
    assert [task.id for task in expand(load_manifest(marked, provider="local"))] == ids
    # Only the first line may carry one: elsewhere it is not JSON.
    marked.write_bytes(plain.read_bytes() + b'\xef\xbb\xbf{"id": "x-2", "model": "m", '
                       b'"prompt": "p"}\n')
    result = run_cli("validate", str(marked), "--provider", "local")
    assert result.returncode == 2 and "plain.jsonl:3" in result.stderr, result.stderr
