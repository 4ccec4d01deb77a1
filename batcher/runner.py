"""The worker pool: take a task, call its provider, save the files, record the outcome.

One producer walks the manifest's expansion and hands each task to its provider's queue; each
provider has as many workers as its concurrency. Retries, 429 pauses and the decision to stop
come from :mod:`batcher.retry`; pacing from :mod:`batcher.limits`.

Shutdown has two stages: the first signal stops new tasks and lets those in flight finish for a
grace period; the second (or the end of the grace period) cancels them. A result's files are
renamed into place before its ledger row is queued, and queuing a row is synchronous, so a
cancellation can lose a request in flight but never split a file from its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from batcher.bodies import InputImages
from batcher.download import Downloader
from batcher.errors import AuthError, ProviderError
from batcher.ledger import LEDGER_NAME, FileRecord, Ledger, Record
from batcher.limits import Pacer, Rate
from batcher.manifest import Manifest
from batcher.plan import Plan, Selection, make_plan, output_dir, will_run
from batcher.progress import Counters, Progress
from batcher.providers import OpenAICompatible, open_clients
from batcher.providers.config import ProviderConfig, resolve_key
from batcher.report import summarize, write_reports
from batcher.retry import Action, backoff, classify
from batcher.saving import Answer, Saver
from batcher.storage import Layout, remove_leftovers
from batcher.tasks import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything ``batcher run`` takes besides the manifest."""

    output: Path | None = None
    selection: Selection = field(default_factory=Selection)
    concurrency: int | None = None
    rate: Rate | None = None
    progress: bool | None = None  # None: a bar on a terminal, plain lines otherwise
    log_every: float = 10.0
    grace: float = 10.0
    handle_signals: bool = True


@dataclass(slots=True)
class _Provider:
    """One provider during a run: its client, its pacing and its queue of tasks."""

    config: ProviderConfig
    client: OpenAICompatible
    pacer: Pacer
    queue: asyncio.Queue[Task | None]
    stopped: str | None = None  # why this provider takes no more tasks


@dataclass(slots=True)
class Outcome:
    """The result of a run, for the CLI and for summary.json."""

    exit_code: int
    plan: Plan
    counters: Counters
    summary: dict[str, object]
    output: Path
    message: str | None = None


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
    return {job.provider for job in manifest.jobs if only is None or job.name == only}


async def run(manifest: Manifest, options: RunOptions) -> Outcome:
    """Run every selected task that is not done yet; see :class:`Runner`."""
    root = output_dir(manifest, options.output)
    configs = effective_configs(manifest, options, used_providers(manifest, options.selection.only))
    keys = {name: resolve_key(config) for name, config in configs.items()}  # before any request
    root.mkdir(parents=True, exist_ok=True)
    with Ledger(root / LEDGER_NAME) as ledger:
        runner = Runner(manifest, options, root, ledger, configs, keys)
        return await runner.run()


