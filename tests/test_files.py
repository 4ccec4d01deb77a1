"""Issue 18, what a user writes and what batcher keeps: a file belongs to one task (names carry
16 hex characters of the task id; the ledger refuses a second task claiming a stem; outputs
written with 8-character names keep working), prune cannot empty a job because a flag was left
off, a user id is one task, vars files name their bad cell, big pixel counts are refused
before they are decoded, and the command line's edges (a closed stdout, ``--budget none``).

The CLI runs as a user runs it; requests are counted at the built-in server."""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

from conftest import ledger_rows, provider_block, run_cli, write_manifest
from s3server import S3Server, s3, store_env
from scripted import ScriptedServer, good_image, json_reply

from batcher.manifest import load_manifest
from batcher.manifest.tasks import expand
from batcher.store.ledger import Ledger
from batcher.store.names import Layout, short_id

__all__ = ["s3"]  # a fixture, used by name

# Two rows whose names met with 8 hex characters (found by a search over 300,000 values of x
# for exactly this job): one file, one paid image lost, and every later run paying again.
COLLIDING = ("0051699", "0059751")
PROMPT = "Professional ecommerce studio product photograph of item {x}"


def paid(server: Any) -> int:
    return sum(server.stats.generations.values())


def collide_manifest(server: Any, folder: Path, *, outputs: str = "") -> Path:
    text = "name: collide\noutput: out\n" + provider_block(server) + textwrap.dedent(f"""\
        jobs:
          - name: products
            type: image
            provider: test
            model: flux.1-schnell
            prompts: ["{PROMPT}"]
            vars: {{x: ["{COLLIDING[0]}", "{COLLIDING[1]}"]}}
            params: {{size: 256x256, response_format: b64_json}}
        """)
    if outputs:
        text += f"    outputs: {outputs}\n"
    return write_manifest(folder, text)


def test_the_colliding_pair_really_shared_an_8_character_name(tmp_path: Path,
                                                               thread_server: Any) -> None:
    """The fixture holds: without 16 characters these two tasks would write one file."""
    manifest = load_manifest(collide_manifest(thread_server(), tmp_path))
    layout = Layout(tmp_path / "out")
    tasks = list(expand(manifest))
    assert len({layout.legacy_stem(task) for task in tasks}) == 1
    assert len({layout.task_stem(task) for task in tasks}) == 2
    assert all(re.search(r"-[0-9a-f]{16}$", layout.task_stem(task)) for task in tasks)
    assert short_id(tasks[0].id) != short_id(tasks[1].id)


