"""The command line as a user runs it (`python -m batcher ...` in a subprocess): validate, plan,
status, models, dry runs, and the offline demo."""

from __future__ import annotations

import contextlib
import html
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, provider_block, run_cli, write_manifest

from batcher.server import CHAT_MODELS, IMAGE_MODELS

GOOD = """\
jobs:
  - name: posters
    type: image
    provider: test
    models: [flux.1-schnell, stable-diffusion-3.5-medium]
    prompts: ["A hedgehog in {city}"]
    vars: {city: [Amsterdam, Tokyo, Lima]}
    seeds: 2
    params: {size: 256x256, response_format: b64_json}
  - name: captions
    type: chat
    provider: test
    model: llama-3.1-8b-instruct
    system: You write one-line captions.
    prompt: A caption for a poster
    seeds: [7, 42]
    params: {max_tokens: 20}
"""
BROKEN_SIZE = """\
  - name: broken
    type: image
    provider: test
    model: flux.1-dev
    prompt: A size the server refuses
    seeds: 2
    params: {size: 999x999, response_format: b64_json}
"""


def good_manifest(tmp_path: Path, server: Any, *, extra_jobs: str = "", rate: str | None = None
                  ) -> Path:
    text = "name: clitest\noutput: out\n" + provider_block(server, rate=rate) + GOOD + extra_jobs
    return write_manifest(tmp_path, text)


def ledger_counts(out: Path) -> dict[str, int]:
    uri = f"file:{out / 'ledger.sqlite'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        counts = dict(db.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())
    return {"ok": counts.get("ok", 0), "failed": counts.get("failed", 0)}


def ledger_files(out: Path) -> list[tuple[str, int, str]]:
    uri = f"file:{out / 'ledger.sqlite'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute("SELECT files FROM tasks WHERE status = 'ok'").fetchall()
    return [tuple(f) for (files,) in rows for f in json.loads(files)]


# --------------------------------------------------------------------------- validate


def test_validate_accepts_a_good_manifest(tmp_path: Path, thread_server: Any) -> None:
    path = good_manifest(tmp_path, thread_server())

    done = run_cli("validate", str(path))

    assert done.returncode == 0, done.stderr
    assert "posters" in done.stdout and "captions" in done.stdout


