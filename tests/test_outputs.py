"""Asset outputs end to end against the built-in server on 127.0.0.1: vars files, input images
filled in per row, derived files (formats, sizes, metadata), re-deriving with no request when
``outputs`` change, and the manifest errors of both."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ledger_rows, provider_block, run_cli, start_cli, write_manifest
from PIL import Image
from s3server import s3, store_env

__all__ = ["s3"]  # a fixture, used by name

from batcher.imagegen import render_png
from batcher.manifest import load_manifest
from batcher.run import Outcome, RunOptions, run
from batcher.server import ImageRequest

IMAGES = "/images/generations"
EDIT_MODEL = "black-forest-labs/flux-kontext-max/multi"
MAGIC = {
    "png": lambda d: d.startswith(b"\x89PNG\r\n\x1a\n"),
    "webp": lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP",
    "jpeg": lambda d: d.startswith(b"\xff\xd8\xff"),
    "avif": lambda d: d[4:12] in (b"ftypavif", b"ftypavis"),
}
EXT = {"png": "png", "webp": "webp", "jpeg": "jpg", "avif": "avif"}
PIL_NAME = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG", "avif": "AVIF"}


async def run_manifest(path: Path) -> Outcome:
    return await run(load_manifest(path), RunOptions(progress=False, handle_signals=False))


def generations(server: Any) -> list[Any]:
    return [r for r in server.stats.requests
            if r.listener == "api" and r.method == "POST" and r.path.endswith(IMAGES)]


def manifest(server: Any, job: str, *, extra_top: str = "") -> str:
    return ("name: assets\noutput: out\n" + provider_block(server) + extra_top + "jobs:\n"
            + job)


def grid_job(outputs: str, *, seeds: int = 2, size: str = "256x256") -> str:
    return (
        "  - name: heroes\n    type: image\n    provider: test\n    model: flux.1-schnell\n"
        '    prompts: ["A glass teapot, {style}"]\n    vars: {style: [studio, ünïcode ✓]}\n'
        f"    seeds: {seeds}\n    params: {{size: {size}, response_format: b64_json}}\n"
        f"    outputs: {outputs}\n"
    )


def derived_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(row["derived"])["files"] if row["derived"] else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- formats and sizes


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg", "avif"])
async def test_each_format_with_sizes_and_metadata_reads_back(
    tmp_path: Path, server_factory: Any, fmt: str
) -> None:
    server = await server_factory()
    outputs = f"{{format: {fmt}, quality: 70, sizes: {{thumb: 64, card: 128}}, metadata: true}}"
    path = write_manifest(tmp_path, manifest(server, grid_job(outputs)))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0
    out = tmp_path / "out"
    rows = ledger_rows(out)
    assert len(rows) == 4
    for row in rows:
        [(original, size, digest)] = json.loads(row["files"])
        # The image as delivered is kept byte for byte: what the server rendered.
        prompt = row["prompt"]
        request = ImageRequest("flux.1-schnell", prompt, 1, 256, 256, "b64_json", row["seed"], ())
        assert (out / original).read_bytes() == render_png(request.key(0), 256, 256)
        stem = original.rsplit(".", 1)[0]
        full_name = f"{stem}.{EXT[fmt]}" if fmt != "png" else f"{stem}@full.png"
        expected = {full_name: 256, f"{stem}@thumb.{EXT[fmt]}": 64,
                    f"{stem}@card.{EXT[fmt]}": 128}
        entries = derived_of(row)
        assert {e["path"] for e in entries} == set(expected)
        for entry in entries:
            file = out / entry["path"]
            data = file.read_bytes()
            assert entry["size"] == len(data) and entry["sha256"] == sha256(file)
            assert MAGIC[fmt](data), entry["path"]
            with Image.open(file) as image:
                assert image.format == PIL_NAME[fmt]
                assert max(image.size) == expected[entry["path"]]
                image.load()
                if fmt == "png":
                    text = image.text  # type: ignore[attr-defined]
                    assert text["prompt"] == prompt and text["task_id"] == row["id"]
                    assert text["model"] == "flux.1-schnell" and text["seed"] == str(row["seed"])
                    assert text["provider"] == "test" and "batcher_version" in text
                else:
                    xmp = image.info["xmp"]
                    xmp = xmp if isinstance(xmp, bytes) else xmp.encode()
                    for value in (row["id"], "flux.1-schnell", "batcher:provider=\"test\""):
                        assert value.encode() in xmp
                    assert prompt.encode() in xmp  # ünïcode ✓ as UTF-8, not mangled
        # The sidecar carries the derived files, so a store run on a new machine adopts them.
        sidecar = json.loads((out / f"{stem}.json").read_text())
        assert sidecar["derived"]["files"] == entries
    assert not [p for p in out.rglob(".tmp-*")]
    html = (out / "index.html").read_text()
    assert "@thumb." in html and full_name.split("/")[-1] in html


async def test_without_a_format_sizes_keep_the_delivered_format_and_never_enlarge(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = write_manifest(tmp_path, manifest(server, grid_job(
        "{sizes: {small: 100, huge: 4096}}", seeds=1)))

    assert (await run_manifest(path)).exit_code == 0

    out = tmp_path / "out"
    for row in ledger_rows(out):
        entries = {e["role"]: e for e in derived_of(row)}
        assert set(entries) == {"size:small", "size:huge"}
        with Image.open(out / entries["size:small"]["path"]) as image:
            assert image.format == "PNG" and image.size == (100, 100)
            assert not image.text  # type: ignore[attr-defined]  # metadata is off
        with Image.open(out / entries["size:huge"]["path"]) as image:
            assert image.size == (256, 256)


# --------------------------------------------------------------------------- re-deriving


async def test_changing_outputs_rederives_with_no_request_and_drops_removed_sizes(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    first = "{format: webp, sizes: {thumb: 64, card: 128}}"
    path = write_manifest(tmp_path, manifest(server, grid_job(first)))
    assert (await run_manifest(path)).exit_code == 0
    out = tmp_path / "out"
    sent = len(generations(server))
    assert sent == 4
    cards = sorted(out.rglob("*@card.webp"))
    assert len(cards) == 4
    originals = {p: sha256(p) for p in out.rglob("*.png")}

    # Same outputs again: nothing to do, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.webp")}
    assert (await run_manifest(path)).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.webp")} == before

    # card removed, a format change, a new size: made again from the kept images, no request.
    write_manifest(tmp_path, manifest(server, grid_job("{format: avif, sizes: {thumb: 32}}")))
    outcome = await run_manifest(path)

    assert outcome.exit_code == 0
    assert len(generations(server)) == sent
    assert outcome.summary["ran"] == 0
    assert not list(out.rglob("*@card.*")) and not list(out.rglob("*.webp"))
    assert len(list(out.rglob("*@thumb.avif"))) == 4
    assert {p: sha256(p) for p in out.rglob("*.png")} == originals
    for row in ledger_rows(out):
        assert row["attempts"] == 1
        for entry in derived_of(row):
            assert sha256(out / entry["path"]) == entry["sha256"]
            assert entry["path"].endswith((".avif", "@thumb.avif"))

    # A derived file deleted by hand comes back, still with no request.
    victim = sorted(out.rglob("*@thumb.avif"))[0]
    victim.unlink()
    assert (await run_manifest(path)).exit_code == 0
    assert victim.is_file() and len(generations(server)) == sent

    # outputs removed altogether: the derived files go, the delivered images stay.
    write_manifest(tmp_path, manifest(server, grid_job("{}").replace("    outputs: {}\n", "")))
    assert (await run_manifest(path)).exit_code == 0
    assert not list(out.rglob("*.avif")) and len(generations(server)) == sent
    assert {p: sha256(p) for p in out.rglob("*.png")} == originals


def test_status_verify_checks_derived_files(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = write_manifest(tmp_path, manifest(server, grid_job("{format: webp}", seeds=1)))
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert run_cli("status", str(path), "--verify").returncode == 0

    webp = sorted((tmp_path / "out").rglob("*.webp"))[0]
    webp.write_bytes(webp.read_bytes()[:-10] + b"0123456789")
    result = run_cli("status", str(path), "--verify")
    assert result.returncode == 1
    assert f"{webp.relative_to(tmp_path / 'out').as_posix()} is changed" in result.stdout


# --------------------------------------------------------------------------- vars files


def _write_refs(folder: Path, skus: list[str]) -> dict[str, str]:
    refs = folder / "refs"
    refs.mkdir()
    digests = {}
    for sku in skus:
        data = render_png(f"product {sku}", 48, 48)
        (refs / f"{sku}.png").write_bytes(data)
        digests[sku] = hashlib.sha256(data).hexdigest()
    return digests


async def test_csv_rows_send_each_rows_input_image_and_sheet_shows_inputs(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    skus = ["A-100", "B-200", "C-300"]
    digests = _write_refs(tmp_path, skus)
    (tmp_path / "products.csv").write_text(
        "sku,name\n" + "".join(f'{s},"The {s}, boxed"\n' for s in skus))
    job = (
        "  - name: catalogue\n    type: image\n    provider: test\n"
        f"    model: {EDIT_MODEL}\n    vars_file: products.csv\n"
        '    prompt: "Product photo of {name} on white"\n    images: ["refs/{sku}.png"]\n'
        "    seeds: 1\n    params: {size: 256x256, response_format: b64_json}\n"
        "    outputs: {format: webp, sizes: {thumb: 64}, metadata: true}\n"
    )
    path = write_manifest(tmp_path, manifest(server, job))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0
    posts = generations(server)
    assert len(posts) == 3 and len({p.body_hash for p in posts}) == 3
    out = tmp_path / "out"
    rows = ledger_rows(out)
    assert sorted(json.loads(r["vars"])["sku"] for r in rows) == skus
    for row in rows:
        sku = json.loads(row["vars"])["sku"]
        assert row["prompt"] == f"Product photo of The {sku}, boxed on white"
        # The server renders from the sha256 of the images it decoded: equal bytes prove that
        # this row's own input image arrived.
        request = ImageRequest(EDIT_MODEL, row["prompt"], 1, 256, 256, "b64_json", 0,
                               (digests[sku],))
        [(original, _, _)] = json.loads(row["files"])
        assert (out / original).read_bytes() == render_png(request.key(0), 256, 256)
        inputs = [e for e in derived_of(row) if e["role"] == "input"]
        assert [e["of"] for e in inputs] == [digests[sku]]
        with Image.open(out / inputs[0]["path"]) as image:
            assert image.format == "WEBP"
    html = (out / "index.html").read_text()
    for row in rows:
        for entry in derived_of(row):
            assert entry["path"] in html

    # The task id holds the input image's sha256: a changed picture is a new task.
    (tmp_path / "refs" / "B-200.png").write_bytes(render_png("another B", 48, 48))
    assert (await run_manifest(path)).exit_code == 0
    assert len(generations(server)) == 4


@pytest.mark.parametrize("kind", ["jsonl", "yaml"])
async def test_jsonl_and_yaml_rows_combine_with_vars_as_a_product(
    tmp_path: Path, server_factory: Any, kind: str
) -> None:
    server = await server_factory()
    rows = [{"animal": "fox", "n": 1}, {"animal": "owl", "n": 2}]
    if kind == "jsonl":
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (tmp_path / "rows.yaml").write_text("".join(
            f"- animal: {r['animal']}\n  n: {r['n']}\n" for r in rows))
    job = (
        "  - name: zoo\n    type: chat\n    provider: test\n    model: llama-3.1-8b-instruct\n"
        f"    vars_file: rows.{kind}\n    vars: {{tone: [calm, loud]}}\n"
        "    system: You describe {animal}s.\n"
        '    prompt: "{n} {animal} in a {tone} voice"\n'
    )
    path = write_manifest(tmp_path, manifest(server, job))

    assert (await run_manifest(path)).exit_code == 0

    prompts = sorted(r["prompt"] for r in ledger_rows(tmp_path / "out"))
    assert prompts == ["1 fox in a calm voice", "1 fox in a loud voice",
                       "2 owl in a calm voice", "2 owl in a loud voice"]


# --------------------------------------------------------------------------- manifest errors


BAD_ROWS = [
    ("rows.csv", "sku,name\nA1,mug\nB2\n", "rows.csv:3: 1 fields where the header has 2"),
    ("rows.csv", "sku\nA1\n", "rows.csv:2: name: no value for {name}"),
    ("rows.csv", "", "rows.csv: empty file"),
    ("rows.csv", "sku,name\n", "rows.csv: empty file"),
    ("rows.csv", "sku,name\nA1,mug\nA1,mug\n", "rows.csv:3: repeats an earlier row's values"),
    ("rows.jsonl", '{"sku": "A1", "name": "x"}\n{"sku": "A2"\n', "rows.jsonl:2: not valid JSON"),
    ("rows.jsonl", '{"sku": "A1", "name": "x"}\n\n[1, 2]\n', "rows.jsonl:3: each row must be"),
    ("rows.jsonl", '{"sku": "A1", "name": null}\n', "rows.jsonl:1: name: values must be"),
    ("rows.yaml", "- {sku: A1, name: x}\n- just text\n", "rows.yaml: row 2: each row must be"),
    ("rows.yaml", "- {sku: A1, name: x}\n-  sku: A2\n   nam: y\n",
     "rows.yaml:2: name: no value for {name}"),
    ("rows.csv", "sku,name,tone\nA1,x,y\n", "rows.csv:2: tone: is also a var under vars"),
    ("rows.jsonl", '{"sku": "A1", "name": "\\ud800"}\n',
     "rows.jsonl:1: name: holds a character that is not valid Unicode"),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD_ROWS)
def test_bad_vars_file_rows_are_manifest_errors_naming_file_line_and_field(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    (tmp_path / name).write_text(text)
    _write_refs(tmp_path, ["A1"])
    path = write_manifest(tmp_path, (
        "name: t\njobs:\n  - name: j\n    type: image\n    provider: local\n"
        f"    model: flux.1-schnell\n    vars_file: {name}\n    vars: {{tone: [a]}}\n"
        '    prompt: "{name} {tone}"\n'
    ))
    result = run_cli("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert str(tmp_path / expected.split(":")[0]) in result.stderr or expected.split(":")[0] in \
        result.stderr
    assert expected.split(":", 1)[1].strip().split(":")[0] in result.stderr, result.stderr
    assert expected in result.stderr.replace(f"{tmp_path}/", ""), result.stderr
    assert "Traceback" not in result.stderr


def test_a_rows_missing_input_image_names_the_row(tmp_path: Path) -> None:
    _write_refs(tmp_path, ["A1"])
    (tmp_path / "rows.csv").write_text("sku\nA1\nZ9\n")
    path = write_manifest(tmp_path, (
        "name: t\njobs:\n  - name: j\n    type: image\n    provider: local\n"
        f"    model: {EDIT_MODEL}\n    vars_file: rows.csv\n    prompt: a box\n"
        '    images: ["refs/{sku}.png"]\n'
    ))
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert "rows.csv:3: jobs[0].images[0]: refs/Z9.png: no such file" in result.stderr


def test_rows_whose_input_images_have_the_same_bytes_are_the_same_tasks(
    tmp_path: Path,
) -> None:
    refs = _write_refs(tmp_path, ["A1"])
    (tmp_path / "refs" / "copy.png").write_bytes((tmp_path / "refs" / "A1.png").read_bytes())
    (tmp_path / "rows.csv").write_text("sku\nA1\ncopy\n")
    path = write_manifest(tmp_path, (
        "name: t\njobs:\n  - name: j\n    type: image\n    provider: local\n"
        f"    model: {EDIT_MODEL}\n    vars_file: rows.csv\n    prompt: a box\n"
        '    images: ["refs/{sku}.png"]\n'
    ))
    assert refs
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert "rows.csv:3: repeats an earlier row's values for sku (its input images by content)" \
        in result.stderr, result.stderr


def test_rows_are_told_apart_by_their_values_not_a_joined_string(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text('{"a": "x\\u001fy", "b": "z"}\n'
                                         '{"a": "x", "b": "y\\u001fz"}\n')
    path = write_manifest(tmp_path, (
        "name: t\njobs:\n  - name: j\n    type: image\n    provider: local\n"
        '    model: flux.1-schnell\n    vars_file: rows.jsonl\n    prompt: "{a} {b}"\n'))
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr


BAD_OUTPUTS = [
    ("{format: gif}", 8, "jobs[0].outputs.format: must be one of png, webp, jpeg, avif"),
    ("{format: webp, quality: 0}", 8, "jobs[0].outputs.quality: must be a whole number"),
    ("{format: webp, quality: true}", 8, "jobs[0].outputs.quality"),
    ("\n      sizes:\n        thumb: -5", 10, "jobs[0].outputs.sizes.thumb: the longest side"),
    ("{sizes: {Thumb/1: 64}}", 8, "jobs[0].outputs.sizes.Thumb/1: a size's name"),
    ("{metadata: 'yes'}", 8, "jobs[0].outputs.metadata: must be true or false"),
    ("{metadata: true}", 8, "jobs[0].outputs.metadata: goes into derived files"),
    ("{quality: 50}", 8, "jobs[0].outputs.quality: applies to a format or sizes"),
    ("\n      format: webp\n      colour: red", 10, "jobs[0].outputs.colour: unknown field"),
    ("[webp]", 8, "jobs[0].outputs: must be a mapping"),
    ("{format: png, sizes: {full: 64}}", 8, "jobs[0].outputs.sizes.full: 'full' names the"),
]


@pytest.mark.parametrize(("outputs", "line", "expected"), BAD_OUTPUTS)
def test_bad_outputs_fields_are_manifest_errors_with_file_line_and_field(
    tmp_path: Path, outputs: str, line: int, expected: str
) -> None:
    path = write_manifest(tmp_path, (
        "name: t\njobs:\n  - name: j\n    type: image\n    provider: local\n"
        f"    model: flux.1-schnell\n    prompt: a cat\n    outputs: {outputs}\n"
    ))
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert f"{path}:{line}: {expected}" in result.stderr, result.stderr


def test_outputs_in_defaults_are_named_there_and_skip_chat_jobs(tmp_path: Path) -> None:
    text = (
        "name: t\ndefaults:\n  provider: local\n  outputs: {format: webp, sizes: {t: 0}}\n"
        "jobs:\n  - name: j\n    type: image\n    model: flux.1-schnell\n    prompt: a cat\n"
    )
    path = write_manifest(tmp_path, text)
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert f"{path}:4: defaults.outputs.sizes.t" in result.stderr, result.stderr
    ok = text.replace("t: 0", "t: 64") + (
        "  - name: c\n    type: chat\n    model: llama-3.1-8b-instruct\n    prompt: hi\n")
    write_manifest(tmp_path, ok)
    assert run_cli("validate", str(path)).returncode == 0


# --------------------------------------------------------------------------- kill -9


def test_kill_9_never_leaves_a_partial_derived_file_under_a_final_name(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server(image_grain=True)
    text = manifest(server, grid_job("{format: webp, quality: 90, sizes: {thumb: 128, "
                                     "card: 512}, metadata: true}", seeds=12, size="1024x1024"))
    path = write_manifest(tmp_path, text)
    out = tmp_path / "out"
    proc = start_cli("run", str(path), "--no-progress")
    deadline = time.monotonic() + 60
    while len(list(out.rglob("*@card.webp"))) < 3:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # Whatever has a final name is whole: every derived file decodes to the end.
    for file in out.rglob("*.webp"):
        if not file.name.startswith(".tmp-"):
            with Image.open(file) as image:
                image.load()

    result = run_cli("run", str(path), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert not list(out.rglob(".tmp-*"))
    rows = ledger_rows(out)
    assert len(rows) == 24
    for row in rows:
        assert {e["role"] for e in derived_of(row)} == {"full", "size:thumb", "size:card"}
        for entry in derived_of(row):
            assert sha256(out / entry["path"]) == entry["sha256"]


def test_a_kill_while_deriving_never_makes_the_next_run_pay_for_the_kept_image(
    tmp_path: Path, thread_server: Any
) -> None:
    # One task at a time with slow derivations (AVIF of a grainy 1024 px image): the kill
    # lands while a task's image is saved and its derived files are being made.
    server = thread_server(image_grain=True)
    text = ("name: assets\noutput: out\n" + provider_block(server, concurrency=1) + "jobs:\n"
            + grid_job("{format: avif, quality: 90, sizes: {a: 1000, b: 900}}", seeds=3,
                       size="1024x1024"))
    path = write_manifest(tmp_path, text)
    out = tmp_path / "out"
    proc = start_cli("run", str(path), "--no-progress")
    deadline = time.monotonic() + 60

    def deriving() -> bool:  # a task is in the ledger and its derived files are not there yet
        try:
            rows = [row for row in ledger_rows(out) if row["status"] == "ok"]
        except sqlite3.Error:  # not there yet, or being created
            return False
        return any(not derived_of(row) for row in rows)

    while not deriving():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "never saw a task kept before its derived files"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {row["id"] for row in ledger_rows(out) if row["status"] == "ok"}
    sent = len(generations(server))

    result = run_cli("run", str(path), "--no-progress")

    assert result.returncode == 0, result.stderr
    # Only the tasks the ledger did not have were sent again; the kept ones were derived from
    # their saved images with no request.
    assert len(generations(server)) - sent == 6 - len(kept)
    rows = ledger_rows(out)
    assert len(rows) == 6 and all(len(derived_of(row)) == 3 for row in rows)  # full, a, b


# --------------------------------------------------------------------------- object stores


def test_derived_files_go_to_the_store_and_are_redone_there_on_a_fresh_machine(
    tmp_path: Path, thread_server: Any, s3: Any
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    text = manifest(server, grid_job("{format: webp, sizes: {thumb: 64, card: 128}}"))
    path = write_manifest(tmp_path, text.replace("output: out", f"output: s3://{bucket}/a"))
    first = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "cache-a")))
    assert first.returncode == 0, first.stderr
    keys = s3.keys(bucket, "a/")
    assert len([k for k in keys if k.endswith("@card.webp")]) == 4
    assert len([k for k in keys if k.endswith(".webp")]) == 12
    paid = len(generations(server))

    write_manifest(tmp_path, text.replace("output: out", f"output: s3://{bucket}/a")
                   .replace("card: 128", "banner: 200").replace("thumb: 64", "mini: 32"))
    again = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "cache-b")))

    assert again.returncode == 0, again.stderr
    assert len(generations(server)) == paid
    keys = s3.keys(bucket, "a/")
    assert not [k for k in keys if "@card." in k or "@thumb." in k]
    banners = [k for k in keys if k.endswith("@banner.webp")]
    assert len(banners) == 4
    with Image.open(io.BytesIO(s3.get(bucket, banners[0]))) as image:
        assert max(image.size) == 200
    assert b"@mini.webp" in s3.get(bucket, "a/index.html")  # the sheet was written again
    sidecar = json.loads(s3.get(bucket, banners[0].replace("@banner.webp", ".json")))
    assert "banner" in sidecar["derived"]["spec"]
    verify = run_cli("status", f"s3://{bucket}/a", "--verify",
                     env=store_env(s3.url, str(tmp_path / "cache-c")))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_rederiving_in_a_store_puts_only_the_new_files_and_the_sidecars(
    tmp_path: Path, thread_server: Any, s3: Any
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    text = manifest(server, grid_job("{format: webp}")).replace(
        "output: out", f"output: s3://{bucket}/a")
    path = write_manifest(tmp_path, text)
    assert run_cli("run", str(path), "--no-progress",
                   env=store_env(s3.url, str(tmp_path / "cache-a"))).returncode == 0
    originals = {key: s3.modified(bucket, key) for key in s3.keys(bucket, "a/")
                 if key.endswith(".png")}
    assert len(originals) == 4
    time.sleep(1.1)  # the store's times are whole seconds

    write_manifest(tmp_path, text.replace("{format: webp}", "{format: jpeg}"))
    again = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "cache-b")))

    assert again.returncode == 0, again.stderr
    assert {key: s3.modified(bucket, key) for key in originals} == originals  # not put again
    keys = s3.keys(bucket, "a/")
    assert len([k for k in keys if k.endswith(".jpg")]) == 4
    assert not [k for k in keys if k.endswith(".webp")]


def test_rederiving_in_a_folder_writes_the_listings_again(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    text = manifest(server, grid_job("{format: webp}"))
    path = write_manifest(tmp_path, text)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    write_manifest(tmp_path, text.replace("{format: webp}", "{format: jpeg}"))
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    for name in ("results.jsonl", "index.html"):
        listing = (tmp_path / "out" / name).read_text()
        assert ".jpg" in listing and ".webp" not in listing, name


def test_a_derived_value_batcher_did_not_write_is_ignored_not_a_traceback(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = write_manifest(tmp_path, manifest(server, grid_job("{format: webp}")))
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    odd = ["[1, 2]", '{"files": [{"path": "a.webp", "size": "abc", "sha256": "x"}]}',
           '{"files": [{"size": 3}, 7, {"path": "b.webp", "side": "big", "role": "size:x"}]}']
    with sqlite3.connect(tmp_path / "out" / "ledger.sqlite") as db:
        ids = [task_id for (task_id,) in db.execute("SELECT id FROM tasks")]
        for task_id, value in zip(ids, odd, strict=False):
            db.execute("UPDATE tasks SET derived = ? WHERE id = ?", (value, task_id))
    # Every task is ok and every file batcher wrote matches: each command succeeds.
    for command in (["status", "out", "--verify"], ["report", "out"], ["prune", str(path)]):
        done = run_cli(*command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, command
    again = run_cli("run", str(path), "--no-progress")
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr


@pytest.mark.parametrize("where", ["folder", "store"])
def test_derived_files_keep_the_tasks_attempts_and_cost(
    tmp_path: Path, thread_server: Any, s3: Any, where: str
) -> None:
    # Every body fails once (a 500) and then succeeds: two attempts, two paid estimates.
    server = thread_server(fault_rate=1.0, fault_kinds=("500",))
    output = "out" if where == "folder" else f"s3://{s3.bucket()}/a"
    text = manifest(server, grid_job("{format: webp, sizes: {thumb: 64}}"))
    text = text.replace("output: out", f"output: {output}").replace(
        "    concurrency: 4\n", "    concurrency: 4\n    prices: {'*': {image: 0.5}}\n")
    path = write_manifest(tmp_path, text)
    env = store_env(s3.url, str(tmp_path / "cache"))
    done = run_cli("run", str(path), "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    if where == "folder":
        rows = ledger_rows(tmp_path / "out", decode=True)
    else:
        copy = tmp_path / "ledger.copy"
        copy.write_bytes(s3.get(output.split("/")[2], "a/ledger.sqlite"))
        with sqlite3.connect(copy) as db:
            db.row_factory = sqlite3.Row
            rows = [dict(row) for row in db.execute("SELECT * FROM tasks")]
    assert len(rows) == 4
    for row in rows:
        assert row["attempts"] == 2 and row["cost_usd"] == 1.0, row["id"]
        assert len(derived_of(row)) == 2
    summary = json.loads((tmp_path / "out" / "summary.json").read_text()) if where == "folder" \
        else json.loads(s3.get(output.split("/")[2], "a/summary.json"))
    assert summary["ok"] == summary["ran"] == 4 and summary["cost_usd"] == 4.0


def test_merge_brings_the_derived_files_of_each_shard(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = write_manifest(tmp_path, manifest(server, grid_job("{format: webp, sizes: {t: 32}}")))
    for shard in ("1/2", "2/2"):
        result = run_cli("run", str(path), "--shard", shard, "--output", f"s{shard[0]}",
                         "--no-progress")
        assert result.returncode == 0, result.stderr
    merged = run_cli("merge", "s1", "s2", "--output", "all")
    assert merged.returncode == 0, merged.stderr
    assert len(list((tmp_path / "all").rglob("*@t.webp"))) == 4
    assert run_cli("status", "all", "--verify").returncode == 0
    again = run_cli("run", str(path), "--output", "all", "--no-progress")
    assert again.returncode == 0 and len(generations(server)) == 4


async def test_a_jsonl_file_job_takes_outputs_from_defaults(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    (tmp_path / "tasks.jsonl").write_text(
        json.dumps({"id": "pic-1", "type": "image", "model": "flux.1-schnell", "prompt": "a kite",
                    "params": {"size": "256x256", "response_format": "b64_json"}}) + "\n"
        + json.dumps({"id": "cap-1", "type": "chat", "model": "llama-3.1-8b-instruct",
                      "prompt": "hi"}) + "\n")
    path = write_manifest(tmp_path, manifest(
        server, "  - name: listed\n    file: tasks.jsonl\n",
        extra_top="defaults:\n  provider: test\n  outputs: {format: jpeg, sizes: {s: 50}}\n"))

    assert (await run_manifest(path)).exit_code == 0

    rows = {row["id"]: row for row in ledger_rows(tmp_path / "out")}
    assert {e["role"] for e in derived_of(rows["pic-1"])} == {"full", "size:s"}
    for entry in derived_of(rows["pic-1"]):
        assert MAGIC["jpeg"]((tmp_path / "out" / entry["path"]).read_bytes())
    assert derived_of(rows["cap-1"]) == []


async def test_a_ledger_naming_a_delivered_file_outside_the_output_is_never_derived_from(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = write_manifest(tmp_path, manifest(server, grid_job("{format: webp}", seeds=1)))
    assert (await run_manifest(path)).exit_code == 0
    outside = tmp_path / "outside.png"
    outside.write_bytes(render_png("outside", 64, 64))
    with sqlite3.connect(tmp_path / "out" / "ledger.sqlite") as db:
        for (task_id,) in db.execute("SELECT id FROM tasks").fetchall():
            files = [["../outside.png", outside.stat().st_size, sha256(outside)]]
            db.execute("UPDATE tasks SET files = ? WHERE id = ?", (json.dumps(files), task_id))
    write_manifest(tmp_path, manifest(server, grid_job("{format: avif}", seeds=1)))

    await run_manifest(path)

    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("outside")) == [
        "outside.png"]


async def test_a_ledger_naming_a_derived_file_outside_the_output_never_deletes_it(
    tmp_path: Path, server_factory: Any
) -> None:
    import sqlite3

    server = await server_factory()
    path = write_manifest(tmp_path, manifest(server, grid_job("{format: webp}", seeds=1)))
    assert (await run_manifest(path)).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    db = sqlite3.connect(tmp_path / "out" / "ledger.sqlite")
    with db:
        for task_id, derived in db.execute("SELECT id, derived FROM tasks").fetchall():
            value = json.loads(derived)
            value["files"].append({"path": "../victim.txt", "size": 7, "sha256": "0" * 64,
                                   "role": "full", "of": "x"})
            db.execute("UPDATE tasks SET derived = ? WHERE id = ?", (json.dumps(value), task_id))
    db.close()
    write_manifest(tmp_path, manifest(server, grid_job("{format: avif}", seeds=1)))

    assert (await run_manifest(path)).exit_code == 0
    assert victim.read_text() == "keep me"
    assert len(list((tmp_path / "out").rglob("*.avif"))) == 2
    assert not list((tmp_path / "out").rglob("*.webp"))
    assert len(generations(server)) == 2


def test_an_image_pillow_cannot_decode_fails_its_derivation_not_the_task(tmp_path: Path) -> None:
    from batcher.outputs import Outputs
    from batcher.records import FileRecord, Record
    from batcher.store.derive import derive_sync

    bad = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10
    good = render_png("fine", 64, 64)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "bad.png").write_bytes(bad)
    (tmp_path / "j" / "good.png").write_bytes(good)
    record = Record(id="t1", job="j", provider="p", kind="image", model="m", prompt="x",
                    seed=None, status="ok", attempts=1,
                    files=[FileRecord("j/bad.png", len(bad), "0"),
                           FileRecord("j/good.png", len(good), "0")])

    derived = derive_sync(tmp_path, record, Outputs("webp", None, (("t", 16),), True), [], "s")

    assert "j/bad.png" in derived["error"]
    assert sorted(e["path"] for e in derived["files"]) == ["j/good.webp", "j/good@t.webp"]
    assert not list(tmp_path.rglob("bad.webp")) and not list(tmp_path.rglob(".tmp-*"))
    assert (tmp_path / "j" / "bad.png").read_bytes() == bad


def test_the_xmp_packet_is_well_formed_whatever_the_prompt_holds() -> None:
    from xml.dom.minidom import parseString

    from batcher.store.derive import xmp_packet

    prompt = 'a <tea> & "cups"\nsecond line \x01 ünïcode ✓'
    packet = xmp_packet({"prompt": prompt, "model": "m<1>", "task_id": "t", "batcher_version": "1"})
    body = packet.split(b"?>", 1)[1].rsplit(b"<?xpacket", 1)[0]
    dom = parseString(body)
    [description] = dom.getElementsByTagName("rdf:Description")
    assert description.getAttribute("batcher:model") == "m<1>"
    [item] = dom.getElementsByTagName("rdf:li")
    assert item.firstChild is not None
    assert item.firstChild.nodeValue == prompt.replace("\x01", "")


async def test_outputs_added_to_a_run_finished_by_an_older_batcher_need_no_request(
    tmp_path: Path, server_factory: Any
) -> None:
    import sqlite3

    server = await server_factory()
    plain = manifest(server, grid_job("{}").replace("    outputs: {}\n", ""))
    path = write_manifest(tmp_path, plain)
    assert (await run_manifest(path)).exit_code == 0
    out = tmp_path / "out"
    db = sqlite3.connect(out / "ledger.sqlite")  # the ledger as a batcher before outputs wrote it
    db.execute("ALTER TABLE tasks DROP COLUMN derived")
    db.close()
    status = run_cli("status", str(path), "--verify")
    assert status.returncode == 0, status.stderr

    write_manifest(tmp_path, manifest(server, grid_job("{format: webp, sizes: {t: 32}}")))
    outcome = await run_manifest(path)

    assert outcome.exit_code == 0 and outcome.summary["ran"] == 0
    assert len(generations(server)) == 4
    rows = ledger_rows(out)
    assert all({e["role"] for e in derived_of(row)} == {"full", "size:t"} for row in rows)
