"""What a user sees at the edges of each command (issue #13): why a run's tasks failed, exit
codes of status, the help of every option, and messages that name the right thing."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import ledger_rows, provider_block, run_cli, start_cli, write_manifest

from batcher.cli import build_parser
from batcher.server import FAULT_KINDS, ServerOptions

REFUSED_JOB = """\
  - name: refused
    type: image
    provider: test
    model: flux.1-schnell
    prompt: A size the server refuses
    seeds: 2
    params: {size: 999x999, response_format: b64_json}
"""
BROKEN_JOB = """\
  - name: broken
    type: chat
    provider: test
    model: llama-3.1-8b-instruct
    prompt: The server fails this every time
    seeds: 3
"""
FAILING_JOBS = "jobs:\n" + REFUSED_JOB + BROKEN_JOB


def _failure_lines(stderr: str) -> list[str]:
    """The lines after ``batcher: failed tasks by reason:``, to the end."""
    lines = stderr.splitlines()
    start = lines.index("batcher: failed tasks by reason:")
    return lines[start + 1:]


def test_run_ends_with_the_top_failure_reasons(tmp_path: Path, thread_server: Any) -> None:
    # fail_rate=1.0: every valid request answers 500; the bad size is refused with 400 first.
    server = thread_server(fail_rate=1.0)
    path = write_manifest(tmp_path, "name: failing\noutput: out\n"
                          + provider_block(server, extra="retries: 0") + FAILING_JOBS)

    done = run_cli("run", str(path), "--no-progress")

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    reasons = _failure_lines(done.stderr)
    assert len(reasons) == 2, done.stderr
    # Commonest first, each with its count and one example message.
    assert reasons[0].split()[:2] == ["3", "http_500:"], done.stderr
    assert "injected permanent failure" in reasons[0]
    assert reasons[1].split()[:2] == ["2", "http_400:"], done.stderr
    assert "999x999" in reasons[1]


def test_run_lists_only_this_runs_failures(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server(fail_rate=1.0)
    path = write_manifest(tmp_path, "name: failing\noutput: out\n"
                          + provider_block(server, extra="retries: 0") + FAILING_JOBS)
    assert run_cli("run", str(path), "--no-progress", "--only", "refused").returncode == 1

    # The failed tasks of the first run are left alone: nothing failed in this run.
    again = run_cli("run", str(path), "--no-progress", "--skip-failed", "--only", "refused")
    assert "failed tasks by reason" not in again.stderr, again.stderr

    # Retried, they fail again, and only they are listed (not the other job's).
    third = run_cli("run", str(path), "--no-progress", "--only", "refused")
    reasons = _failure_lines(third.stderr)
    assert [line.split()[:2] for line in reasons] == [["2", "http_400:"]], third.stderr


TWO_JOBS = """\
jobs:
  - name: posters
    type: image
    provider: test
    model: flux.1-schnell
    prompt: A poster
    seeds: 2
    params: {size: 256x256, response_format: b64_json}
  - name: captions
    type: chat
    provider: test
    model: llama-3.1-8b-instruct
    prompt: A caption