class Runner:
    """One run of one manifest into one output folder."""

    def __init__(
        self,
        manifest: Manifest,
        options: RunOptions,
        root: Path,
        ledger: Ledger,
        configs: dict[str, ProviderConfig],
        keys: dict[str, str | None],
    ) -> None:
        self.manifest = manifest
        self.options = options
        self.root = root
        self.ledger = ledger
        self.configs = configs
        self.keys = keys
        self.counters = Counters()
        self.layout = Layout(root)
        self.images = InputImages()
        self.stopping = asyncio.Event()
        self.auth_error: AuthError | None = None
        self.interrupted = False
        self._providers: dict[str, _Provider] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[Any]] = set()  # workers with a request under way
        self._progress: Progress | None = None
        self._ran_by_job: dict[str, list[int]] = {}  # job -> [ran, ok, failed, failed_before]

    # ------------------------------------------------------------------ the run

    async def run(self) -> Outcome:
        started = time.time()
        removed = remove_leftovers(self.root)
        if removed:
            log.info("removed %d temporary files left by an interrupted run", removed)
        done, failed = self.ledger.statuses(self.root)
        plan = make_plan(self.manifest, self.options.selection, done, failed)
        self.ledger.set_meta("manifest", str(self.manifest.path.resolve()))
        totals = plan.totals
        to_run = totals.to_run
        log.info("%d tasks: %d done, %d failed before, %d to run -> %s", totals.total,
                 totals.done, totals.failed, to_run, self.root)
        mode = Progress.choose_mode(self.options.progress, sys.stderr)
        self._progress = Progress(to_run, self.counters, mode=mode, every=self.options.log_every)
        try:
            if to_run:
                await self._run_tasks(done, failed)
        finally:
            self._progress.close()
            self.ledger.flush()
        summary = summarize(plan, self.counters, self._ran_by_job,
                            elapsed=time.time() - started)
        summary["exit_code"] = exit_code = self._exit_code(summary)
        write_reports(self.root, self.ledger, summary)
        message = str(self.auth_error) if self.auth_error else self._stopped_message()
        return Outcome(exit_code, plan, self.counters, summary, self.root, message)

    def _exit_code(self, summary: dict[str, Any]) -> int:
        if self.interrupted:
            return 130
        if self.auth_error is not None:
            return 3
        if summary["failed"]:
            return 1
        # Tasks held back by --limit are what the user asked for; held back by a stopped
        # provider they are not.
        limited = self.options.selection.limit is not None
        if summary["pending"] and (not limited or self._stopped_message()):
            return 1
        return 0

    def _stopped_message(self) -> str | None:
        stopped = [f"{name}: {p.stopped}" for name, p in self._providers.items() if p.stopped]
        return "; ".join(stopped) or None

    async def _run_tasks(self, done: set[str], failed: set[str]) -> None:
        # One session for the APIs; another, with no default headers, for image downloads.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector) as api, \
                aiohttp.ClientSession() as downloads, \
                open_clients(self.configs, self.keys, api) as clients:
            for name, config in self.configs.items():
                self._providers[name] = _Provider(
                    config, clients[name], Pacer(config.rate_limit, config.concurrency),
                    asyncio.Queue(maxsize=2 * config.concurrency),
                )
            saver = Saver(self.layout, {
                name: Downloader(downloads, cap=c.download_cap, timeout=c.timeout)
                for name, c in self.configs.items()
            })
            await self._supervise(done, failed, saver)

    async def _supervise(self, done: set[str], failed: set[str], saver: Saver) -> None:
        producer = asyncio.create_task(self._produce(done, failed))
        workers = self._workers = [
            asyncio.create_task(self._work(provider, saver, failed))
            for provider in self._providers.values()
            for _ in range(provider.config.concurrency)
        ]
        ticker = asyncio.create_task(self._tick())
        remove_handlers = self._install_signal_handlers(workers)
        try:
            await self._wait_for(workers)
        finally:
            remove_handlers()
            for task in (producer, ticker, *workers):
                task.cancel()
            await asyncio.gather(producer, ticker, *workers, return_exceptions=True)

    async def _wait_for(self, workers: list[asyncio.Task[None]]) -> None:
        all_done: asyncio.Future[Any] = asyncio.gather(*workers, return_exceptions=True)
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({all_done, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not all_done.done():
                # Stopping: no new task starts; give those in flight the grace period.
                self._release_idle_workers()
                await asyncio.wait({all_done}, timeout=self.options.grace)
        finally:
            stop.cancel()
            if not all_done.done():
                all_done.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await all_done

    def stop(self, reason: str) -> None:
        """Stop starting tasks; those in flight finish."""
        if not self.stopping.is_set():
            log.warning("%s: stopping; tasks in flight may finish", reason)
            self.stopping.set()

    def _release_idle_workers(self) -> None:
        """On stop: cancel every worker with no request in flight (waiting for a turn, a 429
        pause or a backoff), and wake those waiting for a task."""
        for worker in self._workers:
            if worker not in self._in_flight:
                worker.cancel()
        for provider in self._providers.values():
            for _ in range(provider.config.concurrency):
                try:
                    provider.queue.put_nowait(None)
                except asyncio.QueueFull:
                    break

    def _install_signal_handlers(self, workers: list[asyncio.Task[None]]) -> Callable[[], None]:
        if not self.options.handle_signals:
            return lambda: None
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            self.interrupted = True
            if self.stopping.is_set():
                log.warning("second signal: cancelling the requests in flight")
                for worker in workers:
                    worker.cancel()
            else:
                self.stop(signal.Signals(signum).name)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)

        def remove() -> None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

        return remove

    async def _tick(self) -> None:
        assert self._progress is not None
        while True:
            await asyncio.sleep(min(self.options.log_every, 1.0))
            self._progress.update()

    # ------------------------------------------------------------------ producing

    async def _produce(self, done: set[str], failed: set[str]) -> None:
        selection = self.options.selection
        budget = selection.limit
        for task in selection.tasks(self.manifest):
            if self.stopping.is_set():
                return
            if not will_run(task.id, done, failed, selection.skip_failed):
                continue
            if budget is not None:
                if budget <= 0:
                    break
                budget -= 1
            await self._providers[task.provider].queue.put(task)
        for provider in self._providers.values():
            for _ in range(provider.config.concurrency):
                await provider.queue.put(None)

    # ------------------------------------------------------------------ working

    async def _work(self, provider: _Provider, saver: Saver, failed: set[str]) -> None:
        while True:
            task = await provider.queue.get()
            if task is None or self.stopping.is_set():
                return
            if provider.stopped:
                continue  # left pending: the provider cannot take it now
            record = await self._execute(provider, task, saver)
            if record is not None:
                self._count(record, was_failed=task.id in failed)
                self.ledger.record(record)
                assert self._progress is not None
                self._progress.update()

    def _count(self, record: Record, *, was_failed: bool) -> None:
        ok = record.status == "ok"
        self.counters.ran += 1
        self.counters.ok += ok
        self.counters.failed += not ok
        job = self._ran_by_job.setdefault(record.job, [0, 0, 0, 0])
        job[0] += 1
        job[1] += ok
        job[2] += not ok
        job[3] += was_failed

    async def _execute(self, provider: _Provider, task: Task, saver: Saver) -> Record | None:
        """Try a task until it is saved or its failure is final; ``None`` leaves it pending."""
        started = time.time()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._attempt(provider, task, saver, started)
                if result is None:  # stopped while waiting for a turn: never sent
                    return None
            except ProviderError as error:
                verdict = classify(error)
                action = self._react(provider, task, error, verdict, attempt)
                if action is not Action.RETRY:
                    return saver.failed(task, error, attempt, started)
                if self.stopping.is_set():
                    return None
                self.counters.retries += 1
                wait = verdict.wait if verdict.wait is not None else backoff(attempt)
                if not verdict.rate_limited:  # a 429 already paused the whole provider
                    await asyncio.sleep(wait)
                continue
            answer, files, response = result
            return saver.succeeded(task, files, answer, response, attempt, started)

    async def _attempt(
        self, provider: _Provider, task: Task, saver: Saver, started: float
    ) -> tuple[Answer, list[FileRecord], dict[str, Any]] | None:
        """One request and the saving of its answer, counted as in flight throughout."""
        async with provider.pacer.slot():
            if self.stopping.is_set():
                return None
            self.counters.requests += 1
            worker = asyncio.current_task()
            assert worker is not None
            self._in_flight.add(worker)
            try:
                answer = await saver.request(provider.client, task, self.images)
                files, response = await saver.save(task, answer, started)
            finally:
                self._in_flight.discard(worker)
        return answer, files, response

    def _react(
        self, provider: _Provider, task: Task, error: ProviderError, verdict, attempt: int
    ) -> Action:
        """Apply a verdict's side effects (pauses, stops); returns what to do with the task."""
        action = verdict.action
        config = provider.config
        if verdict.rate_limited:
            self.counters.rate_limited += 1
        if action is Action.STOP_RUN:
            self.auth_error = AuthError(
                f"provider {config.name} refused the request ({error}); check the API key "
                f"({config.api_key_env or config.api_key_file or 'none configured'}) and that it "
                "may use this endpoint and model"
            )
            self.stop(f"provider {config.name} answered {getattr(error, 'status', '')}")
            return action
        if action is Action.STOP_PROVIDER:
            provider.stopped = f"the provider says its quota is spent ({error})"
            log.error("provider %s: %s; its remaining tasks stay pending", config.name,
                      provider.stopped)
            return action
        if action is Action.RETRY and attempt > config.retries:
            return Action.FAIL
        if verdict.wait is not None and verdict.wait > config.max_wait:
            provider.stopped = (
                f"it asked to wait {verdict.wait:.0f} s, over max_wait {config.max_wait:g} s"
            )
            log.error("provider %s: %s; its remaining tasks stay pending", config.name,
                      provider.stopped)
            return Action.STOP_PROVIDER
        if verdict.rate_limited:
            provider.pacer.pause(verdict.wait if verdict.wait is not None else backoff(attempt))
            provider.pacer.slow_down()
        if action is Action.RETRY:
            log.debug("task %s attempt %d: %s; retrying", task.id, attempt, error)
        return action
