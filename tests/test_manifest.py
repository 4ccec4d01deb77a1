"""load_manifest: a valid manifest loads; a broken one names the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batcher.errors import ManifestError
from batcher.manifest import load_manifest
from batcher.manifest.jsonl import iter_jsonl
from batcher.providers.rates import Rate
from tests.conftest import write_manifest

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def load_error(path: Path) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value


def assert_points_at(error: ManifestError, file: str, line: int | None, field: str | None) -> None:
    """The message a user sees names the file, the line and the field."""
    text = str(error)
    if line is None:
        assert f"{file}:" in text, text
    else:
        assert f"{file}:{line}:" in text, text
        assert error.line == line, text
    if field is not None:
        assert field in text, text
        assert error.field is not None and field in error.field, text


# --------------------------------------------------------------------------- a valid manifest


VALID = """
name: launch-assets
providers:
  vultr:
    rate_limit: 30/min
    concurrency: 2
  studio:
    base_url: http://127.0.0.1:8000/v1/
    api_key_env: STUDIO_KEY
    rate_limit: 600/min
    concurrency: 8
    timeout: 120
defaults:
  provider: studio
jobs:
  - name: heroes
    type: image
    models: [flux.1-schnell, stable-diffusion-3.5-medium]
    prompts: ["A hedgehog eating a burger in {city}", "A {{literal}} poster of {city}"]
    vars: {city: [Amsterdam, Tokyo]}
    seeds: 3
    images: [refs/a.png, https://example.com/b.jpg]
    params: {size: 1024x1024, n: 1, response_format: b64_json}
  - name: captions
    type: chat
    provider: vultr
    model: llama-3.1-8b-instruct
    system: You write one-line captions about {city}.
    prompt: A caption for a poster of {city}
    vars: {city: [Amsterdam, Tokyo]}
    seeds: [7, 42]
    params: {max_tokens: 100, temperature: 0.7}
  - name: bulk
    file: bulk.jsonl
"""


def make_valid(tmp_path: Path) -> Path:
    folder = tmp_path / "jobs"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "a.png").write_bytes(PNG)
    (folder / "bulk.jsonl").write_text(
        json.dumps({"id": "one", "model": "flux.1-schnell", "prompt": "a cat"}) + "\n"
    )
    return write_manifest(folder, VALID)


def test_valid_manifest_loads_every_field(tmp_path: Path) -> None:
    manifest = load_manifest(make_valid(tmp_path))

    assert manifest.name == "launch-assets"
    # output defaults to output/<name>, relative to the current directory (not the manifest)
    assert manifest.output == "output/launch-assets"

    studio = manifest.providers["studio"]
    assert studio.base_url == "http://127.0.0.1:8000/v1"
    assert studio.api_key_env == "STUDIO_KEY" and studio.key_required
    assert studio.rate_limit == Rate(600, 60.0)
    assert studio.concurrency == 8 and studio.timeout == 120.0
    vultr = manifest.providers["vultr"]
    assert vultr.base_url == "https://api.vultrinference.com/v1"  # the rest of the built-in stays
    assert vultr.rate_limit == Rate(30, 60.0) and vultr.concurrency == 2
    assert "local" in manifest.providers and "openai" in manifest.providers

    heroes, captions, bulk = manifest.jobs
    assert heroes.name == "heroes" and heroes.type == "image"
    assert heroes.provider == "studio"  # from defaults
    assert heroes.models == ("flux.1-schnell", "stable-diffusion-3.5-medium")
    assert heroes.prompts[1] == "A {{literal}} poster of {city}"
    assert heroes.vars == (("city", ("Amsterdam", "Tokyo")),)
    assert heroes.seeds == (0, 1, 2)
    assert heroes.images == ("refs/a.png", "https://example.com/b.jpg")
    assert dict(heroes.params) == {"size": "1024x1024", "n": 1, "response_format": "b64_json"}

    assert captions.type == "chat" and captions.provider == "vultr"
    assert captions.models == ("llama-3.1-8b-instruct",)
    assert captions.system == "You write one-line captions about {city}."
    assert captions.seeds == (7, 42)
    assert dict(captions.params) == {"max_tokens": 100, "temperature": 0.7}

    assert bulk.file == tmp_path / "jobs" / "bulk.jsonl"  # relative to the manifest
    assert bulk.provider == "studio"


def test_seeds_omitted_means_no_seed(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - {name: a, type: image, provider: local, model: m, prompt: p}
    """)
    assert load_manifest(path).jobs[0].seeds is None