"""


def test_status_exits_0_only_when_every_task_is_ok(tmp_path: Path, thread_server: Any) -> None:
    path = write_manifest(tmp_path, "name: gate\noutput: out\n" + provider_block(thread_server())
                          + TWO_JOBS)
    assert run_cli("run", str(path), "--no-progress", "--only", "captions").returncode == 0

    pending = run_cli("status", str(path))
    assert pending.returncode == 1, pending.stdout + pending.stderr
    assert "1 ok, 0 failed, 2 pending of 3" in pending.stdout
    assert run_cli("status", str(path), "--json").returncode == 1

    assert run_cli("run", str(path), "--no-progress").returncode == 0
    for args in ((), ("--json",), ("--verify",)):
        done = run_cli("status", str(path), *args)
        assert done.returncode == 0, (args, done.stdout + done.stderr)
    assert run_cli("status", "out").returncode == 0

    # A file gone from the folder: --verify finds it; plain status reads only the ledger.
    next((tmp_path / "out" / "posters").rglob("*.png")).unlink()
    assert run_cli("status", str(path), "--verify").returncode == 1


def test_status_exits_1_when_a_task_failed(tmp_path: Path, thread_server: Any) -> None:
    path = write_manifest(tmp_path, "name: failing\noutput: out\n"
                          + provider_block(thread_server()) + "jobs:\n" + REFUSED_JOB)
    assert run_cli("run", str(path), "--no-progress").returncode == 1

    done = run_cli("status", str(path))

    assert done.returncode == 1
    assert "0 ok, 2 failed, 0 pending of 2" in done.stdout


# --------------------------------------------------------------------------- the command line


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"batcher": parser, **sub.choices}


def _shown(default: object) -> str:
    return f"{default:g}" if isinstance(default, float) else str(default)


def test_every_option_has_help_with_its_default() -> None:
    for name, parser in _commands().items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {action.option_strings or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, what
            default = action.default
            if default not in (None, False, argparse.SUPPRESS):
                assert f"default: {_shown(default)}" in action.help, what
            elif default is None and action.option_strings and not action.required:
                assert "default: " in action.help, what  # what leaving it out means


def test_every_help_ends_with_exit_codes_and_an_example() -> None:
    for name, parser in _commands().items():
        done = run_cli(*([] if name == "batcher" else [name]), "--help")
        assert done.returncode == 0, done.stderr
        assert "exit codes:" in done.stdout and "\n  0 " in done.stdout, name
        example = done.stdout.split("example:\n", 1)[1].split()
        assert example[0] == "batcher", name
        assert name == "batcher" or example[1] == name, name
        for action in parser._actions:  # every option is in the rendered help
            for option in action.option_strings:
                assert option in done.stdout, (name, option)


def test_run_options_that_override_every_provider_say_so() -> None:
    run = _commands()["run"]
    for action in run._actions:
        if action.dest in {"rate", "concurrency"}:
            assert "overrides every provider" in (action.help or ""), action.dest


def test_serve_fault_kinds_help_names_every_kind() -> None:
    [action] = [a for a in _commands()["serve"]._actions if a.dest == "fault_kinds"]
    listed = action.help.split("from: ", 1)[1].split(" (default")[0]  # type: ignore[union-attr]

    assert listed.split(", ") == list(FAULT_KINDS)
    assert action.default == ",".join(ServerOptions().fault_kinds)


def test_version() -> None:
    done = run_cli("--version")

    assert done.returncode == 0
    assert done.stdout == f"batcher {importlib.metadata.version('batcher')}\n"


def test_verbose_works_before_and_after_the_command(tmp_path: Path, thread_server: Any) -> None:
    path = write_manifest(tmp_path, "name: loud\noutput: out\n" + provider_block(thread_server())
                          + TWO_JOBS)

    quiet = run_cli("run", str(path), "--no-progress")
    after = run_cli("run", str(path), "--no-progress", "-v")
    before = run_cli("-v", "run", str(path), "--no-progress")

    # Debug logs name their logger: batcher's own format with -v.
    assert quiet.returncode == 0 and "INFO batcher.run.pool: " not in quiet.stderr
    for done in (after, before):
        assert done.returncode == 0, done.stderr
        assert "INFO batcher.run.pool: 3 tasks: " in done.stderr, done.stderr


def test_serve_logs_each_request_with_its_injected_fault() -> None:
    process = start_cli("serve", "--port", "0", "--fault-rate", "1", "--fault-kinds", "503")
    try:
        assert process.stdout is not None
        api = re.search(r"API at (\S+)", process.stdout.readline())[1]  # type: ignore[index]
        with urllib.request.urlopen(f"{api}/models", timeout=10) as answer:
            assert answer.status == 200
        body = json.dumps({"model": "llama-3.1-8b-instruct",
                           "messages": [{"role": "user", "content": "Hi"}]}).encode()
        request = urllib.request.Request(f"{api}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503
    finally:
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=30)

    assert process.returncode == 0, err
    lines = err.splitlines()
    assert "GET /v1/models -> 200" in lines, err
    assert "POST /v1/chat/completions -> 503 (injected fault: 503)" in lines, err


def test_serve_on_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        done = run_cli("serve", "--port", str(port), timeout=30)

    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"batcher: serve: port {port} on 127.0.0.1 is in use; choose another with --port "
        "(0 picks a free one)"]


# --------------------------------------------------------------------------- messages


def _validate(tmp_path: Path, text: str, *args: str, name: str = "jobs.yaml") -> str:
    """Validate a manifest that must be refused; returns its one line on stderr."""
    (tmp_path / name).write_text(text)
    done = run_cli("validate", name, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    return line


JOB = "  - {name: a, type: image, provider: local, model: flux.1-schnell, prompt: hi}\n"


def test_a_fractional_concurrency_asks_for_a_whole_number(tmp_path: Path) -> None:
    line = _validate(tmp_path, "name: x\nproviders:\n  local:\n    concurrency: 2.5\njobs:\n" + JOB)

    assert line == ("batcher: jobs.yaml:4: providers.local.concurrency: must be a whole number, "
                    "not 2.5")


def test_a_bad_name_says_which_characters_are_allowed(tmp_path: Path) -> None:
    bad = _validate(tmp_path, "name: bad one!\njobs:\n" + JOB)
    missing = _validate(tmp_path, "jobs:\n" + JOB)

    assert bad == ("batcher: jobs.yaml:1: name: 'bad one!': a name takes only letters, digits, "
                   "'.', '_' and '-' (no spaces)")
    assert missing.startswith("batcher: jobs.yaml:1: name: required")


def test_a_typo_in_defaults_is_reported_where_it_was_written(tmp_path: Path) -> None:
    text = ("name: x\ndefaults:\n  type: image\n  provider: vulture\n  params: {prompt: p}\n"
            "jobs:\n  - {name: a, model: flux.1-schnell, prompt: hi}\n")
    line = _validate(tmp_path, text)
    assert line.startswith("batcher: jobs.yaml:4: defaults.provider: unknown provider 'vulture'")

    fixed = text.replace("vulture", "local")
    assert _validate(tmp_path, fixed).startswith("batcher: jobs.yaml:5: defaults.params.prompt: ")


def test_a_duplicate_jsonl_id_names_the_field_and_the_first_line(tmp_path: Path) -> None:
    def batch(custom_id: str, text: str) -> str:
        body = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": text}]}
        return json.dumps({"custom_id": custom_id, "method": "POST",
                           "url": "/v1/chat/completions", "body": body}) + "\n"

    lines = batch("a", "one") + "\n" + batch("b", "two") + batch("a", "three")
    assert _validate(tmp_path, lines, "--provider", "local", name="tasks.jsonl") == (
        "batcher: tasks.jsonl:4: custom_id: 'a' is already the id of line 1")

    own = ('{"id": "x", "model": "flux.1-schnell", "prompt": "one"}\n'
           '{"id": "x", "model": "flux.1-schnell", "prompt": "two"}\n')
    assert _validate(tmp_path, own, "--provider", "local", name="tasks.jsonl") == (
        "batcher: tasks.jsonl:2: id: 'x' is already the id of line 1")


def test_a_yaml_error_gives_the_column(tmp_path: Path) -> None:
    line = _validate(tmp_path, "name: x\njobs:\n  - name: a\n    seeds: a: b\n")

    assert line.startswith("batcher: jobs.yaml:4: "), line
    assert line.endswith("(column 13)"), line  # the second colon

    # A character the YAML reader refuses: columns count characters, not bytes.
    (tmp_path / "bell.yaml").write_bytes('name: x\njobs:\n  - name: "\u00e9t\a"\n'.encode())
    bell = run_cli("validate", "bell.yaml", cwd=tmp_path).stderr.strip()
    assert bell.startswith("batcher: bell.yaml:3: ") and bell.endswith("column 14)"), bell


def test_counts_of_one_are_singular(tmp_path: Path, thread_server: Any) -> None:
    one = tmp_path / "one.yaml"
    one.write_text("name: x\njobs:\n" + JOB)
    assert run_cli("validate", str(one)).stdout.strip() == f"{one}: ok (1 job: a)"

    # The one task faults once and is retried once.
    server = thread_server(fault_rate=1.0, fault_kinds=("500",))
    path = write_manifest(tmp_path, "name: once\noutput: out\n" + provider_block(server)
                          + "jobs:\n" + JOB.replace("local", "test"))
    done = run_cli("run", str(path), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "1 ran, 1 retry, 0 rate-limited" in done.stderr, done.stderr


def test_status_lists_jobs_and_models_in_manifest_order(tmp_path: Path,
                                                        thread_server: Any) -> None:
    # The ledger is written in the order tasks finish. To make that order differ from the
    # manifest's every time, the first run has only flux in zeta; the second adds
    # stable-diffusion before it, so its row is written last.
    jobs = """\
