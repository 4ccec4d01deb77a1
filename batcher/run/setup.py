"""What a run is given before it sends anything: its options, the providers it uses with their
keys, the checks that refuse it before any request, and the collaborators its workers use.

:func:`equipped` builds, once the run knows it has tasks to send, one ``aiohttp`` session for
the APIs and another (no default headers) for image downloads, a client per provider (starting
the built-in server for ``local``), each provider's pacer and queue, its downloader, the file
writer and the :class:`~batcher.run.saving.Saver`; and closes them again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp

from batcher.errors import UsageError
from batcher.manifest import Manifest
from batcher.manifest.tasks import Task
from batcher.plan import Plan, Selection, make_plan
from batcher.providers import OpenAICompatible, open_clients
from batcher.providers.config import ProviderConfig, resolve_key
from batcher.providers.download import Downloader
from batcher.providers.openai_compat import connection_tracing
from batcher.providers.rates import Rate
from batcher.run.limits import Pacer
from batcher.run.saving import Saver
from batcher.store.atomic import AtomicFile, FileWriter
from batcher.store.names import Layout
from batcher.wording import usd


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything ``batcher run`` takes besides the manifest."""

    output: str | Path | None = None  # a folder or a store URL; default: the manifest's
    selection: Selection = field(default_factory=Selection)
    concurrency: int | None = None
    rate: Rate | None = None
    progress: bool | None = None  # None: a bar on a terminal, plain lines otherwise
    log_every: float = 10.0
    grace: float = 10.0
    handle_signals: bool = True
    sync_every: float | None = None  # seconds between ledger publishes to a store
    store_timeout: float | None = None  # seconds a failing store is retried before the run stops
    budget: float | None = None  # USD this run may spend; default: the manifest's budget


def effective_configs(
    manifest: Manifest, options: RunOptions, names: set[str]
) -> dict[str, ProviderConfig]:
    """The used providers' configs with the command line's overrides applied."""
    configs = {}
    for name in sorted(names):
        config = manifest.providers[name]
        if options.concurrency is not None:
            config = replace(config, concurrency=options.concurrency)
        if options.rate is not None:
            config = replace(config, rate_limit=options.rate)
        configs[name] = config
    return configs


def used_providers(manifest: Manifest, only: str | None) -> set[str]:
    """The providers of the jobs a run takes on; ``--only`` must name a job."""
    names = [job.name for job in manifest.jobs]
    if only is not None and only not in names:
        raise UsageError(f"--only {only}: no such job in {manifest.path} "
                         f"(jobs: {', '.join(names)})")
    return {job.provider for job in manifest.jobs if only is None or job.name == only}


@dataclass(frozen=True, slots=True)
class Providers:
    """The providers a run uses, with the command line's overrides, and their keys."""

    configs: dict[str, ProviderConfig]
    keys: dict[str, str | None]

    @classmethod
    def of(cls, manifest: Manifest, options: RunOptions) -> Providers:
        """Resolved before any request: a missing key stops the run before it starts."""
        configs = effective_configs(manifest, options,
                                    used_providers(manifest, options.selection.only))
        return cls(configs, {name: resolve_key(config) for name, config in configs.items()})

    def plan(self, manifest: Manifest, selection: Selection, done: set[str],
             failed: set[str]) -> Plan:
        """The run's counts and cost estimates at these providers' prices."""
        return make_plan(manifest, selection, done, failed,
                         prices={name: config.prices for name, config in self.configs.items()})

    @property
    def slots(self) -> int:
        """How many requests the run may have in flight at once."""
        return sum(config.concurrency for config in self.configs.values())


def check_budget(manifest: Manifest, configs: dict[str, ProviderConfig], plan: Plan,
                 limit: float | None) -> None:
    """A budget cannot be kept with a cost it cannot estimate: refuse before any request."""
    if limit is None:
        return
    providers = {job.name: job.provider for job in manifest.jobs}
    unknown = sorted({(providers[job], "chat" if counts.upper else "image", model)
                      for (job, model), counts in plan.by_model.items() if counts.unknown})
    if not unknown:
        return
    unpriced = [f"{name}/{model}" for name, kind, model in unknown
                if configs[name].prices.of(model, kind) is None]
    by_tokens = [f"{name}/{model}" for name, kind, model in unknown
                 if configs[name].prices.of(model, kind) is not None]
    why = []
    if unpriced:
        why.append(f"no price for {', '.join(unpriced)} (add them under providers: NAME: "
                   "prices:)")
    if by_tokens:
        why.append(f"{', '.join(by_tokens)} priced by tokens: an image's tokens cannot be "
                   "estimated before it is made (give an image or request price)")
    raise UsageError(f"a budget of {usd(limit)} needs an estimate for every model it runs; "
                     f"{'; '.join(why)}")


@dataclass(slots=True)
class Lane:
    """One provider during a run: its client, its pacing and its queue of tasks."""

    config: ProviderConfig
    client: OpenAICompatible
    pacer: Pacer
    queue: asyncio.Queue[Task | None]
    stopped: str | None = None  # why this provider takes no more tasks
    answered: bool = False  # whether it has answered anything (any status) in this run
    unreachable: int = 0  # tasks whose every attempt found the endpoint refusing connections
    backing_off: int = 0  # tasks waiting out a backoff away from a worker (see run.course)


@dataclass(frozen=True, slots=True)
class Equipment:
    """What the workers of a run use: a lane per provider and the saver of answers."""

    lanes: dict[str, Lane]
    saver: Saver


@asynccontextmanager
async def equipped(providers: Providers, layout: Layout) -> AsyncIterator[Equipment]:
    """Build the run's sessions, clients, pacers, queues, downloaders and file writer; close
    them when the block ends."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector,
                                     trace_configs=[connection_tracing()]) as api, \
            aiohttp.ClientSession() as downloads, \
            open_clients(providers.configs, providers.keys, api) as clients:
        lanes = {name: Lane(config, clients[name], Pacer(config.rate_limit, config.concurrency),
                            asyncio.Queue(maxsize=2 * config.concurrency))
                 for name, config in providers.configs.items()}
        files = FileWriter()
        downloaders = {name: Downloader(downloads, cap=c.download_cap, timeout=c.timeout,
                                        open_file=AtomicFile)
                       for name, c in providers.configs.items()}
        try:
            yield Equipment(lanes, Saver(layout, downloaders, files))
        finally:
            await files.close()
