"""The request parameters each built-in provider documents, in one table, checked before a run.

A task's ``params`` travel as written; a wrong type (``n: "1"``) or a size outside a provider's
list would make that provider refuse every task of the job with a 400. The manifest loader
checks params against this table so such a job is refused before anything is sent:

- a documented parameter of the wrong type, a number outside its documented range, or a
  value outside a documented list (``size`` for Vultr, ``response_format``) is an **error**;
- a parameter the provider does not document is a **warning**: providers add parameters
  faster than documentation, so it is sent as written.

Rules apply to a built-in profile only while it talks to its own ``base_url``: a manifest
that points ``openai`` at another server, and every provider a manifest defines, are checked
by nobody but that server. ``local`` is not here: the built-in server answers for itself (and
takes sizes the real APIs do not, for tests).

Sources: ``shared/reference/inference-apis.md`` (Vultr, Modelverse) and OpenAI's OpenAPI
description (``CreateImageRequest``, ``CreateChatCompletionRequest``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from batcher.providers.config import ProviderConfig, builtin_providers

KONTEXT = "black-forest-labs/flux-kontext-max/multi"

_KIND_NAMES = {"int": "a whole number", "number": "a number", "string": "a string",
               "bool": "true or false", "list": "a list", "object": "a mapping"}


@dataclass(frozen=True, slots=True)
class Param:
    """One documented parameter: the JSON kinds it takes, and its range or list if any."""

    kinds: tuple[str, ...]
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  # a string must match it in full
    shape: str | None = None  # what the pattern means, for messages
    nullable: bool = False


@dataclass(frozen=True, slots=True)
class Rules:
    """The parameters one provider documents for one endpoint (and model)."""

    source: str  # "vultr images", for messages
    params: Mapping[str, Param]


@dataclass(frozen=True, slots=True)
class Problem:
    """A parameter a provider would refuse (``error``), or one it does not document."""

    field: str
    message: str
    error: bool


def _int(low: float | None = None, high: float | None = None, **more: Any) -> Param:
    return Param(("int",), low, high, **more)


def _number(low: float | None = None, high: float | None = None, **more: Any) -> Param:
    return Param(("int", "number"), low, high, **more)


_STRING = Param(("string",))
_BOOL = Param(("bool",))
_OBJECT = Param(("object",))
_LIST = Param(("list",))
_FORMAT = Param(("string",), choices=("url", "b64_json"))


def _nullable(params: Mapping[str, Param]) -> dict[str, Param]:
    """OpenAI's description makes nearly every parameter nullable (null: the default)."""
    return {name: Param(p.kinds, p.low, p.high, p.choices, p.pattern, p.shape, True)
            for name, p in params.items()}


# The one table: (provider, endpoint, model or None for every model) -> rules. Fields batcher
# fills itself (model, prompt, messages, images, and the seed from `seeds`) never reach params.
RULES: dict[tuple[str, str, str | None], Rules] = {
    ("vultr", "image", None): Rules("vultr images", {
        "n": _int(1, 4),
        "size": Param(("string",), choices=("256x256", "512x512", "1024x1024")),
        "response_format": _FORMAT,
    }),
    ("vultr", "chat", None): Rules("vultr chat", {
        "max_tokens": _int(1),
        "temperature": _number(0, 2),
        "stream": _BOOL,
    }),
    ("modelverse", "image", KONTEXT): Rules(f"modelverse {KONTEXT}", {
        "n": _int(1, 4),
        "aspect_ratio": Param(("string",), pattern=r"\d+:\d+", shape="W:H, such as 16:9"),
        "seed": _int(),
        "steps": _int(1, 50),
        "guidance_scale": _number(1, 10),
        "negative_prompt": _STRING,
        "response_format": _FORMAT,
    }),
    ("openai", "image", None): Rules("openai images", _nullable({
        "n": _int(1, 10),
        "quality": _STRING,
        "response_format": _FORMAT,
        "output_format": _STRING,
        "output_compression": _int(0, 100),
        "stream": _BOOL,
        "partial_images": _int(0, 3),
        # gpt-image-2 takes any WIDTHxHEIGHT, so only the shape is checked.
        "size": Param(("string",), pattern=r"auto|\d+x\d+", shape="WIDTHxHEIGHT or auto"),
        "moderation": _STRING,
        "background": _STRING,
        "style": _STRING,
        "user": _STRING,
    })),
    ("openai", "chat", None): Rules("openai chat", _nullable({
        "metadata": _OBJECT, "top_logprobs": _int(0, 20), "temperature": _number(0, 2),
        "top_p": _number(0, 1), "user": _STRING, "safety_identifier": _STRING,
        "prompt_cache_key": _STRING, "prompt_cache_retention": _STRING,
        "prompt_cache_options": _OBJECT, "service_tier": _STRING, "modalities": _LIST,
        "verbosity": _STRING, "reasoning_effort": _STRING, "max_completion_tokens": _int(),
        "frequency_penalty": _number(-2, 2), "presence_penalty": _number(-2, 2),
        "web_search_options": _OBJECT, "response_format": _OBJECT, "audio": _OBJECT,
        "store": _BOOL, "moderation": _OBJECT, "stream": _BOOL,
        "stop": Param(("string", "list")), "logit_bias": _OBJECT, "logprobs": _BOOL,
        "max_tokens": _int(), "n": _int(1, 128), "prediction": _OBJECT, "seed": _int(),
        "stream_options": _OBJECT, "tools": _LIST, "tool_choice": Param(("string", "object")),
        "parallel_tool_calls": _BOOL, "function_call": Param(("string", "object")),
        "functions": _LIST,
    })),
}