def test_output_is_kept_as_written(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        output: out/here
        jobs:
          - {name: a, type: image, provider: local, model: m, prompt: p}
    """)
    assert load_manifest(path).output == "out/here"


# --------------------------------------------------------------------------- broken manifests


def test_missing_manifest_name(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            prompt: p
    """)
    assert_points_at(load_error(path), "jobs.yaml", 1, "name")


def test_missing_job_name(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            prompt: p
          - type: image
            provider: local
            model: m
            prompt: p
    """)
    assert_points_at(load_error(path), "jobs.yaml", 8, "jobs[1].name")


def test_unknown_job_type(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            provider: local
            type: video
            model: m
            prompt: p
    """)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 5, "jobs[0].type")
    assert "video" in str(error)


@pytest.mark.parametrize("seeds", ["0", "-1", '"3"', "[1, 1]", "true", "[]", "[1, 2.5]", "[true]"])
def test_bad_seeds(tmp_path: Path, seeds: str) -> None:
    path = write_manifest(tmp_path, f"""
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            prompt: p
            seeds: {seeds}
    """)
    assert_points_at(load_error(path), "jobs.yaml", 8, "jobs[0].seeds")


def test_bad_seeds_from_defaults_point_at_defaults(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        defaults:
          provider: local
          seeds: 0
        jobs:
          - {name: a, type: image, model: m, prompt: p}
    """)
    assert_points_at(load_error(path), "jobs.yaml", 4, "seeds")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: image
           model: m
            prompt: p
    """)
    assert_points_at(load_error(path), "jobs.yaml", 5, None)


def test_unknown_provider(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: image
            model: m
            prompt: p
            provider: nowhere
    """)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 7, "jobs[0].provider")
    assert "nowhere" in str(error)


def test_job_without_provider_is_an_error(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - {name: a, type: image, model: m, prompt: p}
    """)
    assert_points_at(load_error(path), "jobs.yaml", 3, "jobs[0].provider")


def test_unfilled_placeholder(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            vars: {city: [Paris]}
            prompts: ["A poster of {city} at {time}"]
    """)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 8, "jobs[0].prompts")
    assert "{time}" in str(error)


def test_unfilled_placeholder_in_system(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: chat
            provider: local
            model: m
            prompt: hello
            system: You speak {language}.
    """)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 8, "jobs[0].system")
    assert "{language}" in str(error)


@pytest.mark.parametrize("prompt", ["{0} cats", "{city.name}", "{city!r}", "{city:>9}", "a { b",
                                    "a } b"])
def test_malformed_placeholder(tmp_path: Path, prompt: str) -> None:
    path = write_manifest(tmp_path, f"""
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            vars: {{city: [Paris]}}
            prompt: {json.dumps(prompt)}
    """)
    assert_points_at(load_error(path), "jobs.yaml", 8, "jobs[0].prompt")


def test_literal_braces_are_fine(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            prompt: "A {{literal}} sign, {{ and }} too"
    """)
    assert load_manifest(path).jobs[0].prompts == ("A {{literal}} sign, {{ and }} too",)


def test_python_tag_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write_manifest(tmp_path, f"""
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            prompt: !!python/object/apply:os.system ["touch {marker}"]
    """)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 7, None)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("""
         name: demo
         jobs:
           - name: a
             type: image
             provider: local
             model: m
             promtps: [p]
         """, 7, "jobs[0].promtps"),
        ("""
         name: demo
         outptu: somewhere
         jobs:
           - {name: a, type: image, provider: local, model: m, prompt: p}
         """, 2, "outptu"),
        ("""
         name: demo
         defaults:
           provder: local
         jobs:
           - {name: a, type: image, provider: local, model: m, prompt: p}
         """, 3, "provder"),
        ("""
         name: demo
         providers:
           studio:
             base_url: http://127.0.0.1:1/v1
             rate_limt: 5/s
         jobs:
           - {name: a, type: image, provider: studio, model: m, prompt: p}
         """, 5, "rate_limt"),
    ],
    ids=["job", "top", "defaults", "provider"],
)
def test_unknown_field(tmp_path: Path, text: str, line: int, field: str) -> None:
    path = write_manifest(tmp_path, text)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", line, field)
    assert "unknown field" in str(error)


def test_duplicate_job_names(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: same
            type: image
            provider: local
            model: m
            prompt: p
          - type: chat
            name: same
            provider: local
            model: m
            prompt: p
    """)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 9, "jobs[1].name")
    assert "same" in str(error)


