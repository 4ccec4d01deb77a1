"""`batcher prune` and `run --prune`: after a prompt edit the old prompt's files and ledger rows
go, in a folder and in an S3 store (moto on 127.0.0.1), the reports list only the current set,
and the next run sends nothing. The CLI runs as a user runs it; requests are counted at the
built-in server."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

from conftest import ledger_rows, provider_block, run_cli, write_manifest
from s3server import S3Server, s3, store_env
from test_lease import FakeHolder

from batcher.imagegen import render_png
from batcher.manifest import load_manifest
from batcher.store.folderlock import lock_folder
from batcher.store.ledger import Ledger
from batcher.store.names import JOURNAL_NAME
from batcher.store.stale import find_stale, manifest_ids

__all__ = ["s3"]  # a fixture, used by name

OLD = "A lantern number {n}"
NEW = "A paper lantern number {n}"


def manifest(server: Any, folder: Path, *, prompt: str = OLD, output: str = "out",
             key_env: str | None = None) -> Path:
    text = f"name: prune\noutput: {output}\n" + provider_block(
        server, key_env=key_env) + textwrap.dedent(f"""\
        jobs:
          - name: pics
            type: image
            provider: test
            model: flux.1-schnell
            prompt: "{prompt}"
            vars: {{n: [1, 2, 3]}}
            params: {{size: 256x256, response_format: b64_json}}
          - name: lines
            type: chat
            provider: test
            model: llama-3.1-8b-instruct
            prompt: "Describe lantern {{n}}"
            vars: {{n: [1, 2]}}
            params: {{max_tokens: 20}}
        """)
    return write_manifest(folder, text)


def paid(server: Any) -> int:
    return sum(server.stats.generations.values())


def files_of(rows: list[dict[str, Any]]) -> list[str]:
    """Every file of the rows, with each task's sidecar."""
    names = []
    for row in rows:
        for rel, _size, _sha in row["files"]:
            names.append(rel)
        names.append(str(Path(row["files"][0][0]).with_suffix(".json")))
    return names


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and not p.name.startswith("ledger.sqlite")}


def run_then_edit(server: Any, folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Run the manifest, then edit the image prompt and run again: the output holds the old
    prompt's three tasks beside the new ones. Returns the manifest and the old rows."""
    path = manifest(server, folder)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    old = [row for row in ledger_rows(folder / "out", decode=True) if row["job"] == "pics"]
    path = manifest(server, folder, prompt=NEW)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert len(ledger_rows(folder / "out")) == 8
    return path, old


def check_only_current(out: Path, old: list[dict[str, Any]]) -> None:
    rows = ledger_rows(out, decode=True)
    assert len(rows) == 5
    assert {row["id"] for row in rows}.isdisjoint(row["id"] for row in old)
    assert not any(row["prompt"].startswith("A lantern") for row in rows)
    for name in files_of(old):
        assert not (out / name).exists(), name
    for name in files_of(rows):
        assert (out / name).is_file(), name
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in results) == sorted(row["id"] for row in rows)
    sheet = (out / "index.html").read_text()
    assert "A paper lantern number 1" in sheet and "A lantern number" not in sheet