JOB_HEAD = "name: broken\njobs:\n  - name: a\n    type: image\n    provider: local\n"
BROKEN = {
    "unknown job field": (
        JOB_HEAD + "    model: flux.1-schnell\n    prompt: hi\n    colour: red\n",
        8, "jobs[0].colour"),
    "placeholder without a var": (
        JOB_HEAD + "    model: flux.1-schnell\n    prompts: ['A {city}']\n", 7, "jobs[0].prompts"),
    "unknown provider": (
        "name: broken\njobs:\n  - name: a\n    type: image\n    provider: nowhere\n"
        "    model: flux.1-schnell\n    prompt: hi\n", 5, "jobs[0].provider"),
    "bad rate limit": (
        "name: broken\nproviders:\n  studio:\n    base_url: http://127.0.0.1:9/v1\n"
        "    rate_limit: fast\njobs:\n  - name: a\n    type: image\n    provider: studio\n"
        "    model: flux.1-schnell\n    prompt: hi\n", 5, "providers.studio.rate_limit"),
    "negative seed count": (
        JOB_HEAD + "    model: flux.1-schnell\n    prompt: hi\n    seeds: -1\n", 8,
        "jobs[0].seeds"),
    "missing input image": (
        JOB_HEAD + "    model: flux.1-schnell\n    prompt: hi\n    images: [nowhere.png]\n", 8,
        "jobs[0].images"),
    "job type": (
        "name: broken\njobs:\n  - name: a\n    type: video\n    provider: local\n"
        "    model: flux.1-schnell\n    prompt: hi\n", 4, "jobs[0].type"),
    "duplicate job name": (
        JOB_HEAD + "    model: flux.1-schnell\n    prompt: hi\n"
        "  - name: a\n    type: image\n    provider: local\n    model: flux.1-dev\n"
        "    prompt: ho\n", 8, "jobs[1].name"),
    "seed in params": (
        JOB_HEAD + "    model: flux.1-schnell\n    prompt: hi\n    seeds: 2\n"
        "    params: {size: 256x256, seed: 3}\n", 9, "jobs[0].params.seed"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validate_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    text, line, field = BROKEN[case]
    path = write_manifest(tmp_path, text, "broken.yaml")

    done = run_cli("validate", str(path))

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"broken.yaml:{line}: {field}" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2


def test_validate_reports_yaml_syntax_with_a_line(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, JOB_HEAD + "    model: [flux.1-schnell\n    prompt: hi\n",
                          "broken.yaml")

    done = run_cli("validate", str(path))

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert re.search(r"broken\.yaml:\d+: ", done.stderr), done.stderr


def test_validate_reports_a_bad_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        '{"id": "a", "model": "flux.1-schnell", "prompt": "x"}\n'
        '{"id": "b", "model": "flux.1-schnell", "prompt": "y", "seed": "seven"}\n')

    done = run_cli("validate", str(path), "--provider", "local")

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "tasks.jsonl:2: seed" in done.stderr, done.stderr


def test_a_missing_manifest_is_exit_2_without_traceback(tmp_path: Path) -> None:
    done = run_cli("run", str(tmp_path / "nope.yaml"))

    assert done.returncode == 2
    assert "nope.yaml" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- plan and dry runs


PLAN_ROW = r"^{job}\s+{model}\s+{total}\s+{done}\s+{failed}\s+{to_run}(?:\s+\S.*)?$"


def plan_row(stdout: str, job: str, model: str) -> tuple[int, int, int, int]:
    pattern = PLAN_ROW.format(job=re.escape(job), model=re.escape(model),
                              total=r"(\d+)", done=r"(\d+)", failed=r"(\d+)", to_run=r"(\d+)")
    match = re.search(pattern, stdout, re.MULTILINE)
    assert match, f"no plan row for {job} / {model} in:\n{stdout}"
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def test_plan_counts_per_job_and_model_and_sends_nothing(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = good_manifest(tmp_path, server, rate="10/s")

    done = run_cli("plan", str(path))

    assert done.returncode == 0, done.stderr
    assert plan_row(done.stdout, "posters", "flux.1-schnell") == (6, 0, 0, 6)
    assert plan_row(done.stdout, "posters", "stable-diffusion-3.5-medium") == (6, 0, 0, 6)
    assert plan_row(done.stdout, "captions", "llama-3.1-8b-instruct") == (2, 0, 0, 2)
    assert re.search(r"^total\s+14\s+0\s+0\s+14\s+unknown$", done.stdout, re.MULTILINE), done.stdout
    assert "ETA" in done.stdout
    assert server.stats.requests == []
    assert not (tmp_path / "out" / "ledger.sqlite").exists()

    # After part of the work is done, plan says so.
    assert run_cli("run", str(path), "--only", "captions", "--no-progress").returncode == 0
    sent = len(server.stats.requests)
    again = run_cli("plan", str(path))
    assert plan_row(again.stdout, "captions", "llama-3.1-8b-instruct") == (2, 2, 0, 0)
    assert plan_row(again.stdout, "posters", "flux.1-schnell") == (6, 0, 0, 6)
    assert len(server.stats.requests) == sent


def test_run_dry_run_sends_nothing(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = good_manifest(tmp_path, server)

    done = run_cli("run", str(path), "--dry-run")

    assert done.returncode == 0, done.stderr
    assert re.search(r"^total\s+14\s+0\s+0\s+14\s+unknown$", done.stdout, re.MULTILINE), done.stdout
    assert server.stats.requests == []
    assert not (tmp_path / "out" / "ledger.sqlite").exists()


def test_plan_of_a_million_tasks_streams(tmp_path: Path) -> None:
    # Memory stays flat: planning a million tasks peaks where planning ten thousand does.
    # Holding a million tasks would take ~300 MB more; the bound leaves room for load and
    # allocator noise without pinning a figure (bench/ prints figures).
    peaks = {seeds: _plan_peak_kb(tmp_path, seeds) for seeds in (1, 100)}
    grown_mb = (peaks[100] - peaks[1]) / 1024
    assert grown_mb < 60, f"plan grew {grown_mb:.0f} MB from 10k to 1M tasks: not lazy"
    assert not (tmp_path / "output").exists()


def _plan_peak_kb(tmp_path: Path, seeds: int) -> int:
    """Run ``batcher plan`` on 100 prompts x 100 vars x ``seeds``; its peak RSS in KB."""
    prompts = json.dumps([f"Prompt {i} about {{thing}}" for i in range(100)])
    things = json.dumps([f"thing{i}" for i in range(100)])
    path = write_manifest(tmp_path, f"""\
        name: huge
        defaults:
          provider: local
        jobs:
          - name: grid
            type: image
            model: flux.1-schnell
            prompts: {prompts}
            vars: {{thing: {things}}}
            seeds: {seeds}
            params: {{size: 256x256}}
        """, name=f"huge-{seeds}.yaml")
    # `python -m batcher plan`, reporting its own peak memory when it is done.
    script = ("import resource, sys\nfrom batcher.cli import main\ncode = main(sys.argv[1:])\n"
              "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
              "file=sys.stderr)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script, "plan", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    total = 10_000 * seeds
    assert re.search(rf"^total\s+{total}\s+0\s+0\s+{total}\s+unknown$", done.stdout,
                     re.MULTILINE), done.stdout
    return int(re.search(r"MAXRSS_KB (\d+)", done.stderr)[1])  # type: ignore[index]


# --------------------------------------------------------------------------- status


def test_status_agrees_with_the_ledger(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = good_manifest(tmp_path, server, extra_jobs=BROKEN_SIZE)
    ran = run_cli("run", str(path), "--no-progress")
    assert ran.returncode == 1, ran.stderr
    counts = ledger_counts(tmp_path / "out")
    assert counts == {"ok": 14, "failed": 2}

    for target in (str(path), "out"):
        as_json = run_cli("status", target, "--json")
        assert "Traceback" not in as_json.stderr
        report = json.loads(as_json.stdout)
        assert (report["total"], report["ok"], report["failed"], report["pending"]) == (
            16, 14, 2, 0), target
        rows = {(r["job"], r["model"]): r for r in report["models"]}
        assert rows[("broken", "flux.1-dev")]["failed"] == 2
        assert rows[("posters", "flux.1-schnell")]["ok"] == 6
        assert sum(r["ok"] for r in rows.values()) == counts["ok"]
        [failure] = report["failures"]
        assert failure["count"] == 2 and "999x999" in failure["reason"]

        text = run_cli("status", target)
        assert text.returncode == as_json.returncode == 1  # README: a failed task: exit 1
        assert "Traceback" not in text.stderr
        assert "14 ok, 2 failed, 0 pending of 16" in text.stdout, text.stdout
        assert "999x999" in text.stdout
    assert len(server.stats.requests) == 16  # status itself sends nothing


def test_status_counts_pending_tasks_of_a_partial_run(tmp_path: Path, thread_server: Any) -> None:
    path = good_manifest(tmp_path, thread_server())
    assert run_cli("run", str(path), "--only", "captions", "--no-progress").returncode == 0

    done = run_cli("status", str(path), "--json")
    report = json.loads(done.stdout)

    assert (report["total"], report["ok"], report["failed"], report["pending"]) == (14, 2, 0, 12)
    assert done.returncode == 1  # README: pending tasks make status exit 1


def test_status_verify_reports_a_changed_file(tmp_path: Path, thread_server: Any) -> None:
    path = good_manifest(tmp_path, thread_server())
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    clean = run_cli("status", str(path), "--verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "changed" not in clean.stdout

    rel = next(f for f, _size, _sha in ledger_files(tmp_path / "out") if f.endswith(".png"))
    victim = tmp_path / "out" / rel
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF  # same size: only a re-hash can notice
    victim.write_bytes(bytes(data))

    text = run_cli("status", str(path), "--verify")
    report = json.loads(run_cli("status", str(path), "--verify", "--json").stdout)

    assert text.returncode == 1, text.stderr  # README: status exits 1 on a changed file
    assert rel in text.stdout and "changed" in text.stdout, text.stdout
    assert [(c["path"], c["problem"]) for c in report["changed"]] == [(rel, "changed")]


# --------------------------------------------------------------------------- other commands


def test_models_local_lists_the_built_in_models() -> None:
    done = run_cli("models", "local")

    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(IMAGE_MODELS + CHAT_MODELS)


def test_python_dash_m_batcher_works() -> None:
    help_text = run_cli("--help")
    bare = run_cli()

    assert help_text.returncode == 0
    for command in ("run", "plan", "validate", "status", "models", "serve", "merge"):
        assert command in help_text.stdout
    assert bare.returncode == 2 and "usage" in bare.stderr.lower()
    assert "Traceback" not in bare.stderr


def test_the_offline_demo_runs_and_writes_a_contact_sheet(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name in ("demo.yaml", "ref-a.png", "ref-b.png"):
        shutil.copy(REPO / "jobs" / name, jobs / name)

    done = run_cli("run", "jobs/demo.yaml", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    out = tmp_path / "output" / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"] == summary["ok"] == 15 and summary["failed"] == 0
    # The demo's made-up prices: 13 images at $0.003, and the captions by their usage.
    assert 13 * 0.003 < summary["cost_usd"] < 13 * 0.003 + 0.001
    assert "spent $0.0390 this run" in done.stderr
    page = (out / "index.html").read_text(encoding="utf-8")
    files = ledger_files(out)
    images = [f for f, _, _ in files if f.endswith(".png")]
    assert len(images) == 8 + 4 + 1  # posters, postcards (n: 2), edits
    for rel in images:
        assert (out / rel).is_file()
        assert Path(rel).name in page
    texts = [f for f, _, _ in files if f.endswith(".txt")]
    assert len(texts) == 4
    for rel in texts:
        assert html.escape((out / rel).read_text(encoding="utf-8")) in page
