"""Input images: one parser for the manifest, JSONL files, expansion and request bodies.

YAML and JSONL accept and refuse the same references; a local file becomes a data URI whose
MIME type comes from its bytes; a local image over the provider's ``max_input_bytes`` is a
manifest error (file:line:field, exit 2) before anything is sent.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ledger_rows, run_cli, write_manifest
from scripted import GOOD_PNG, ScriptedServer, good_image

from batcher.errors import ManifestError
from batcher.manifest import load_manifest
from batcher.manifest.tasks import expand

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 60
DATA_URI = "data:image/png;base64," + base64.b64encode(GOOD_PNG).decode()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    server.default = good_image()
    yield server
    server.stop()


def provider(server: ScriptedServer, extra: str = "") -> str:
    return (f"providers:\n  test:\n    base_url: {server.api_url}\n    retries: 0\n"
            + "".join(f"    {line}\n" for line in extra.splitlines()))


def yaml_job(server: ScriptedServer, images: list[str], extra: str = "") -> str:
    return (f"name: refs\noutput: out\n{provider(server, extra)}jobs:\n"
            "  - name: edit\n    type: image\n    provider: test\n    model: m\n"
            f"    prompt: p\n    images: {json.dumps(images)}\n")


def jsonl_job(tmp_path: Path, server: ScriptedServer, images: list[str], extra: str = "") -> Path:
    lines = [{"id": "first", "model": "m", "prompt": "p"},
             {"id": "second", "model": "m", "prompt": "p", "images": images}]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return write_manifest(tmp_path, f"name: refs\noutput: out\n{provider(server, extra)}"
                                    "jobs:\n  - {name: bulk, provider: test, file: tasks.jsonl}\n")


def load_error(path: Path) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return caught.value


ACCEPTED = [["a.png"], ["photo.png"], [DATA_URI], ["https://example.com/b.jpg"]]
REFUSED = [
    (["file:///etc/passwd"], "only local files"),
    (["ftp://example.com/a.png"], "only local files"),
    (["missing.png"], "no such file"),
    (["notes.png"], "not an image"),
    (["data:image/png;base64,!!!"], "not valid base64"),
    (["data:image/png," + "x" * 8], "base64"),
    (["data:image/png;base64," + base64.b64encode(b"hello").decode()], "not hold an image"),
    (["http://[bad/x.png"], "cannot be parsed"),
    ([f"http://{'a' * 70}.example/x.png"], "cannot be parsed"),
    (["https:///x.png"], "host"),
    ([5], "file path, an http(s) URL or a data URI"),
]


def files(folder: Path) -> None:
    (folder / "a.png").write_bytes(GOOD_PNG)
    (folder / "photo.png").write_bytes(JPEG)  # a JPEG with the wrong name
    (folder / "notes.png").write_bytes(b"just some text")


@pytest.mark.parametrize("images", ACCEPTED)
def test_yaml_and_jsonl_accept_the_same_references(
    tmp_path: Path, scripted: ScriptedServer, images: list[str]
) -> None:
    files(tmp_path)
    from_yaml = write_manifest(tmp_path, yaml_job(scripted, images), name="grid.yaml")
    from_jsonl = jsonl_job(tmp_path, scripted, images)

    grid = [task.images for task in expand(load_manifest(from_yaml))]
    listed = [task.images for task in expand(load_manifest(from_jsonl))]

    assert grid == [tuple(images)] and listed == [(), tuple(images)]


@pytest.mark.parametrize(("images", "message"), REFUSED)
def test_yaml_and_jsonl_refuse_the_same_references_naming_line_and_field(
    tmp_path: Path, scripted: ScriptedServer, images: list[object], message: str
) -> None:
    files(tmp_path)
    from_yaml = write_manifest(tmp_path, yaml_job(scripted, images), name="grid.yaml")
    from_jsonl = jsonl_job(tmp_path, scripted, images)  # type: ignore[arg-type]

    grid, listed = load_error(from_yaml), load_error(from_jsonl)

    assert (Path(grid.file).name, grid.line, grid.field) == ("grid.yaml", 13, "jobs[0].images[0]")
    assert (Path(listed.file).name, listed.line, listed.field) == ("tasks.jsonl", 2, "images[0]")
    assert message in grid.reason and message in listed.reason, (grid.reason, listed.reason)


def test_a_local_image_is_sent_as_a_data_uri_typed_by_its_bytes(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    files(tmp_path)
    path = write_manifest(tmp_path, yaml_job(scripted, ["photo.png", "a.png", DATA_URI]))

    done = run_cli("run", str(path), "--no-progress")

    assert done.returncode == 0, done.stderr
    [body] = scripted.bodies
    assert body["images"] == [
        "data:image/jpeg;base64," + base64.b64encode(JPEG).decode(),
        "data:image/png;base64," + base64.b64encode(GOOD_PNG).decode(),
        DATA_URI,
    ]
    [row] = ledger_rows(tmp_path / "out")
    assert row["status"] == "ok"


@pytest.mark.parametrize("form", ["yaml", "jsonl"])
def test_an_input_over_max_input_bytes_is_a_manifest_error_and_nothing_is_sent(
    tmp_path: Path, scripted: ScriptedServer, form: str
) -> None:
    (tmp_path / "big.png").write_bytes(GOOD_PNG + b"\x00" * 200)
    extra = f"max_input_bytes: {len(GOOD_PNG) + 100}"
    path = (write_manifest(tmp_path, yaml_job(scripted, ["big.png"], extra)) if form == "yaml"
            else jsonl_job(tmp_path, scripted, ["big.png"], extra))

    done = run_cli("run", str(path), "--no-progress")

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    where = ("jobs.yaml:14: jobs[0].images[0]" if form == "yaml"
             else "tasks.jsonl:2: images[0]")
    assert where in done.stderr and "max_input_bytes" in done.stderr, done.stderr
    assert scripted.bodies == []


def test_max_input_bytes_defaults_to_20_mb(tmp_path: Path, scripted: ScriptedServer) -> None:
    limit = 20 * 1024 * 1024
    for name, size in (("fits.png", limit), ("over.png", limit + 1)):
        with (tmp_path / name).open("wb") as handle:  # sparse: cheap to write
            handle.write(GOOD_PNG[:16])
            handle.truncate(size)

    assert load_manifest(write_manifest(tmp_path, yaml_job(scripted, ["fits.png"])))
    error = load_error(write_manifest(tmp_path, yaml_job(scripted, ["over.png"])))
    assert error.field == "jobs[0].images[0]" and str(limit) in error.reason