def test_two_prompts_sharing_a_slug_prefix_keep_two_files_and_are_paid_once(
        tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = collide_manifest(server, tmp_path)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    rows = ledger_rows(tmp_path / "out", decode=True)
    assert [row["status"] for row in rows] == ["ok", "ok"]
    files = [row["files"][0] for row in rows]
    assert files[0][0] != files[1][0]
    for name, size, sha in files:
        assert (tmp_path / "out" / name).stat().st_size == size
        assert sha in (tmp_path / "out" / name).with_suffix(".json").read_text()
    assert files[0][2] != files[1][2]  # two pictures, both kept
    assert paid(server) == 2
    again = run_cli("run", str(path), "--no-progress")
    assert again.returncode == 0 and paid(server) == 2  # nothing paid twice
    assert run_cli("status", str(path)).returncode == 0


def test_a_task_whose_names_another_task_owns_is_not_sent(tmp_path: Path,
                                                          thread_server: Any) -> None:
    """A collision of 16 characters is out of reach; should one happen, the ledger's claim
    keeps the first task's files and fails the second, named, before it is paid for."""
    server = thread_server()
    path = collide_manifest(server, tmp_path)
    manifest = load_manifest(path)
    out = tmp_path / "out"
    first, second = list(expand(manifest))
    stem = Layout(out).task_stem(second)
    squatter = out / f"{stem}.png"
    squatter.parent.mkdir(parents=True)
    squatter.write_bytes(b"another task's paid image")
    with Ledger(out / "ledger.sqlite") as ledger:
        assert ledger.claim(stem, "another-task") is None
    result = run_cli("run", str(path), "--no-progress")
    assert result.returncode == 1
    assert "name_taken" in result.stderr and "another-task" in result.stderr
    by_id = {row["id"]: row for row in ledger_rows(out)}
    assert by_id[first.id]["status"] == "ok"
    assert by_id[second.id]["status"] == "failed" and by_id[second.id]["reason"] == "name_taken"
    assert by_id[second.id]["attempts"] == 0
    assert paid(server) == 1  # the refused task was never sent
    assert squatter.read_bytes() == b"another task's paid image"
    with Ledger(out / "ledger.sqlite") as ledger:  # the claim holds from run to run
        assert ledger.claim(stem, second.id) == "another-task"
        assert ledger.claim(Layout(out).task_stem(first), first.id) is None


def make_legacy(out: Path) -> list[str]:
    """Turn an output into what batcher wrote before 16-character ids: 8-character names for
    files and sidecars, in the ledger rows and sidecars too, and no claims table. Returns
    the old names of the files."""
    db = sqlite3.connect(out / "ledger.sqlite")
    names = []
    with db:
        db.execute("DROP TABLE IF EXISTS claims")
        for task_id, files in db.execute("SELECT id, files FROM tasks").fetchall():
            token = short_id(task_id)
            renamed = []
            for name, size, sha in json.loads(files):
                old = name.replace(f"-{token}", f"-{token[:8]}")
                (out / name).rename(out / old)
                renamed.append([old, size, sha])
                names.append(old)
            sidecar = out / Path(json.loads(files)[0][0]).with_suffix(".json")
            data = json.loads(sidecar.read_text())
            data["files"] = [{"path": n, "size": s, "sha256": h} for n, s, h in renamed]
            sidecar.unlink()
            Path(out / renamed[0][0]).with_suffix(".json").write_text(json.dumps(data))
            db.execute("UPDATE tasks SET files = ? WHERE id = ?", (json.dumps(renamed), task_id))
    db.close()
    return names


def one_task_manifest(server: Any, folder: Path, *, outputs: str = "",
                      prompt: str = "A teak spoon") -> Path:
    text = "name: legacy\noutput: out\n" + provider_block(server) + textwrap.dedent(f"""\
        jobs:
          - name: spoons
            type: image
            provider: test
            model: flux.1-schnell
            prompt: "{prompt}"
            seeds: 2
            params: {{size: 256x256, response_format: b64_json}}
        """)
    if outputs:
        text += f"    outputs: {outputs}\n"
    return write_manifest(folder, text)


def test_an_output_made_with_8_character_names_resumes_without_a_request(
        tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = one_task_manifest(server, tmp_path)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    old_names = make_legacy(out)
    assert all(re.search(r"-s\d-[0-9a-f]{8}\.png$", name) for name in old_names)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert paid(server) == 2
    assert run_cli("status", str(path), "--verify").returncode == 0
    # New outputs re-derive from the old files, and the sidecar that is updated is the old one.
    path = one_task_manifest(server, tmp_path, outputs="{sizes: {thumb: 32}}")
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert paid(server) == 2
    for name in old_names:
        stem = name.removesuffix(".png")
        assert (out / f"{stem}@thumb.png").is_file()
        assert "thumb" in (out / f"{stem}.json").read_text()
    assert sorted(p.name for p in out.rglob("*.json") if p.parent != out) == sorted(
        Path(name).with_suffix(".json").name for name in old_names)
    # Prune removes an old task's files with its old sidecar.
    path = one_task_manifest(server, tmp_path, prompt="A teak fork")
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    pruned = run_cli("prune", str(path))
    assert pruned.returncode == 0, pruned.stderr
    for name in old_names:
        assert not (out / name).exists()
        assert not (out / name).with_suffix(".json").exists()


def test_merge_carries_an_older_outputs_sidecars_so_a_lost_ledger_costs_nothing(
        tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = one_task_manifest(server, tmp_path)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    old_names = make_legacy(out)
    merged = tmp_path / "merged"
    done = run_cli("merge", str(out), "--output", str(merged))
    assert done.returncode == 0, done.stderr
    for name in old_names:  # the 8-character sidecar came along with its task's files
        assert (merged / name).with_suffix(".json").is_file()
    # The merged output's ledger lost: its sidecars tell what finished, nothing is sent again.
    (merged / "ledger.sqlite").unlink()
    again = run_cli("run", str(path), "--no-progress", "--output", str(merged))
    assert again.returncode == 0, again.stderr
    assert paid(server) == 2


# --------------------------------------------------------------------------- prune's guard


def test_prune_of_a_jsonl_file_without_its_provider_removes_nothing(tmp_path: Path) -> None:
    """The provider is part of an id-less line's id: without --provider every such task looks
    stale. The line with an id is kept either way, so the job is not emptied: the guard sees
    rows made with another provider than the job's."""
    lines = [{"model": "flux.1-schnell", "prompt": f"A brass key number {n}",
              "params": {"size": "256x256"}} for n in range(3)]
    lines.append({"id": "hero", "model": "flux.1-schnell", "prompt": "A brass lock"})
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ran = run_cli("run", str(tasks), "--provider", "local", "--no-progress")
    assert ran.returncode == 0, ran.stderr
    out = tmp_path / "output" / "tasks"
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    assert len(before) == 4

    for extra in ([], ["--dry-run"]):
        refused = run_cli("prune", str(tasks), *extra)
        assert refused.returncode == 2, refused.stderr
        assert "--provider local" in refused.stderr and "--force" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert len(ledger_rows(out)) == 4
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before
    same = run_cli("prune", str(tasks), "--provider", "local")
    assert same.returncode == 0 and "nothing to remove" in same.stdout
    again = run_cli("run", str(tasks), "--provider", "local", "--no-progress")
    assert again.returncode == 0
    assert json.loads((out / "summary.json").read_text())["requests"] == 0

    forced = run_cli("prune", str(tasks), "--force")
    assert forced.returncode == 0, forced.stderr
    assert [row["id"] for row in ledger_rows(out)] == ["hero"]


def grid_manifest(server: Any, folder: Path, *, size: str = "256x256",
                  output: str = "out") -> Path:
    text = f"name: guard\noutput: {output}\n" + provider_block(server) + textwrap.dedent(f"""\
        jobs:
          - name: keys
            type: image
            provider: test
            model: flux.1-schnell
            prompt: "A brass key number {{n}}"
            vars: {{n: [1, 2]}}
            params: {{size: {size}, response_format: b64_json}}
          - name: notes
            type: chat
            provider: test
            model: llama-3.1-8b-instruct
            prompt: "Describe key {{n}}"
            vars: {{n: [1, 2]}}
            params: {{max_tokens: 20}}
        """)
    return write_manifest(folder, text)


def test_a_prune_that_would_empty_a_job_is_refused_unless_forced(
        tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = grid_manifest(server, tmp_path)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.suffix in {".png", ".txt"}}
    changed = grid_manifest(server, tmp_path, size="512x512")  # every id of keys changes

    for args in (["prune", str(changed)], ["prune", str(changed), "--dry-run"],
                 ["run", str(changed), "--prune", "--no-progress"]):
        refused = run_cli(*args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert "every task of job keys" in refused.stderr and "params" in refused.stderr
    assert paid(server) == 4  # the refused run --prune sent nothing
    assert len(ledger_rows(out)) == 4
    assert {p: p.read_bytes() for p in out.rglob("*") if p.suffix in {".png", ".txt"}} == before

    forced = run_cli("prune", str(changed), "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(row["job"] for row in ledger_rows(out)) == ["notes", "notes"]
    assert not list(out.rglob("*.png"))


def test_the_store_prune_has_the_same_guard(tmp_path: Path, thread_server: Any,
                                            s3: S3Server) -> None:
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/guard"
    path = grid_manifest(server, tmp_path, output=url)
    env = store_env(s3.url, str(tmp_path / "cache"))
    assert run_cli("run", str(path), "--no-progress", env=env).returncode == 0
    keys = s3.keys(bucket, "guard/")
    changed = grid_manifest(server, tmp_path, size="512x512", output=url)

    refused = run_cli("prune", str(changed), env=env)

    assert refused.returncode == 2 and "every task of job keys" in refused.stderr
    assert s3.keys(bucket, "guard/") == keys
    forced = run_cli("prune", str(changed), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert not [key for key in s3.keys(bucket, "guard/") if key.endswith(".png")]


# --------------------------------------------------------------------------- user ids


def test_a_user_id_used_in_two_task_files_is_a_manifest_error(tmp_path: Path,
                                                              thread_server: Any) -> None:
    server = thread_server()
    (tmp_path / "a.jsonl").write_text(
        '{"id": "hero-1", "model": "flux.1-schnell", "prompt": "A red kite"}\n'
        '{"id": "hero-2", "model": "flux.1-schnell", "prompt": "A blue kite"}\n')
    (tmp_path / "b.jsonl").write_text(
        '{"id": "other", "model": "flux.1-schnell", "prompt": "A green kite"}\n'
        '{"custom_id": "hero-2", "method": "POST", "url": "/v1/images/generations", '
        '"body": {"model": "flux.1-schnell", "prompt": "A kite"}}\n')
    text = "name: ids\noutput: out\n" + provider_block(server) + textwrap.dedent("""\
        jobs:
          - name: first
            provider: test
            file: a.jsonl
          - name: second
            provider: test
            file: b.jsonl
        """)
    path = write_manifest(tmp_path, text)
    for command in ("validate", "run", "plan"):
        result = run_cli(command, str(path), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().endswith(
            "b.jsonl:2: custom_id: 'hero-2' is already the id of "
            f"{tmp_path / 'a.jsonl'}:2"), result.stderr
    assert paid(server) == 0 and not (tmp_path / "out").exists()
    # The same file in two jobs is the same ids twice.
    (tmp_path / "b.jsonl").write_text((tmp_path / "a.jsonl").read_text())
    twice = run_cli("validate", str(path))
    assert twice.returncode == 2 and "b.jsonl:1: id: 'hero-1' is already the id of" in \
        twice.stderr
    # Distinct ids across files are fine, and each is its own task.
    (tmp_path / "b.jsonl").write_text(
        '{"id": "hero-3", "model": "flux.1-schnell", "prompt": "A red kite"}\n')
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert sorted(row["id"] for row in ledger_rows(tmp_path / "out")) == [
        "hero-1", "hero-2", "hero-3"]
    assert run_cli("status", str(path)).returncode == 0


def test_user_ids_that_only_share_a_digest_are_not_one(tmp_path: Path,
                                                       monkeypatch: Any) -> None:
    """The digest only says where to look: the files are read again before an error."""
    import hashlib as real

    from batcher.manifest import jsonl

    class OneDigest:
        @staticmethod
        def blake2b(data: bytes, digest_size: int) -> Any:
            return real.blake2b(b"same", digest_size=digest_size)

    monkeypatch.setattr(jsonl, "hashlib", OneDigest)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "a", "model": "m", "prompt": "p"}\n'
                     '{"id": "b", "model": "m", "prompt": "q"}\n'
                     '{"id": "a", "model": "m", "prompt": "r"}\n')
    ids = jsonl.UserIds()
    found = list(jsonl.iter_jsonl(tasks))
    ids.add(tasks, found[0])
    ids.add(tasks, found[1])
    try:
        ids.add(tasks, found[2])
    except jsonl.ManifestError as exc:
        assert "'a' is already the id of line 1" in str(exc)
    else:
        raise AssertionError("a repeated id passed")


# --------------------------------------------------------------------------- vars files


def vars_manifest(folder: Path, vars_file: str) -> Path:
    return write_manifest(folder, textwrap.dedent(f"""\
        name: spoons
        jobs:
          - name: spoons
            type: image
            provider: local
            model: flux.1-schnell
            vars_file: {vars_file}
            prompt: "a {{finish}} {{name}}"
        """))


def validate_line(folder: Path, path: Path) -> tuple[int, str]:
    result = run_cli("validate", path.name, cwd=folder)
    assert "Traceback" not in result.stderr
    return result.returncode, result.stderr.strip()


def test_an_empty_cell_a_prompt_uses_is_a_manifest_error(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text(
        "name,finish,note\nTeak Spoon,oiled,\nTeak Spoon, ,x\n")  # the empty note is unused
    code, line = validate_line(tmp_path, vars_manifest(tmp_path, "rows.csv"))
    assert code == 2
    assert line == ("batcher: rows.csv:3: finish: no value for {finish}, which the job's "
                    "prompts, system or images use")
    (tmp_path / "rows.jsonl").write_text('{"name": "Teak Spoon", "finish": "oiled"}\n'
                                         '{"name": "", "finish": "waxed"}\n')
    code, line = validate_line(tmp_path, vars_manifest(tmp_path, "rows.jsonl"))
    assert code == 2 and line.startswith("batcher: rows.jsonl:2: name: no value for {name}")
    (tmp_path / "rows.csv").write_text("name,finish,note\nTeak Spoon,oiled,\n")
    assert validate_line(tmp_path, vars_manifest(tmp_path, "rows.csv"))[0] == 0


def test_a_byte_that_is_not_utf8_is_reported_on_its_own_line(tmp_path: Path) -> None:
    rows = [f"Spoon {n},oiled\n".encode() for n in range(1, 5000)]
    rows[2999] = b"Spoon \xff,oiled\n"  # line 3001: the header is line 1
    (tmp_path / "rows.csv").write_bytes(b"name,finish\n" + b"".join(rows))
    code, line = validate_line(tmp_path, vars_manifest(tmp_path, "rows.csv"))
    assert code == 2 and line.startswith("batcher: rows.csv:3001: not UTF-8 text"), line
    (tmp_path / "rows.jsonl").write_bytes(b"".join(
        b'{"name": "a%d", "finish": "b"}\n' % n for n in range(40)) +
        b'{"name": "\xc3(", "finish": "b"}\n')
    code, line = validate_line(tmp_path, vars_manifest(tmp_path, "rows.jsonl"))
    assert code == 2 and line.startswith("batcher: rows.jsonl:41: not UTF-8 text"), line
    (tmp_path / "rows.yaml").write_bytes(b'- {name: a, finish: b}\n- {name: "\xff", '
                                         b'finish: c}\n')
    code, line = validate_line(tmp_path, vars_manifest(tmp_path, "rows.yaml"))
    assert code == 2 and line.startswith("batcher: rows.yaml:2: not UTF-8 text"), line
    # A byte-order mark and quoted fields across lines still read as before.
    (tmp_path / "rows.csv").write_bytes(
        b'\xef\xbb\xbfname,finish\r\n"Teak\nSpoon",oiled\r\nOak Spoon,waxed\r\n')
    assert validate_line(tmp_path, vars_manifest(tmp_path, "rows.csv"))[0] == 0


# --------------------------------------------------------------------------- pixel cap


def huge_png(width: int, height: int) -> bytes:
    """A grey PNG of ``width`` x ``height`` whose pixels are all 0: a few hundred KB on the
    wire, gigabytes once decoded and resized."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # the filter byte, then one byte a pixel
    compressed = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed)
            + chunk(b"IEND", b""))


def scripted_manifest(server: ScriptedServer, folder: Path, outputs: str) -> Path:
    text = textwrap.dedent(f"""\
        name: pixels
        output: out
        providers:
          scripted:
            base_url: {server.api_url}
            retries: 0
        jobs:
          - name: pics
            type: image
            provider: scripted
            model: flux.1-schnell
            prompts: [huge, small]
            params: {{size: 256x256, response_format: b64_json}}
            outputs: {outputs}
        """)
    return write_manifest(folder, text)


def test_a_small_file_of_huge_dimensions_is_kept_but_not_decoded(tmp_path: Path) -> None:
    png = huge_png(12_500, 12_500)
    assert len(png) < 500_000
    server = ScriptedServer().start()
    try:
        server.replies["huge"] = json_reply(
            {"created": 1, "data": [{"b64_json": base64.b64encode(png).decode()}]})
        server.replies["small"] = good_image()
        path = scripted_manifest(server, tmp_path, "{sizes: {thumb: 64}}")
        result = run_cli("run", str(path), "--no-progress")
        assert result.returncode == 0, result.stderr
        assert "DecompressionBomb" not in result.stderr and "Traceback" not in result.stderr
        assert "too_many_pixels" in result.stderr  # batcher's own warning, named
        rows = {row["prompt"]: row for row in ledger_rows(tmp_path / "out", decode=True)}
        huge, small = rows["huge"], rows["small"]
        assert huge["status"] == "ok" and small["status"] == "ok"
        kept = tmp_path / "out" / huge["files"][0][0]
        assert kept.read_bytes() == png  # the paid file, as delivered
        derived = json.loads(huge["derived"])
        assert "too_many_pixels" in derived["error"] and "12500 x 12500" in derived["error"]
        assert derived["files"] == []
        assert [e["role"] for e in json.loads(small["derived"])["files"]] == ["size:thumb"]
        again = run_cli("run", str(path), "--no-progress")
        assert again.returncode == 0 and "DecompressionBomb" not in again.stderr
        assert dict(server.requests) == {"huge": 1, "small": 1}
    finally:
        server.stop()


def test_max_pixels_is_set_under_outputs(tmp_path: Path) -> None:
    server = ScriptedServer().start()
    try:
        server.default = good_image()  # 32 x 32 = 1024 px
        path = scripted_manifest(server, tmp_path, "{sizes: {thumb: 16}, max_pixels: 1000}")
        assert run_cli("run", str(path), "--no-progress").returncode == 0
        rows = ledger_rows(tmp_path / "out", decode=True)
        assert all("too_many_pixels" in json.loads(row["derived"])["error"] for row in rows)
        # A higher cap makes them from the kept images, with no request.
        path = scripted_manifest(server, tmp_path, "{sizes: {thumb: 16}, max_pixels: 1024}")
        assert run_cli("run", str(path), "--no-progress").returncode == 0
        rows = ledger_rows(tmp_path / "out", decode=True)
        assert all("error" not in json.loads(row["derived"]) for row in rows)
        assert all((tmp_path / "out" / json.loads(row["derived"])["files"][0]["path"]).is_file()
                   for row in rows)
        assert dict(server.requests) == {"huge": 1, "small": 1}
        path = scripted_manifest(server, tmp_path, "{sizes: {thumb: 16}, max_pixels: 0}")
        bad = run_cli("validate", str(path))
        assert bad.returncode == 2 and "outputs.max_pixels" in bad.stderr
    finally:
        server.stop()


# --------------------------------------------------------------------------- command line


def run_into_closed_pipe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a stdout whose reader has gone (as after ``| head -1``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "batcher", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=cwd)
    finally:
        os.close(write_end)


def test_a_closed_stdout_ends_any_command_quietly_with_141(tmp_path: Path,
                                                          thread_server: Any) -> None:
    server = thread_server()
    path = grid_manifest(server, tmp_path)
    assert run_cli("run", str(path), "--no-progress", "--limit", "1").returncode == 0
    assert run_cli("status", str(path)).returncode == 1  # pending tasks: 1, as documented
    for args in (["status", str(path)], ["status", "out", "--json"], ["plan", str(path)],
                 ["validate", str(path)]):
        result = run_into_closed_pipe(*args, cwd=tmp_path)
        assert result.returncode == 141, (args, result.returncode, result.stderr)
        assert result.stderr == "", (args, result.stderr)
    for args in (["--help"], ["--version"], ["status", "--help"]):  # argparse's own: 0
        result = run_into_closed_pipe(*args, cwd=tmp_path)
        assert result.returncode in (0, 141) and result.stderr == "", (args, result)
    assert paid(server) == 1


def test_budget_none_switches_off_the_manifests_budget(tmp_path: Path,
                                                       thread_server: Any) -> None:
    server = thread_server()
    text = grid_manifest(server, tmp_path).read_text().replace(
        "name: guard\n", "name: guard\nbudget: 0.05\n")
    path = write_manifest(tmp_path, text)  # no prices: a budget cannot be kept
    refused = run_cli("run", str(path), "--no-progress")
    assert refused.returncode == 2 and "budget" in refused.stderr and paid(server) == 0
    plan = run_cli("plan", str(path))
    assert plan.returncode == 0 and "budget: $0.05" in plan.stdout
    plan = run_cli("plan", str(path), "--budget", "none")
    assert plan.returncode == 0 and "budget" not in plan.stdout
    ran = run_cli("run", str(path), "--no-progress", "--budget", "None")
    assert ran.returncode == 0, ran.stderr
    assert paid(server) == 4
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["budget_usd"] is None
    bad = run_cli("run", str(path), "--budget", "nothing")
    assert bad.returncode == 2 and "--budget" in bad.stderr


def test_a_store_adopts_an_older_runs_sidecars_without_a_request(
        tmp_path: Path, thread_server: Any, s3: S3Server) -> None:
    """An older batcher's run into a store died before it published its ledger: its files and
    8-character sidecars are there; a fresh machine adopts them instead of paying again."""
    server = thread_server()
    path = one_task_manifest(server, tmp_path)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    old_names = make_legacy(out)
    bucket = s3.bucket()
    for name in old_names:
        for file in (out / name, (out / name).with_suffix(".json")):
            s3.put(bucket, f"old/{file.relative_to(out)}", file.read_bytes())
    url = f"s3://{bucket}/old"
    text = path.read_text().replace("output: out", f"output: {url}")
    path = write_manifest(tmp_path, text)
    result = run_cli("run", str(path), "--no-progress",
                     env=store_env(s3.url, str(tmp_path / "fresh")))
    assert result.returncode == 0, result.stderr
    assert "adopted 2 finished tasks" in result.stderr
    assert paid(server) == 2  # the first run's two, none again
    assert run_cli("status", url, env=store_env(s3.url, str(tmp_path / "c2"))).returncode == 0
