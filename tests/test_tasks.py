"""expand(manifest): the order, the count and the stable ids that make resume work."""

from __future__ import annotations

import inspect
import itertools
import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher import fastjson
from batcher.errors import ManifestError
from batcher.manifest import load_manifest
from batcher.manifest.tasks import Task, expand
from tests.conftest import write_manifest

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


def tasks_of(path: Path, **options: str) -> list[Task]:
    return list(expand(load_manifest(path), **options))


def ids_of(path: Path) -> list[str]:
    return [task.id for task in tasks_of(path)]


def grid(folder: Path, *, prompts: list[str], seeds: object = None, params: object = None,
         images: list[str] | None = None, models: list[str] | None = None,
         vars: dict[str, list[str]] | None = None, kind: str = "image",
         system: str | None = None, name: str = "jobs.yaml") -> Path:
    """A one-job manifest on the local provider."""
    job: dict[str, object] = {"name": "job", "type": kind, "provider": "local",
                              "models": models or ["m1", "m2"], "prompts": prompts}
    for key, value in (("seeds", seeds), ("params", params), ("images", images), ("vars", vars),
                       ("system", system)):
        if value is not None:
            job[key] = value
    path = folder / name
    path.write_text(yaml.safe_dump({"name": "demo", "jobs": [job]}, sort_keys=False))
    return path


# --------------------------------------------------------------------------- order and count


PINNED = """
    name: pins
    jobs:
      - name: heroes
        type: image
        provider: local
        models: [flux.1-schnell, sd-3.5]
        prompts: ["A {animal} in {city}"]
        vars: {animal: [cat, dog], city: [Oslo]}
        seeds: 2
        params: {size: 64x64}
      - name: captions
        type: chat
        provider: local
        model: llama-3.1-8b-instruct
        system: You write captions.
        prompt: A caption for Oslo
"""

# Computed once with batcher-task-v1 and pinned on purpose. A task id is the key of the ledger:
# changing how ids are computed makes every user's finished tasks look new, so the next run
# re-runs (and re-bills) all of them. Change these only together with a deliberate, announced
# change of the identity scheme.
PINNED_IDS = [
    ("A cat in Oslo", "flux.1-schnell", 0, "9fc55c460db0dec2f0e4956b8e6f47e9"),
    ("A cat in Oslo", "flux.1-schnell", 1, "563cca89939a1948a122b89c2e1ac363"),
    ("A cat in Oslo", "sd-3.5", 0, "d71ca961cb469f4eba87d91a5ac11aea"),
    ("A cat in Oslo", "sd-3.5", 1, "809dda3420683c2741d10194ea4533bf"),
    ("A dog in Oslo", "flux.1-schnell", 0, "44eeeea09f88b5c27460fa14c3d10377"),
    ("A dog in Oslo", "flux.1-schnell", 1, "6e27b08a53c93f8858d892d84431c9c1"),
    ("A dog in Oslo", "sd-3.5", 0, "da52ce55290adf3ab9aed370d4415165"),
    ("A dog in Oslo", "sd-3.5", 1, "5da1a4b1e2e53eaaae0ce3916b3b220f"),
    ("A caption for Oslo", "llama-3.1-8b-instruct", None, "f9751f274f761f15cf1014e728c2a556"),
]


def test_ids_are_pinned(tmp_path: Path) -> None:
    tasks = tasks_of(write_manifest(tmp_path, PINNED))
    assert [(t.prompt, t.model, t.seed, t.id) for t in tasks] == PINNED_IDS


def test_ids_are_stable_across_loads(tmp_path: Path) -> None:
    first = ids_of(write_manifest(tmp_path, PINNED))
    second = ids_of(write_manifest(tmp_path / "home", PINNED, name="copy.yaml"))
    assert first == second
    assert len(set(first)) == len(first)


def test_order_is_prompts_vars_models_seeds(tmp_path: Path) -> None:
    prompts = ["{a} and {b} one", "{a} and {b} two"]
    vars = {"a": ["a1", "a2"], "b": ["b1", "b2", "b3"]}
    models = ["m1", "m2"]
    path = grid(tmp_path, prompts=prompts, vars=vars, models=models, seeds=[9, 4])
    got = [(t.prompt, t.model, t.seed) for t in tasks_of(path)]
    expected = [
        (p.format(a=a, b=b), m, s)
        for p in prompts for a in vars["a"] for b in vars["b"] for m in models for s in (9, 4)
    ]
    assert got == expected
    assert len(got) == 2 * 2 * 3 * 2 * 2