def test_duplicate_keys(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: first
            prompt: p
            model: second
    """)
    assert_points_at(load_error(path), "jobs.yaml", 8, "model")


@pytest.mark.parametrize("key", ["model", "prompt", "messages", "images"])
def test_params_may_not_set_what_batcher_sets(tmp_path: Path, key: str) -> None:
    path = write_manifest(tmp_path, f"""
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            prompt: p
            params:
              size: 1x1
              {key}: other
    """)
    assert_points_at(load_error(path), "jobs.yaml", 10, f"jobs[0].params.{key}")


def test_params_seed_clashes_with_seeds(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            prompt: p
            seeds: 2
            params: {seed: 5}
    """)
    assert_points_at(load_error(path), "jobs.yaml", 9, "jobs[0].params.seed")


def test_missing_input_image(tmp_path: Path) -> None:
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "here.png").write_bytes(PNG)
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            prompt: p
            images: [refs/here.png, refs/missing.png]
    """)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 8, "jobs[0].images")
    assert "refs/missing.png" in str(error)


def test_images_are_relative_to_the_manifest_not_the_cwd(tmp_path: Path) -> None:
    folder = tmp_path / "sub"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "a.png").write_bytes(PNG)
    path = write_manifest(folder, """
        name: demo
        jobs:
          - {name: a, type: image, provider: local, model: m, prompt: p, images: [refs/a.png]}
    """)
    assert load_manifest(path).jobs[0].images == ("refs/a.png",)
    # the same manifest one level up no longer finds the file
    moved = write_manifest(tmp_path, path.read_text(), name="moved.yaml")
    assert_points_at(load_error(moved), "moved.yaml", 3, "jobs[0].images")


def test_system_on_an_image_job(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: image
            provider: local
            model: m
            prompt: p
            system: You draw.
    """)
    assert_points_at(load_error(path), "jobs.yaml", 8, "jobs[0].system")


def test_images_on_a_chat_job(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: chat
            provider: local
            model: m
            prompt: p
            images: [a.png]
    """)
    assert_points_at(load_error(path), "jobs.yaml", 8, "jobs[0].images")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rate_limit", "fast"),
        ("rate_limit", "0/min"),
        ("concurrency", "0"),
        ("concurrency", "2.5"),
        ("base_url", "ftp://x"),
        ("base_url", "not a url"),
        ("timeout", "-1"),
        ("timeout", "soon"),
    ],
)
def test_bad_provider_fields(tmp_path: Path, field: str, value: str) -> None:
    lines = {"base_url": "http://127.0.0.1:1/v1", "concurrency": "4", "rate_limit": "5/s",
             "timeout": "10"}
    lines[field] = value
    body = "\n".join(f"    {k}: {v}" for k, v in lines.items())
    text = "name: demo\nproviders:\n  studio:\n" + body + (
        "\njobs:\n  - {name: a, type: image, provider: studio, model: m, prompt: p}\n"
    )
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    line = 4 + list(lines).index(field)
    assert_points_at(load_error(path), "jobs.yaml", line, f"providers.studio.{field}")


def test_new_provider_needs_a_base_url(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        providers:
          studio:
            concurrency: 2
        jobs:
          - {name: a, type: image, provider: studio, model: m, prompt: p}
    """)
    assert_points_at(load_error(path), "jobs.yaml", None, "base_url")


@pytest.mark.parametrize("text", ["", "just a string\n", "- a\n- b\n", "name: demo\n",
                                  "name: demo\njobs: []\n", "name: ../up\njobs: [{}]\n"])
def test_not_a_manifest(tmp_path: Path, text: str) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    assert "jobs.yaml" in str(load_error(path))


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x0c"])
def test_control_character_is_a_manifest_error(tmp_path: Path, char: str) -> None:
    # e.g. an ANSI escape pasted from a terminal into a prompt
    path = tmp_path / "jobs.yaml"
    path.write_text(
        "name: demo\njobs:\n  - name: a\n    type: image\n    provider: local\n"
        f"    model: m\n    prompt: red {char}[0m fox\n"
    )
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 7, None)
    assert f"#x{ord(char):04x}" in str(error)


def test_unclosed_quote_at_the_end_names_where_it_opened(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text('name: demo\njobs:\n  - name: a\n    prompt: "red fox\n\n')
    assert_points_at(load_error(path), "jobs.yaml", 4, None)


def test_unclosed_bracket_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text("name: demo\njobs:\n  - name: a\n    seeds: [1, 2\n    prompt: p\n")
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 5, None)
    assert "flow sequence begun on line 4" in str(error)


