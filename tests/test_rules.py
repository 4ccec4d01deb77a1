"""Params checked against what each built-in provider documents (providers/rules.py): a value
the provider would refuse stops the manifest at load (file:line:field, exit 2, nothing sent);
an undocumented parameter is a warning, printed once, and the exit stays 0. `plan --check`
asks the provider's /models for model names."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import provider_block, run_cli, write_manifest

from batcher.errors import ManifestError
from batcher.manifest import load_manifest

KONTEXT = "black-forest-labs/flux-kontext-max/multi"


def vultr_job(params: str, *, model: str = "flux.1-schnell", provider: str = "vultr") -> str:
    return f"""\
        name: rules
        jobs:
          - name: heroes
            type: image
            provider: {provider}
            model: {model}
            prompt: a hedgehog in Tokyo
            params: {params}
        """


def test_a_string_where_vultr_wants_a_whole_number_is_an_error_with_its_line(
    tmp_path: Path
) -> None:
    path = write_manifest(tmp_path, vultr_job('{size: 1024x1024, n: "1"}'))

    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    done = run_cli("validate", str(path))

    assert (caught.value.line, caught.value.field) == (8, "jobs[0].params.n")
    assert done.returncode == 2
    assert "jobs.yaml:8: jobs[0].params.n: must be a whole number, not the string '1'" \
        in done.stderr
    assert "Traceback" not in done.stderr


def test_a_size_outside_vultrs_list_is_an_error_also_from_defaults(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, vultr_job("{size: 2048x2048}"))
    done = run_cli("validate", str(path))
    assert done.returncode == 2
    assert "jobs.yaml:8: jobs[0].params.size: must be one of 256x256, 512x512, 1024x1024, " \
           "not '2048x2048' (vultr images)" in done.stderr

    path = write_manifest(tmp_path, """\
        name: rules
        defaults:
          provider: vultr
          params:
            n: 2
            size: 768x768
        jobs:
          - {name: heroes, type: image, model: flux.1-dev, prompt: a fox}
        """)
    error = run_cli("validate", str(path))
    assert error.returncode == 2
    assert "jobs.yaml:6: defaults.params.size: must be one of" in error.stderr


def test_an_unknown_param_is_a_warning_printed_once_and_the_exit_stays_0(
    tmp_path: Path
) -> None:
    path = write_manifest(tmp_path, vultr_job("{size: 512x512, quality: hd}"))

    checked = run_cli("validate", str(path))
    planned = run_cli("plan", str(path))

    assert checked.returncode == 0, checked.stderr
    warning = ("jobs.yaml:8: jobs[0].params.quality: not a parameter vultr images "
               "documents; sent as written")
    assert checked.stderr.count(warning) == 1, checked.stderr
    assert checked.stderr.startswith("warning: ")
    assert "ok (1 job: heroes)" in checked.stdout
    assert planned.returncode == 0, planned.stderr
    assert planned.stderr.count(warning) == 1, planned.stderr
    dry = run_cli("run", str(path), "--dry-run", "--prune")  # prune and plan: one load
    assert dry.returncode == 0, dry.stderr
    assert dry.stderr.count(warning) == 1, dry.stderr


def test_a_run_that_would_fail_every_task_is_refused_before_sending(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, vultr_job("{size: 256x256, n: 7}"))

    done = run_cli("run", str(path), "--no-progress", env={"VULTR_API_KEY": "sk-0123456789"})

    assert done.returncode == 2
    assert "jobs[0].params.n: must be from 1 to 4, not 7 (vultr images)" in done.stderr
    assert not (tmp_path / "output").exists()


# Each built-in profile's documented parameters, written out from the documentation
# (shared/reference), not from batcher's table: none may warn, none may fail.
DOCUMENTED = [
    ("vultr", "image", "flux.1-dev",
     {"n": 4, "size": "256x256", "response_format": "b64_json"}),
    ("vultr", "chat", "llama-3.1-8b-instruct",
     {"max_tokens": 100, "temperature": 0.7, "stream": False}),
    ("modelverse", "image", KONTEXT,
     {"n": 2, "aspect_ratio": "16:9", "seed": 42, "steps": 20, "guidance_scale": 2.5,
      "negative_prompt": "blur", "response_format": "url"}),
    ("openai", "image", "gpt-image-2",
     {"n": 10, "quality": "high", "output_format": "webp", "output_compression": 80,
      "stream": False, "partial_images": 2, "size": "1536x864", "moderation": "low",
      "background": "transparent", "user": "u-1"}),
    ("openai", "image", "dall-e-3",
     {"n": 1, "quality": "hd", "response_format": "url", "size": "1792x1024",
      "style": "natural"}),
    ("openai", "chat", "gpt-4o",
     {"temperature": 1.5, "top_p": 0.9, "max_tokens": 50, "max_completion_tokens": 60,
      "frequency_penalty": -1, "presence_penalty": 0.5, "n": 3, "seed": 7,
      "stop": ["\n"], "logprobs": True, "top_logprobs": 5, "logit_bias": {"50256": -100},
      "response_format": {"type": "json_object"}, "user": "u-1", "store": False,
      "stream": True, "stream_options": {"include_usage": True},
      "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
      "reasoning_effort": "low", "verbosity": "low", "service_tier": "auto",
      "metadata": {"k": "v"}, "modalities": ["text"], "prompt_cache_key": "k",
      "safety_identifier": "s"}),
]


@pytest.mark.parametrize(("provider", "kind", "model", "params"), DOCUMENTED,
                         ids=[f"{p}-{k}-{m}" for p, k, m, _ in DOCUMENTED])
def test_every_documented_param_of_the_built_in_profiles_is_accepted(
    tmp_path: Path, caplog: Any, provider: str, kind: str, model: str, params: dict[str, Any]
) -> None:
    extra = "    images: [https://example.com/a.png]\n" if model == KONTEXT else ""
    path = write_manifest(tmp_path, (
        f"name: rules\njobs:\n  - name: j\n    type: {kind}\n    provider: {provider}\n"
        f"    model: {model}\n    prompt: a fox\n    params: {json.dumps(params)}\n" + extra))

    with caplog.at_level(logging.WARNING):
        load_manifest(path)

    assert not [r for r in caplog.records if "warning:" in r.getMessage()], caplog.text


def test_a_jsonl_line_is_checked_by_its_providers_rules(tmp_path: Path) -> None:
    lines = [
        {"custom_id": "a", "url": "/v1/images/generations",
         "body": {"model": "flux.1-schnell", "prompt": "a", "size": "512x512", "style": "x"}},
        {"custom_id": "b", "url": "/v1/images/generations",
         "body": {"model": "flux.1-schnell", "prompt": "b", "style": "x"}},
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    warned = run_cli("validate", str(path))

    assert warned.returncode == 0, warned.stderr
    assert warned.stderr.count("warning: ") == 1, warned.stderr
    assert ("tasks.jsonl:1: body.style: not a parameter vultr images documents; sent as "
            "written (and 1 more line)") in warned.stderr

    lines.append({"id": "c", "model": "flux.1-schnell", "prompt": "c", "params": {"n": "2"}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    refused = run_cli("validate", str(path))
    assert refused.returncode == 2
    assert "tasks.jsonl:3: params.n: must be a whole number, not the string '2'" \
        in refused.stderr


def test_a_built_in_name_pointed_at_another_server_is_left_to_that_server(
    tmp_path: Path
) -> None:
    path = write_manifest(tmp_path, """\
        name: rules
        providers:
          vultr: {base_url: "http://127.0.0.1:9/v1"}
        jobs:
          - {name: a, type: image, provider: vultr, model: flux.1-schnell, prompt: a fox,
             params: {size: 64x64, n: 9, quality: hd}}
        """)

    done = run_cli("validate", str(path))

    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr


def test_plan_check_flags_a_model_the_provider_does_not_serve(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()

    def manifest(models: str) -> Path:
        return write_manifest(tmp_path, "name: check\n" + provider_block(server) + (
            f"jobs:\n  - {{name: a, type: image, provider: test, models: {models}, "
            "prompt: a fox}\n"))

    good = run_cli("plan", str(manifest("[flux.1-schnell, flux.1-dev]")), "--check")
    bad = run_cli("plan", str(manifest("[flux.1-schnell, flux.9-imaginary]")), "--check")

    assert good.returncode == 0, good.stderr
    assert "every model is served" in good.stdout
    assert bad.returncode == 2, bad.stderr
    assert "provider test does not serve model 'flux.9-imaginary'" in bad.stdout