def test_task_fields(tmp_path: Path) -> None:
    path = grid(tmp_path, prompts=["hi {city}"], vars={"city": ["Oslo"]}, kind="chat",
                system="You like {city}.", params={"max_tokens": 5}, models=["c"])
    (task,) = tasks_of(path)
    assert (task.job, task.kind, task.provider, task.model) == ("job", "chat", "local", "c")
    assert task.prompt == "hi Oslo" and task.system == "You like Oslo."
    assert task.seed is None  # seeds omitted -> one task, no seed
    assert dict(task.params or {}) == {"max_tokens": 5}
    assert task.vars == (("city", "Oslo"),)
    assert task.endpoint == "/chat/completions"


def test_literal_braces_expand_to_single_braces(tmp_path: Path) -> None:
    path = grid(tmp_path, prompts=["{{x}} for {city}"], vars={"city": ["Oslo"]}, models=["m"])
    assert [t.prompt for t in tasks_of(path)] == ["{x} for Oslo"]


def test_ids_are_unique_within_a_manifest(tmp_path: Path) -> None:
    # A prompt that does not use every var must not yield the same task twice: the ledger keeps
    # one row per id, so duplicates would make summary counts disagree with the ledger.
    path = grid(tmp_path, prompts=["a {city} poster", "a logo"], vars={"city": ["A", "B"]},
                models=["m"])
    ids = ids_of(path)
    assert len(ids) == len(set(ids))


def test_only_picks_one_job(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, PINNED)
    assert {t.job for t in tasks_of(path, only="captions")} == {"captions"}
    assert len(tasks_of(path, only="heroes")) == 8


# --------------------------------------------------------------------------- identity


def test_more_seeds_keep_the_ids_of_the_first_ones(tmp_path: Path) -> None:
    three = tasks_of(grid(tmp_path, prompts=["a", "b"], seeds=3))
    five = tasks_of(grid(tmp_path, prompts=["a", "b"], seeds=5))
    assert len(three) == 2 * 2 * 3 and len(five) == 2 * 2 * 5
    key = {(t.prompt, t.model, t.seed): t.id for t in five}
    for task in three:
        assert key[(task.prompt, task.model, task.seed)] == task.id
    assert len({t.id for t in five} - {t.id for t in three}) == 2 * 2 * 2


def test_seed_list_ids_match_seed_count_ids(tmp_path: Path) -> None:
    counted = ids_of(grid(tmp_path, prompts=["a"], seeds=2))
    listed = ids_of(grid(tmp_path, prompts=["a"], seeds=[0, 1]))
    assert counted == listed


def test_editing_one_prompt_changes_only_its_tasks(tmp_path: Path) -> None:
    before = tasks_of(grid(tmp_path, prompts=["one", "two", "three"], seeds=2))
    after = tasks_of(grid(tmp_path, prompts=["one", "two!", "three"], seeds=2))
    assert len(before) == len(after) == 12
    for old, new in zip(before, after, strict=True):
        if old.prompt == "two":
            assert old.id != new.id
        else:
            assert old.id == new.id
    assert len({t.id for t in before} & {t.id for t in after}) == 8


def test_adding_a_model_keeps_the_other_ids(tmp_path: Path) -> None:
    before = set(ids_of(grid(tmp_path, prompts=["p"], models=["m1"], seeds=2)))
    after = set(ids_of(grid(tmp_path, prompts=["p"], models=["m1", "m2"], seeds=2)))
    assert before < after and len(after) == 4


@pytest.mark.parametrize(
    "params",
    [
        {"size": "64x64", "response_format": "url"},
        {"size": "64x64", "response_format": "b64_json", "stream": True},
        {"response_format": "b64_json", "size": "64x64"},
    ],
)
def test_transport_params_do_not_change_ids(tmp_path: Path, params: dict[str, object]) -> None:
    base = ids_of(grid(tmp_path, prompts=["p"], params={"size": "64x64"}, seeds=2))
    assert ids_of(grid(tmp_path, prompts=["p"], params=params, seeds=2)) == base


@pytest.mark.parametrize(
    "params",
    [{"size": "128x128"}, {"size": "64x64", "n": 2}, {"size": "64x64", "quality": "hd"}, {}],
)
def test_shaping_params_change_ids(tmp_path: Path, params: dict[str, object]) -> None:
    base = set(ids_of(grid(tmp_path, prompts=["p"], params={"size": "64x64"}, seeds=2)))
    changed = set(ids_of(grid(tmp_path, prompts=["p"], params=params, seeds=2)))
    assert not base & changed