def test_missing_file(tmp_path: Path) -> None:
    assert "nothere.yaml" in str(load_error(tmp_path / "nothere.yaml"))


def test_file_job_pointing_at_a_missing_file(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: bulk
            provider: local
            file: nothere.jsonl
    """)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 5, "jobs[0].file")
    assert "nothere.jsonl" in str(error)


def test_file_job_with_grid_fields(tmp_path: Path) -> None:
    (tmp_path / "bulk.jsonl").write_text('{"model": "m", "prompt": "p"}\n')
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: bulk
            provider: local
            file: bulk.jsonl
            seeds: 3
    """)
    assert_points_at(load_error(path), "jobs.yaml", 6, "jobs[0].seeds")


def test_file_job_reports_the_bad_line_of_its_jsonl(tmp_path: Path) -> None:
    (tmp_path / "bulk.jsonl").write_text(
        '{"model": "m", "prompt": "p"}\n{"prompt": "no model"}\n'
    )
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - {name: bulk, provider: local, file: bulk.jsonl}
    """)
    assert_points_at(load_error(path), "bulk.jsonl", 2, "model")


# --------------------------------------------------------------------------- JSONL


def write_jsonl(folder: Path, lines: list[object], name: str = "tasks.jsonl") -> Path:
    path = folder / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_jsonl_own_form_loads(tmp_path: Path) -> None:
    (tmp_path / "ref.png").write_bytes(PNG)
    path = write_jsonl(tmp_path, [
        {"id": "hero-1", "type": "image", "model": "flux.1-schnell", "prompt": "a hedgehog",
         "seed": 7, "params": {"size": "512x512"}, "images": ["ref.png"]},
        "",
        {"type": "chat", "model": "llama", "prompt": "hello", "system": "be brief"},
        {"type": "chat", "model": "llama",
         "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
        {"model": "flux.1-schnell", "prompt": "default type is image"},
    ])
    manifest = load_manifest(path)
    assert manifest.name == "tasks"
    assert [job.provider for job in manifest.jobs] == ["vultr"]  # the default for JSONL
    assert manifest.jobs[0].file == path

    first, chat, messages, plain = list(iter_jsonl(path))
    assert (first.line, first.id, first.type, first.model, first.prompt, first.seed) == (
        1, "hero-1", "image", "flux.1-schnell", "a hedgehog", 7)
    assert dict(first.params) == {"size": "512x512"} and first.images == ("ref.png",)
    assert (chat.line, chat.type, chat.system, chat.id) == (3, "chat", "be brief", None)
    assert messages.messages is not None and len(messages.messages) == 2
    assert plain.type == "image" and plain.seed is None


def test_jsonl_provider_option(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"model": "m", "prompt": "p"}])
    assert load_manifest(path, provider="local").jobs[0].provider == "local"
    with pytest.raises(ManifestError, match="nowhere"):
        load_manifest(path, provider="nowhere")


def test_jsonl_openai_batch_form_loads(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [
        {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "temperature": 0.2, "max_tokens": 50,
                  "messages": [{"role": "system", "content": "You are terse."},
                               {"role": "user", "content": "Name a colour."}]}},
        {"custom_id": "req-2", "method": "POST", "url": "/v1/images/generations",
         "body": {"model": "flux.1-schnell", "prompt": "a red fox", "seed": 3,
                  "size": "256x256"}},
    ])
    load_manifest(path)
    chat, image = list(iter_jsonl(path))
    assert (chat.id, chat.type, chat.model) == ("req-1", "chat", "gpt-4o-mini")
    assert chat.messages is not None and chat.messages[-1]["content"] == "Name a colour."
    assert chat.prompt == "Name a colour."
    assert dict(chat.params) == {"temperature": 0.2, "max_tokens": 50}
    assert (image.id, image.type, image.model, image.prompt, image.seed) == (
        "req-2", "image", "flux.1-schnell", "a red fox", 3)
    assert dict(image.params) == {"size": "256x256"}


GOOD = {"model": "m", "prompt": "p"}
BATCH = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}


def test_jsonl_lines_asking_for_the_same_result_need_ids(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    line = {"model": "m", "prompt": "a fox", "params": {"response_format": "url"}}
    twin = {"model": "m", "prompt": "a fox", "params": {"response_format": "b64_json"}}
    path.write_text(json.dumps(line) + "\n" + json.dumps(twin) + "\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "tasks.jsonl:2:" in str(caught.value) and "line 1" in str(caught.value)
    path.write_text(json.dumps({**line, "id": "a"}) + "\n" + json.dumps({**twin, "id": "b"}) + "\n")
    load_manifest(path)


@pytest.mark.parametrize(
    ("lines", "line", "field"),
    [
        ([GOOD, {"model": "m", "prompt": "another"}, '{"model": "m", "prompt": '], 3, None),
        ([GOOD, "", "[1, 2]"], 3, None),
        ([GOOD, {"prompt": "no model"}], 2, "model"),
        ([GOOD, {"model": "", "prompt": "empty model"}], 2, "model"),
        ([GOOD, {"model": "m"}], 2, "prompt"),
        ([GOOD, {"model": "m", "prompt": "p", "seed": "7"}], 2, "seed"),
        ([GOOD, {"model": "m", "prompt": "p", "type": "video"}], 2, "type"),
        ([GOOD, {"model": "m", "prompt": "p", "colour": "red"}], 2, "colour"),
        ([GOOD, {"model": "m", "prompt": "p", "params": {"model": "x"}}], 2, "params.model"),
        ([GOOD, {"model": "m", "prompt": "p", "images": ["nothere.png"]}], 2, "images"),
        ([GOOD, {**BATCH, "url": "/v1/embeddings"}], 2, "url"),
        ([GOOD, {**BATCH, "method": "GET"}], 2, "method"),
        ([GOOD, {**BATCH, "body": {"messages": BATCH["body"]["messages"]}}], 2, "model"),
        ([GOOD, {**BATCH, "body": {"model": "m"}}], 2, "messages"),
        ([GOOD, {**BATCH, "custom_id": ""}], 2, "custom_id"),
        ([{**GOOD, "id": "a"}, GOOD, {**GOOD, "id": "a"}], 3, "id"),
        ([BATCH, GOOD, "", BATCH], 4, "id"),
    ],
    ids=["bad-json", "not-object", "missing-model", "empty-model", "missing-prompt", "str-seed",
         "bad-type", "unknown-field", "reserved-param", "missing-image", "unknown-url",
         "get", "batch-no-model", "batch-no-messages", "empty-custom-id", "duplicate-id",
         "duplicate-custom-id"],
)
def test_jsonl_bad_line(tmp_path: Path, lines: list[object], line: int, field: str | None) -> None:
    path = write_jsonl(tmp_path, lines)
    assert_points_at(load_error(path), "tasks.jsonl", line, field)


def test_jsonl_invalid_utf8_is_a_manifest_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b'{"model": "m", "prompt": "ok"}\n{"model": "m", "prompt": "caf\xe9"}\n')
    assert_points_at(load_error(path), "tasks.jsonl", None, None)


def test_jsonl_missing_file(tmp_path: Path) -> None:
    assert "nothere.jsonl" in str(load_error(tmp_path / "nothere.jsonl"))


# --------------------------------------------------------------------------- properties


def _load_or_manifest_error(path: Path) -> None:
    try:
        load_manifest(path)
    except ManifestError as error:
        assert str(error)
        assert path.name in str(error)


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(text=st.text())
@example(text="[" * 3000)
@example(text="name: demo\njobs:\n  - " + "{a: " * 2000)
@example(text="name: a\njobs: [{name: b, type: image, provider: local, model: m, prompt: '{'}]")
@example(text="name: a\njobs: [{name: b, type: image, provider: local, model: m, prompt: p,"
              " vars: {1: [x]}}]")
@example(text="a: &x [*x]\n")
@example(text="name: !!binary aGVsbG8=\njobs: [1]\n")
@example(text="? [a, b]\n: c\n")
def test_any_text_loads_or_raises_manifest_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _load_or_manifest_error(path)


@FUZZ
@given(data=st.binary())
def test_any_bytes_load_or_raise_manifest_error(tmp_path: Path, data: bytes) -> None:
    for name in ("fuzz.yaml", "fuzz.jsonl"):
        path = tmp_path / name
        path.write_bytes(data)
        _load_or_manifest_error(path)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.sampled_from(["local", "image", "chat", "m", "p {x}", "{{x}}", "a.png", "5/s", "http://h/v1",
                     "0", "https://x/y.png"]),
)
KEYS = st.sampled_from([
    "name", "type", "provider", "model", "models", "prompt", "prompts", "vars", "seeds", "images",
    "params", "system", "file", "base_url", "rate_limit", "concurrency", "timeout", "x", "size",
])
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(
    job=st.dictionaries(KEYS, VALUES, max_size=8),
    providers=st.dictionaries(st.sampled_from(["local", "studio", "vultr", "1 2"]),
                              st.dictionaries(KEYS, VALUES, max_size=4), max_size=2),
    defaults=st.dictionaries(KEYS, VALUES, max_size=3),
)
def test_any_structured_manifest_loads_or_raises_manifest_error(
    tmp_path: Path, job: dict[str, object], providers: dict[str, object],
    defaults: dict[str, object],
) -> None:
    data = {"name": "fuzz", "providers": providers, "defaults": defaults,
            "jobs": [{"name": "a", "type": "image", "provider": "local", "model": "m",
                      "prompt": "p", **job}]}
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    _load_or_manifest_error(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
    | st.sampled_from(["/v1/chat/completions", "/v1/images/generations", "POST", "chat", "user"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "custom_id", "type", "model", "prompt", "seed", "params", "images",
                         "system", "messages", "method", "url", "body", "role", "content",
                         "text"]), inner, max_size=5),
    max_leaves=15,
)


@FUZZ
@given(lines=st.lists(JSON_VALUES | st.text(max_size=30), max_size=5))
@example(lines=['{"model": "m", "prompt": "p", "seed": ' + "1" * 5000 + "}"])
def test_any_jsonl_loads_or_raises_manifest_error(tmp_path: Path, lines: list[object]) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(
        (x if isinstance(x, str) else json.dumps(x)).replace("\n", " ") + "\n" for x in lines
    ))
    _load_or_manifest_error(path)



# ------------------------------------------------------------------ values an API cannot take


@pytest.mark.parametrize(("value", "problem"), [
    (".nan", "not a finite number"),
    ("-.inf", "not a finite number"),
    ("1180591620717411303424", "beyond 64 bits"),
    ("2026-11-21", "date"),
])
def test_params_must_be_plain_json(tmp_path: Path, value: str, problem: str) -> None:
    path = write_manifest(tmp_path, f"""
        name: demo
        jobs:
          - name: a
            type: chat
            provider: local
            model: m
            prompt: p
            params:
              max_tokens: 10
              temperature: {value}
    """)
    error = load_error(path)
    assert_points_at(error, "jobs.yaml", 10, "jobs[0].params.temperature")
    assert problem in str(error)


def test_nested_params_name_the_value(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - name: a
            type: chat
            provider: local
            model: m
            prompt: p
            params:
              max_tokens: 10
              stop: ["a", .nan]
    """)
    assert_points_at(load_error(path), "jobs.yaml", 10, "jobs[0].params.stop[1]")