_BUILTIN_URLS = {name: config.base_url for name, config in builtin_providers().items()}


def rules_for(config: ProviderConfig, kind: str, model: str) -> Rules | None:
    """The documented rules for a request, or ``None`` where batcher knows none."""
    if _BUILTIN_URLS.get(config.name) != config.base_url:
        return None  # a provider of the manifest's own, or a built-in name sent elsewhere
    return RULES.get((config.name, kind, model)) or RULES.get((config.name, kind, None))


def check_params(config: ProviderConfig, kind: str, models: Iterable[str],
                 params: Mapping[str, Any]) -> list[Problem]:
    """What the provider would refuse in ``params`` (errors) or does not document (warnings),
    over every model of a job; each field once, errors first."""
    found: dict[str, Problem] = {}
    for model in models:
        rules = rules_for(config, kind, model)
        if rules is None:
            continue
        for name, value in params.items():
            param = rules.params.get(name)
            if param is None:
                found.setdefault(name, Problem(
                    name, f"not a parameter {rules.source} documents; sent as written", False))
                continue
            message = _problem(param, value)
            if message is not None and not (name in found and found[name].error):
                found[name] = Problem(name, f"{message} ({rules.source})", True)
    for problem in _count_problems(params):  # every provider's, where its rules said nothing
        if not (problem.field in found and found[problem.field].error):
            found[problem.field] = problem
    return sorted(found.values(), key=lambda p: not p.error)


# The params batcher estimates a request's cost by, for every provider: a lax server reads
# ``n: "4"`` or ``n: 4.0`` as 4 images, so a value batcher would not count as written is refused.
COUNTED_PARAMS = ("n", "max_tokens", "max_completion_tokens")


def _count_problems(params: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for name in COUNTED_PARAMS:
        value = params.get(name)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)
                             and value >= 1):
            continue
        problems.append(Problem(name, f"must be a whole number, 1 or more, not {value!r} "
                                      "(batcher estimates the cost by it)", True))
    return problems


def _problem(param: Param, value: Any) -> str | None:
    if value is None:
        return None if param.nullable else "must have a value"
    kind = _kind(value)
    if kind not in param.kinds:
        wanted = ("a number" if param.kinds == ("int", "number") else
                  " or ".join(_KIND_NAMES[k] for k in param.kinds))
        return f"must be {wanted}, not {_describe(value)}"
    low, high = param.low, param.high
    if kind in {"int", "number"} and ((low is not None and value < low)
                                      or (high is not None and value > high)):
        if low is not None and high is not None:
            return f"must be from {low:g} to {high:g}, not {value!r}"
        return (f"must be at least {low:g}, not {value!r}" if low is not None else
                f"must be at most {high:g}, not {value!r}")
    if kind == "string":
        if param.choices is not None and value not in param.choices:
            return f"must be one of {', '.join(param.choices)}, not {value!r}"
        if param.pattern is not None and not re.fullmatch(param.pattern, value):
            return f"must be {param.shape}, not {value!r}"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object" if isinstance(value, Mapping) else type(value).__name__


def _describe(value: Any) -> str:
    kind = _kind(value)
    if kind == "string":
        return f"the string {value!r}"
    if kind == "bool":
        return f"the boolean {str(value).lower()}"
    if kind in {"int", "number"}:
        return f"the number {value!r}"
    return _KIND_NAMES.get(kind, kind)