def test_provider_and_type_change_ids(tmp_path: Path) -> None:
    image = set(ids_of(grid(tmp_path, prompts=["p"], kind="image")))
    chat = set(ids_of(grid(tmp_path, prompts=["p"], kind="chat")))
    assert not image & chat
    text = (tmp_path / "jobs.yaml").read_text().replace("provider: local", "provider: openai")
    (tmp_path / "jobs.yaml").write_text(text)
    assert not set(ids_of(tmp_path / "jobs.yaml")) & chat


def test_system_message_changes_chat_ids(tmp_path: Path) -> None:
    plain = set(ids_of(grid(tmp_path, prompts=["p"], kind="chat")))
    terse = set(ids_of(grid(tmp_path, prompts=["p"], kind="chat", system="Be terse.")))
    other = set(ids_of(grid(tmp_path, prompts=["p"], kind="chat", system="Be long.")))
    assert len(plain | terse | other) == 6


def test_image_ids_follow_the_bytes_not_the_path(tmp_path: Path) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "a.png").write_bytes(PNG)
    original = ids_of(grid(tmp_path, prompts=["edit"], images=["refs/a.png"]))

    shutil.copy(refs / "a.png", refs / "renamed.png")
    assert ids_of(grid(tmp_path, prompts=["edit"], images=["refs/renamed.png"])) == original

    (refs / "a.png").write_bytes(PNG[:-1] + b"\x00")
    changed = ids_of(grid(tmp_path, prompts=["edit"], images=["refs/a.png"]))
    assert not set(changed) & set(original)

    no_image = ids_of(grid(tmp_path, prompts=["edit"]))
    assert not set(no_image) & set(original)


def test_image_order_matters(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.png").write_bytes(PNG + b"b")
    ab = ids_of(grid(tmp_path, prompts=["p"], images=["a.png", "b.png"]))
    ba = ids_of(grid(tmp_path, prompts=["p"], images=["b.png", "a.png"]))
    assert not set(ab) & set(ba)


def test_jsonl_image_ids_follow_the_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "copy.png").write_bytes(PNG)
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        json.dumps({"model": "m", "prompt": "p", "images": ["a.png"]}) + "\n"
        + json.dumps({"model": "m", "prompt": "p", "images": ["copy.png"]}) + "\n"
    )
    first, second = tasks_of(path)
    assert first.id == second.id


def test_user_ids_win(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"id": "hero-1", "model": "m", "prompt": "p", "seed": 1},
        {"custom_id": "req-7", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "c", "messages": [{"role": "user", "content": "hi"}]}},
        {"model": "m", "prompt": "p", "seed": 1},
    ]) + "\n")
    tasks = tasks_of(path)
    assert [t.id for t in tasks[:2]] == ["hero-1", "req-7"]
    assert len(tasks[2].id) == 32 and tasks[2].id not in {"hero-1", "req-7"}
    assert [t.kind for t in tasks] == ["image", "chat", "image"]


def test_same_task_in_yaml_and_jsonl_has_the_same_id(tmp_path: Path) -> None:
    # The job is part of the identity: a bare JSONL file's job is named after the file.
    yaml_image = tasks_of(grid(tmp_path, prompts=["a fox"], models=["m"], seeds=[3],
                               params={"size": "64x64"}))
    yaml_chat = tasks_of(grid(tmp_path, prompts=["hi"], models=["c"], kind="chat",
                              system="Be terse.", name="chat.yaml"))
    path = tmp_path / "job.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"model": "m", "prompt": "a fox", "seed": 3, "params": {"size": "64x64"}},
        {"type": "chat", "model": "c", "prompt": "hi", "system": "Be terse."},
    ]) + "\n")
    image, chat = list(expand(load_manifest(path, provider="local")))
    assert image.id == yaml_image[0].id
    assert chat.id == yaml_chat[0].id


def test_the_same_request_in_two_jobs_is_two_tasks(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, """
        name: twins
        jobs:
          - {name: a, type: image, provider: local, model: m, prompt: "a fox"}
          - {name: b, type: image, provider: local, model: m, prompt: "a fox"}
    """)
    first, second = tasks_of(path)
    assert (first.job, second.job) == ("a", "b")
    assert first.id != second.id


def test_jsonl_ids_are_stable(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(
        json.dumps({"model": "m", "prompt": f"p{i}", "seed": i}) + "\n" for i in range(20)
    ))
    assert ids_of(path) == ids_of(path)
    assert len(set(ids_of(path))) == 20


# --------------------------------------------------------------------------- streaming