jobs:
  - name: zeta
    type: image
    provider: test
    models: [MODELS]
    prompt: A poster
    params: {size: 256x256, response_format: b64_json}
  - name: alpha
    type: chat
    provider: test
    model: llama-3.1-8b-instruct
    prompt: A caption
"""
    server = thread_server()
    head = "name: order\noutput: out\n" + provider_block(server)
    path = write_manifest(tmp_path, head + jobs.replace("MODELS", "flux.1-schnell"))
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    path = write_manifest(tmp_path, head + jobs.replace(
        "MODELS", "stable-diffusion-3.5-medium, flux.1-schnell"))
    plan = run_cli("plan", str(path)).stdout.splitlines()[1:4]
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert [row["model"] for row in ledger_rows(tmp_path / "out")][-1] == \
        "stable-diffusion-3.5-medium"
    expected = [("zeta", "stable-diffusion-3.5-medium"), ("zeta", "flux.1-schnell"),
                ("alpha", "llama-3.1-8b-instruct")]

    assert [tuple(row.split()[:2]) for row in plan] == expected
    for target in (str(path), "out"):
        report = json.loads(run_cli("status", target, "--json").stdout)
        assert [(row["job"], row["model"]) for row in report["models"]] == expected, target
        assert [row["ok"] for row in report["models"]] == [1, 1, 1], target
        table = run_cli("status", target).stdout.splitlines()[2:5]
        assert [tuple(row.split()[:2]) for row in table] == expected, target


def test_rates_print_as_written(tmp_path: Path, thread_server: Any) -> None:
    path = write_manifest(tmp_path, "name: rates\n" + provider_block(thread_server(), rate="20/10s")
                          + "jobs:\n" + JOB.replace("local", "test")
                          + JOB.replace("local", "vultr").replace("name: a", "name: b"))

    done = run_cli("plan", str(path))
    flag = run_cli("plan", str(path), "--rate", "600/min")

    assert "rate limits: test 20/10s, vultr 60/min\n" in done.stdout, done.stdout
    assert "rate limits: test 600/min, vultr 600/min\n" in flag.stdout, flag.stdout


def test_status_says_when_a_run_is_writing_the_folder(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server(latency=1.0)  # ten tasks one at a time: a run of ten seconds
    path = write_manifest(tmp_path, "name: busy\noutput: out\n"
                          + provider_block(server, concurrency=1) + "jobs:\n"
                          + JOB.replace("local", "test").replace("hi}", "hi, seeds: 10}"))
    run = start_cli("run", str(path), "--no-progress", "--grace", "5", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "out" / "ledger.sqlite").exists():  # the run holds the lock first
            assert time.monotonic() < deadline and run.poll() is None, "the run did not start"
            time.sleep(0.05)
        busy = run_cli("status", str(path))
        busy_json = json.loads(run_cli("status", str(path), "--json").stdout)
        assert run.poll() is None, "the run ended before status looked"
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=60)

    assert busy.returncode == 1, busy.stdout + busy.stderr
    assert "note: a batcher run is writing to this output now" in busy.stdout, busy.stdout
    assert busy_json["running"] is True
    after = run_cli("status", str(path))
    assert after.returncode == 1 and "note:" not in after.stdout, after.stdout
    assert json.loads(run_cli("status", str(path), "--json").stdout)["running"] is False
