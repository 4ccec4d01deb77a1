"""What a run would do: which tasks are selected, done, failed or to run, counted per job and
model, and how long the rest takes at each provider's rate limit. Sends nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batcher.location import StoreURL, output_target
from batcher.manifest import Manifest
from batcher.manifest.tasks import Task, expand
from batcher.providers.prices import TOKENS_PER_PRICE, Cost, Price, PriceList
from batcher.providers.rates import Rate


@dataclass(frozen=True, slots=True)
class Selection:
    """The run options that decide which of a manifest's tasks a run takes on."""

    only: str | None = None
    shard: tuple[int, int] | None = None  # (index from 1, count)
    skip_failed: bool = False
    limit: int | None = None

    def tasks(self, manifest: Manifest) -> Iterator[Task]:
        """The manifest's tasks in this selection (job and shard), in expansion order."""
        tasks = expand(manifest, only=self.only)
        if self.shard is None:
            return tasks
        index, count = self.shard
        return (task for task in tasks if task.shard(count) == index)

    def walk(
        self, manifest: Manifest, done: set[str], failed: set[str]
    ) -> Iterator[tuple[Task, bool]]:
        """Each selected task and whether a run sends it: not done, not a failure the user
        asked to leave (``--skip-failed``), and within ``--limit`` in expansion order."""
        left = self.limit  # tasks --limit still lets this run send
        for task in self.tasks(manifest):
            sends = task.id not in done and not (self.skip_failed and task.id in failed)
            if sends and left is not None:
                sends = left > 0
                left -= sends
            yield task, sends


@dataclass(slots=True)
class Counts:
    total: int = 0
    done: int = 0  # ok, with files present, before this run
    failed: int = 0  # failed before this run
    to_run: int = 0
    cost: Cost = field(default_factory=Cost)  # the estimated cost of the tasks to run
    upper: bool = False  # the estimate is an upper bound (chat: output bounded by max_tokens)

    @property
    def unknown(self) -> int:
        """Tasks to run whose price is unknown."""
        return self.cost.unknown

    def add(self, other: Counts) -> None:
        self.total += other.total
        self.done += other.done
        self.failed += other.failed
        self.to_run += other.to_run
        self.cost.merge(other.cost)
        self.upper |= other.upper


@dataclass(slots=True)
class Plan:
    """Counts per (job, model) and per provider of the tasks a run would send."""

    by_model: dict[tuple[str, str], Counts] = field(default_factory=dict)
    to_run_by_provider: dict[str, int] = field(default_factory=dict)

    def job_counts(self) -> dict[str, Counts]:
        jobs: dict[str, Counts] = {}
        for (job, _model), counts in self.by_model.items():
            jobs.setdefault(job, Counts()).add(counts)
        return jobs

    @property
    def totals(self) -> Counts:
        total = Counts()
        for counts in self.by_model.values():
            total.add(counts)
        return total

    def eta_seconds(self, rates: dict[str, Rate | None]) -> float | None:
        """Time to send what is left at each provider's rate limit (providers run side by side);
        ``None`` when a provider with work to do has no rate limit."""
        longest = 0.0
        for provider, count in self.to_run_by_provider.items():
            rate = rates.get(provider)
            if count and rate is None:
                return None
            if count and rate is not None:
                longest = max(longest, (count - 1) * rate.interval)
        return longest


def make_plan(
    manifest: Manifest, selection: Selection, done: set[str], failed: set[str],
    prices: Mapping[str, PriceList] | None = None,
) -> Plan:
    """Walk the manifest once and count, and (given each provider's prices) estimate what the
    tasks to run cost; memory stays flat however many tasks it expands to."""
    plan = Plan()
    prices = prices if prices is not None else {
        name: config.prices for name, config in manifest.providers.items()}
    for task, sends in selection.walk(manifest, done, failed):
        counts = plan.by_model.get((task.job, task.model))
        if counts is None:
            counts = plan.by_model[(task.job, task.model)] = Counts()
        counts.total += 1
        counts.done += task.id in done
        counts.failed += task.id in failed
        if not sends:
            continue
        counts.to_run += 1
        price = prices[task.provider].of(task.model, task.kind) if task.provider in prices else None
        counts.cost.add(None if price is None else estimate(task, price))
        counts.upper |= task.kind == "chat"
        plan.to_run_by_provider[task.provider] = plan.to_run_by_provider.get(task.provider, 0) + 1
    return plan


def output_dir(manifest: Manifest, override: str | Path | None) -> Path | StoreURL:
    """Where the run writes: ``--output``, else the manifest's ``output`` (a folder relative to
    the current directory, or a store URL). A ``Path`` is always a folder."""
    if isinstance(override, Path):
        return override.expanduser()
    return output_target(override or manifest.output)


CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text


# The output bound of a chat request without max_tokens: an upper estimate needs one, and
# replies longer than this are rare for prompts a batch runs.
DEFAULT_OUTPUT_TOKENS = 1024


def input_tokens(task: Task) -> int:
    """The task's input tokens, estimated from its text (about 4 characters a token)."""
    if task.messages is not None:
        chars = sum(len(_message_text(message)) for message in task.messages)
    else:
        chars = len(task.prompt) + len(task.system or "")
    return math.ceil(chars / CHARS_PER_TOKEN)


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: count their text, not the images
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def output_bound(task: Task) -> int:
    """The most output tokens a chat task may be answered with: its max_tokens, else the
    default bound."""
    params = task.params or {}
    for key in ("max_completion_tokens", "max_tokens"):
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_OUTPUT_TOKENS


def answers_asked(task: Task) -> int:
    """How many images (or chat choices) the task asks for: its ``n``, else 1."""
    value = (task.params or {}).get("n", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def estimate(task: Task, price: Price) -> float | None:
    """What one request of the task costs at most: images n x price; chat the estimated input
    plus the output bound for each of its n choices (an upper estimate). ``None`` for an image
    model priced by tokens: what an image's output tokens will be cannot be told beforehand."""
    n = answers_asked(task)
    if task.kind == "chat":
        return price.request + (input_tokens(task) * price.input
                                + n * output_bound(task) * price.output) / TOKENS_PER_PRICE
    if price.input or price.output:
        return None
    return price.request + n * price.image