@pytest.mark.parametrize(("line", "field", "problem"), [
    ('{"model": "m", "prompt": "p", "params": {"temperature": NaN}}', "params.temperature",
     "not a finite number"),
    ('{"model": "m", "prompt": "p", "params": {"n": 1180591620717411303424}}', "params.n",
     "beyond 64 bits"),
    ('{"model": "m", "prompt": "red \\ud800 fox"}', "prompt", "lone surrogate"),
])
def test_jsonl_values_an_api_cannot_take(tmp_path: Path, line: str, field: str,
                                         problem: str) -> None:
    path = write_jsonl(tmp_path, ['{"model": "m", "prompt": "fine"}', line])
    with pytest.raises(ManifestError) as caught:
        list(iter_jsonl(path))
    assert_points_at(caught.value, "tasks.jsonl", 2, field)
    assert problem in str(caught.value)


def test_deep_nesting_is_refused_without_crashing(tmp_path: Path) -> None:
    # libyaml builds nodes by recursion in C: 100,000 levels would kill the process.
    path = tmp_path / "jobs.yaml"
    path.write_text("name: " + "[" * 100_000 + "]" * 100_000 + "\n")
    # A ManifestError naming the file and the line, whether batcher's depth check or the YAML
    # library itself (PyYAML 6.0.4 and later limit nesting) refuses it first.
    assert_points_at(load_error(path), "jobs.yaml", 1, None)


def test_control_character_line_counts_characters_not_bytes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text("name: démo\n# 日本語 ü é\njobs:\n  - name: a\n    type: chat\n"
                    "    prompt: \"red \x1b[0m fox\"\n", encoding="utf-8")
    assert_points_at(load_error(path), "jobs.yaml", 6, None)