def test_expansion_streams(tmp_path: Path) -> None:
    values = [f"v{i}" for i in range(1000)]
    path = grid(tmp_path, prompts=["{a} {b}"], vars={"a": values, "b": values}, models=["m"])
    manifest = load_manifest(path)
    tasks = expand(manifest)
    assert inspect.isgenerator(tasks)

    tracemalloc.start()
    try:
        first = list(itertools.islice(expand(manifest), 10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [t.prompt for t in first] == [f"v0 v{i}" for i in range(10)]
    assert peak < 20 * 1024 * 1024


def test_jsonl_expansion_streams(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    with path.open("w") as handle:
        for i in range(200_000):
            handle.write(json.dumps({"model": "m", "prompt": f"prompt {i} " + "x" * 40}) + "\n")
    manifest = load_manifest(path)
    tracemalloc.start()
    try:
        first = list(itertools.islice(expand(manifest), 10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(first) == 10
    assert peak < 5 * 1024 * 1024


# --------------------------------------------------------------------------- shards


def test_shards_partition_the_tasks(tmp_path: Path) -> None:
    path = grid(tmp_path, prompts=[f"prompt {i}" for i in range(50)], models=["m1", "m2"],
                seeds=3)
    tasks = tasks_of(path)
    assert len(tasks) == 300
    shards = {n: {t.id for t in tasks if t.shard(3) == n} for n in (1, 2, 3)}
    assert set().union(*shards.values()) == {t.id for t in tasks}  # no gap
    assert sum(len(s) for s in shards.values()) == 300  # no overlap
    assert all(50 <= len(s) <= 150 for s in shards.values()), {n: len(s) for n, s in
                                                                  shards.items()}
    assert {t.shard(1) for t in tasks} == {1}


def test_shard_depends_only_on_the_id(tmp_path: Path) -> None:
    a = Task(id="abc", job="x", kind="image", provider="local", model="m", prompt="p")
    b = Task(id="abc", job="y", kind="chat", provider="vultr", model="n", prompt="q", seed=4)
    assert [a.shard(n) for n in range(1, 9)] == [b.shard(n) for n in range(1, 9)]
    assert all(1 <= a.shard(n) <= n for n in range(1, 9))


# --------------------------------------------------------------------------- robustness


def test_params_with_a_yaml_date_are_refused_naming_the_line_and_field(tmp_path: Path) -> None:
    # YAML reads 2024-01-01 as a date, which is not JSON: refused at load, not sent as a string.
    path = write_manifest(tmp_path, """
        name: demo
        jobs:
          - {name: a, type: image, provider: local, model: m, prompt: p,
             params: {size: 64x64, style_date: 2024-01-01}}
    """)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.file.endswith("jobs.yaml") and caught.value.line is not None
    assert caught.value.field is not None and "style_date" in caught.value.field


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                    st.dates(), st.binary(max_size=4))
PARAMS = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8),
    max_size=4,
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=PARAMS, seeds=st.one_of(st.integers(-3, 5), st.lists(st.integers(), max_size=3)),
       var_values=st.lists(SCALARS, max_size=3))
def test_a_manifest_loads_and_expands_exactly_when_its_values_are_valid(
    tmp_path: Path, params: dict[str, object], seeds: object, var_values: list[object]
) -> None:
    job = {"name": "a", "type": "image", "provider": "local", "model": "m",
           "prompt": "p {v}", "vars": {"v": var_values}, "params": params, "seeds": seeds}
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.dump({"name": "fuzz", "jobs": [job]}, Dumper=yaml.SafeDumper))
    problem = expected_problem(params, seeds, var_values)

    if problem is not None:
        with pytest.raises(ManifestError) as caught:
            load_manifest(path)
        assert caught.value.file.endswith("fuzz.yaml") and caught.value.line is not None
        field = caught.value.field or ""
        assert field.startswith(f"jobs[0].{problem}"), (str(caught.value), problem)
        return
    manifest = load_manifest(path)
    tasks = list(itertools.islice(expand(manifest), 50))
    assert isinstance(seeds, int | list)
    count = len(var_values) * (seeds if isinstance(seeds, int) else len(seeds))
    assert len(tasks) == min(count, 50) and all(len(t.id) == 32 for t in tasks)
    assert all(dict(t.params or {}) == params for t in tasks)


def expected_problem(params: dict[str, object], seeds: object,
                     var_values: list[object]) -> str | None:
    """The field the manifest's rules refuse first (vars, seeds, params), or None."""
    texts = [str(value) for value in var_values]
    if (not var_values or any(value is None or isinstance(value, list | dict)
                              for value in var_values) or len(set(texts)) != len(texts)):
        return "vars"
    if isinstance(seeds, int):
        if seeds < 1:
            return "seeds"
    elif not seeds or len(set(seeds)) != len(seeds):  # type: ignore[arg-type]
        return "seeds"
    if {"model", "prompt", "messages", "images", "seed"} & set(params):
        return "params"
    if fastjson.unsendable(params) is not None:
        return "params"
    return None