def test_prune_after_a_prompt_edit_leaves_only_the_current_set(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path, old = run_then_edit(server, tmp_path)
    before = paid(server)

    pruned = run_cli("prune", str(path))

    assert pruned.returncode == 0, pruned.stderr
    assert "removing 3 tasks" in pruned.stdout and "(6 files)" in pruned.stdout
    assert pruned.stdout.count("pics/flux.1-schnell [ok]: A lantern number") == 3
    check_only_current(tmp_path / "out", old)
    assert not (tmp_path / "out" / JOURNAL_NAME).exists()
    verify = run_cli("status", "out", "--verify")
    assert verify.returncode == 0, verify.stdout  # no row names a file that went
    again = run_cli("run", str(path), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert paid(server) == before, "a run after prune sent requests"
    assert "5 already done" in again.stderr
    second = run_cli("prune", str(path))
    assert second.returncode == 0 and "nothing to remove" in second.stdout


def test_dry_run_lists_and_removes_nothing(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path, _old = run_then_edit(server, tmp_path)
    out = tmp_path / "out"
    files, rows = tree(out), ledger_rows(out)

    dry = run_cli("prune", str(path), "--dry-run")

    assert dry.returncode == 0, dry.stderr
    assert "would remove 3 tasks" in dry.stdout and "nothing removed" in dry.stdout
    assert tree(out) == files
    assert ledger_rows(out) == rows


def test_run_prune_counts_the_whole_manifest_whatever_only_says(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = manifest(server, tmp_path)
    first = run_cli("run", str(path), "--no-progress", "--prune")  # a new folder: no ledger yet
    assert first.returncode == 0, first.stderr
    old = [row for row in ledger_rows(tmp_path / "out", decode=True) if row["job"] == "pics"]
    path = manifest(server, tmp_path, prompt=NEW)
    before = paid(server)
    # Every task of pics goes before its new prompt ran: only with --force (tests/test_files.py).
    dry = run_cli("run", str(path), "--dry-run", "--prune", "--force")
    assert dry.returncode == 0 and "would remove 3 tasks" in dry.stdout
    assert "to run" in dry.stdout and len(ledger_rows(tmp_path / "out")) == 5

    only = run_cli("run", str(path), "--no-progress", "--prune", "--only", "lines", "--force")

    assert only.returncode == 0, only.stderr
    assert "removing 3 tasks" in only.stdout
    assert paid(server) == before  # lines were done; pics not selected
    rows = ledger_rows(tmp_path / "out")
    assert sorted(row["job"] for row in rows) == ["lines", "lines"]  # lines kept, old pics gone
    full = run_cli("run", str(path), "--no-progress", "--prune")
    assert full.returncode == 0, full.stderr
    assert paid(server) == before + 3
    check_only_current(tmp_path / "out", old)
    shard = run_cli("run", str(path), "--prune", "--shard", "1/2")
    assert shard.returncode == 2 and "--shard" in shard.stderr


def test_run_prune_without_the_key_removes_nothing(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = manifest(server, tmp_path, key_env="TEST_KEY")
    assert run_cli("run", str(path), "--no-progress", env={"TEST_KEY": "k"}).returncode == 0
    path = manifest(server, tmp_path, prompt=NEW, key_env="TEST_KEY")

    done = run_cli("run", str(path), "--no-progress", "--prune")

    assert done.returncode == 2 and "TEST_KEY" in done.stderr
    assert len(ledger_rows(tmp_path / "out")) == 5  # the old prompt's rows are all still there


def test_prune_refuses_a_folder_a_run_is_writing(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path, _old = run_then_edit(server, tmp_path)
    out = tmp_path / "out"
    files = tree(out)

    with lock_folder(out):  # as a run holds it
        refused = run_cli("prune", str(path))

    assert refused.returncode == 2
    assert "another batcher run is writing" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert tree(out) == files and len(ledger_rows(out)) == 8


def test_a_prune_killed_after_its_rows_went_is_finished_by_the_next(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path, old = run_then_edit(server, tmp_path)
    out = tmp_path / "out"
    # What a prune killed between its ledger commit and its deletions leaves: the journal,
    # no rows for the old tasks, their files still there.
    names = files_of(old)
    (out / JOURNAL_NAME).write_text(json.dumps(names + ["../outside.txt"]))
    (tmp_path / "outside.txt").write_text("not batcher's")
    with sqlite3.connect(out / "ledger.sqlite") as db:
        db.executemany("DELETE FROM tasks WHERE id = ?", [(row["id"],) for row in old])

    pruned = run_cli("prune", str(path))

    assert pruned.returncode == 0, pruned.stderr
    assert "6 files an interrupted prune left behind" in pruned.stdout
    check_only_current(out, old)
    assert (tmp_path / "outside.txt").exists()  # a journal never names a way out
    assert not (out / JOURNAL_NAME).exists()


def test_prune_with_a_manifest_of_other_jobs_is_refused(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = manifest(server, tmp_path)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    other = write_manifest(tmp_path, f"name: other\noutput: out\n{provider_block(server)}"
                           "jobs:\n  - {name: x, type: chat, provider: test, "
                           "model: llama-3.1-8b-instruct, prompt: hi}\n", name="other.yaml")

    refused = run_cli("prune", str(other))

    assert refused.returncode == 2
    assert "none of its 5 tasks belongs to a job of" in refused.stderr
    assert len(ledger_rows(tmp_path / "out")) == 5


def test_a_task_with_rows_in_several_ledgers_is_one_task_to_prune(
    tmp_path: Path, thread_server: Any
) -> None:
    # In a store, shards' ledgers and the unsharded one can each hold a row of the same task.
    server = thread_server()
    path, _old = run_then_edit(server, tmp_path)
    copy = tmp_path / "shard.sqlite"
    with Ledger(tmp_path / "out" / "ledger.sqlite") as ledger:
        ledger.snapshot(copy)
    manifest_now = load_manifest(path)

    with Ledger(tmp_path / "out" / "ledger.sqlite") as one, Ledger(copy) as two:
        found = find_stale([one, two], manifest_ids(manifest_now), manifest_now, "out",
                           lambda name: True)

    assert len(found.tasks) == 3 and found.kept == 5
    assert len(found.names) == 6


# --------------------------------------------------------------------------- object stores


def ledger_ids(s3: S3Server, bucket: str, key: str, folder: Path) -> list[str]:
    path = folder / f"{key.replace('/', '-')}.copy"
    path.write_bytes(s3.get(bucket, key))
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return [row[0] for row in db.execute("SELECT id FROM tasks")]


def test_prune_a_store_with_shards_then_a_fresh_machine_sends_nothing(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/set"
    path = manifest(server, tmp_path, output=url)
    for shard in ("1/2", "2/2"):
        done = run_cli("run", str(path), "--no-progress", "--shard", shard,
                       env=store_env(s3.url, str(tmp_path / f"c{shard[0]}")))
        assert done.returncode == 0, done.stderr
    old_keys = set(s3.keys(bucket, "set/pics/"))
    assert len(old_keys) == 6  # three images and their sidecars
    path = manifest(server, tmp_path, prompt=NEW, output=url)
    assert run_cli("run", str(path), "--no-progress",
                   env=store_env(s3.url, str(tmp_path / "c3"))).returncode == 0
    before = paid(server)

    pruned = run_cli("prune", str(path), env=store_env(s3.url, str(tmp_path / "c4")))

    assert pruned.returncode == 0, pruned.stderr
    assert "removing 3 tasks" in pruned.stdout
    keys = s3.keys(bucket, "set/")
    assert old_keys.isdisjoint(keys)
    assert len([k for k in keys if k.startswith("set/pics/")]) == 6  # the new prompt's
    assert f"set/{JOURNAL_NAME}" not in keys
    ids: list[str] = []
    for key in ("set/ledger.sqlite", "set/ledgers/shard-1-of-2.sqlite",
                "set/ledgers/shard-2-of-2.sqlite"):
        ids += ledger_ids(s3, bucket, key, tmp_path)
    results = [json.loads(line)
               for line in s3.get(bucket, "set/results.jsonl").decode().splitlines()]
    assert len(results) == 5 and set(ids) == {line["custom_id"] for line in results}
    assert all("A lantern" not in line["metadata"]["prompt"] for line in results)
    assert b"A lantern number" not in s3.get(bucket, "set/index.html")
    again = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "c5")))
    assert again.returncode == 0, again.stderr
    assert paid(server) == before and "5 already done" in again.stderr


def test_prune_refuses_a_store_a_run_holds(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/held"
    path = manifest(server, tmp_path, output=url)
    env = store_env(s3.url, str(tmp_path / "cache"))
    assert run_cli("run", str(path), "--no-progress", env=env).returncode == 0
    path = manifest(server, tmp_path, prompt=NEW, output=url)
    holder = FakeHolder(s3, bucket, "held/.batcher.lock", clock_offset=0, lease=60, alive=True)
    keys = s3.keys(bucket, "held/")
    del keys["held/.batcher.lock"]  # its heartbeat changes it

    try:
        refused = run_cli("prune", str(path), env=env)
    finally:
        holder.stop()

    assert refused.returncode == 2
    assert "another batcher run holds .batcher.lock" in refused.stderr
    assert "ci-runner-7" in refused.stderr
    assert {k: v for k, v in s3.keys(bucket, "held/").items() if k in keys} == keys
    assert s3.keys(bucket, "held/").keys() - keys.keys() == {"held/.batcher.lock"}
    # Reads only: no lock needed (--force: every task of pics goes, see tests/test_files.py).
    dry = run_cli("prune", str(path), "--dry-run", "--force", env=env)
    assert dry.returncode == 0 and "would remove 3 tasks" in dry.stdout


def test_run_prune_into_a_store(tmp_path: Path, thread_server: Any, s3: S3Server) -> None:
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/ci"
    path = manifest(server, tmp_path, output=url)
    first = run_cli("run", str(path), "--no-progress", "--prune",  # nothing there yet
                    env=store_env(s3.url, str(tmp_path / "c1")))
    assert first.returncode == 0, first.stderr
    old_keys = set(s3.keys(bucket, "ci/pics/"))
    path = manifest(server, tmp_path, prompt=NEW, output=url)
    before = paid(server)

    done = run_cli("run", str(path), "--no-progress", "--prune", "--force",  # all of pics
                   env=store_env(s3.url, str(tmp_path / "c2")))

    assert done.returncode == 0, done.stderr
    assert "removing 3 tasks" in done.stdout
    assert paid(server) == before + 3
    keys = s3.keys(bucket, "ci/")
    assert old_keys.isdisjoint(keys) and len([k for k in keys if k.startswith("ci/pics/")]) == 6
    results = s3.get(bucket, "ci/results.jsonl").decode().splitlines()
    assert len(results) == 5 and "A lantern number" not in "".join(results)


def test_prune_removes_derived_files_with_their_task_and_keeps_shared_input_thumbnails(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    (tmp_path / "ref.png").write_bytes(render_png("ref", 64, 64))

    def edit_manifest(prompts: list[str]) -> Path:
        text = "name: prune\noutput: out\n" + provider_block(server) + textwrap.dedent(f"""\
            jobs:
              - name: edits
                type: image
                provider: test
                model: black-forest-labs/flux-kontext-max/multi
                prompts: {json.dumps(prompts)}
                images: [ref.png]
                params: {{response_format: b64_json}}
                outputs: {{format: webp, sizes: {{thumb: 32}}}}
            """)
        return write_manifest(tmp_path, text)

    assert run_cli("run", str(edit_manifest(["Make it red", "Make it blue"])),
                   "--no-progress").returncode == 0
    rows = {row["prompt"]: row for row in ledger_rows(tmp_path / "out", decode=True)}
    derived = {prompt: [entry["path"] for entry in json.loads(row["derived"])["files"]]
               for prompt, row in rows.items()}
    inputs = [p for p in derived["Make it red"] if "/inputs/" in p]
    assert inputs and inputs == [p for p in derived["Make it blue"] if "/inputs/" in p]
    gone = [p for p in derived["Make it red"] if "/inputs/" not in p]
    assert any(p.endswith(".webp") for p in gone) and any("@thumb" in p for p in gone)
    for name in (*gone, *inputs):
        assert (tmp_path / "out" / name).is_file(), name

    pruned = run_cli("prune", str(edit_manifest(["Make it blue"])))

    assert pruned.returncode == 0, pruned.stderr
    for name in gone:
        assert not (tmp_path / "out" / name).exists(), name
    for name in (*derived["Make it blue"], *inputs):  # the kept task's, and the shared input's
        assert (tmp_path / "out" / name).is_file(), name


def test_a_ledger_row_naming_a_file_outside_the_output_never_makes_prune_remove_it(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path, old = run_then_edit(server, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    # A ledger that came from elsewhere (a store, a merge) names files outside the output.
    with sqlite3.connect(tmp_path / "out" / "ledger.sqlite") as db:
        for row in old:
            files = [*row["files"], ["../victim.txt", 7, "0" * 64], [str(victim), 7, "0" * 64]]
            derived = {"spec": "x", "files": [{"path": "../victim.txt", "size": 7,
                                               "sha256": "0" * 64}]}
            db.execute("UPDATE tasks SET files = ?, derived = ? WHERE id = ?",
                       (json.dumps(files), json.dumps(derived), row["id"]))

    pruned = run_cli("prune", str(path))

    assert pruned.returncode == 0, pruned.stderr
    assert victim.read_text() == "keep me"
    assert len(ledger_rows(tmp_path / "out")) == 5  # the stale rows went all the same
