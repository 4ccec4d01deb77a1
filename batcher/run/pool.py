"""The worker pool: take a task, call its provider, save the files, record the outcome.

Each provider has its own producer, walking the manifest's expansion for that provider's tasks,
and as many workers as its concurrency, so a slow provider never holds back a fast one.
Retries, 429 pauses and the decision to stop come from :mod:`batcher.run.retry`; pacing from
:mod:`batcher.run.limits`.

Signals (:mod:`batcher.run.signals`) are handled from the opening of the output to its closing.
While workers send, the first signal stops new requests, cancels the workers that have nothing
in flight (waiting for a turn, a 429 pause or a backoff) and gives the others a grace period;
the second signal (or the end of the grace period) cancels those too. A paid result is kept by
a task of its own, shielded from its worker's cancellation (as arq shields its bookkeeping), and
the run waits for it with the uploads. A result's files are renamed into place before its ledger
row is queued, and queuing a row is synchronous, so a cancellation can lose a request in flight
but never split a file from its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from batcher.atomic import FileWriter, remove_leftovers
from batcher.backoff import backoff
from batcher.bodies import InputImages
from batcher.errors import (
    AuthError,
    BatcherError,
    DownloadError,
    Interrupted,
    NameTaken,
    ProviderError,
    TransportError,
    UsageError,
)
from batcher.manifest import Manifest
from batcher.manifest.tasks import Task
from batcher.plan import Plan, Selection, estimate, make_plan, output_dir
from batcher.providers import OpenAICompatible, open_clients
from batcher.providers.base import ImageAnswer
from batcher.providers.config import ProviderConfig, resolve_key
from batcher.providers.download import Downloader
from batcher.providers.openai_compat import connection_tracing
from batcher.providers.prices import Cost, answer_cost, failed_attempt_cost, run_spend_text
from batcher.providers.rates import Rate
from batcher.records import Record
from batcher.reports.progress import Counters, Progress
from batcher.reports.summary import JobTally, ok_costs_by_job, summarize
from batcher.run.limits import Pacer
from batcher.run.retry import Action, Verdict, classify, stop_reason
from batcher.run.saving import Saver, task_boundary
from batcher.run.signals import LAST_MOMENT, Signals
from batcher.run.spend import OverBudget, Spend
from batcher.store.derive import Deriver
from batcher.store.names import Layout
from batcher.store.output import Output, open_output
from batcher.store.rederive import refresh_derived, replace_derived
from batcher.wording import plural, usd

log = logging.getLogger(__name__)
wait_out = asyncio.sleep  # how a task waits out its backoff (tests gate it on events)
# Tasks of one provider that may wait out a backoff away from a worker at once; past this a
# worker waits itself, so a provider failing everything never opens a whole manifest's tasks.
MAX_BACKING_OFF = 1024


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


@dataclass(slots=True)
class _Provider:
    """One provider during a run: its client, its pacing and its queue of tasks."""

    config: ProviderConfig
    client: OpenAICompatible
    pacer: Pacer
    queue: asyncio.Queue[Task | None]
    stopped: str | None = None  # why this provider takes no more tasks
    answered: bool = False  # whether it has answered anything (any status) in this run
    unreachable: int = 0  # tasks whose every attempt found the endpoint refusing connections
    backing_off: int = 0  # tasks retrying in a task of their own (see Runner._retry_after)


@dataclass(slots=True)
class _Bill:
    """What one task cost in this run so far, retries included; ``None`` once a part of it
    was of unknown price."""

    usd: float | None = 0.0

    def add(self, cost: float | None) -> None:
        self.usd = None if cost is None or self.usd is None else self.usd + cost


@dataclass(slots=True)
class _Tries:
    """One task's attempts in this run so far: carried across its backoffs."""

    started: float  # when the task was first taken
    attempt: int = 0
    lost_downloads: int = 0  # generations paid for whose images could not be downloaded
    bill: _Bill = field(default_factory=_Bill)


@dataclass(frozen=True, slots=True)
class _Backoff:
    """A task to try again once ``seconds`` have passed; its worker is free meanwhile."""

    seconds: float


@dataclass(slots=True)
class Outcome:
    """The result of a run, for the CLI and for summary.json."""

    exit_code: int
    plan: Plan
    counters: Counters
    summary: dict[str, Any]
    output: str  # the folder or the store URL
    root: Path  # where the ledger and files are on this machine (a store's working copy)
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
    """The providers of the jobs a run takes on; ``--only`` must name a job."""
    names = [job.name for job in manifest.jobs]
    if only is not None and only not in names:
        raise UsageError(f"--only {only}: no such job in {manifest.path} "
                         f"(jobs: {', '.join(names)})")
    return {job.provider for job in manifest.jobs if only is None or job.name == only}


async def run(manifest: Manifest, options: RunOptions) -> Outcome:
    """Run every selected task that is not done yet; see :class:`Runner`."""
    target = output_dir(manifest, options.output)
    configs = effective_configs(manifest, options, used_providers(manifest, options.selection.only))
    keys = {name: resolve_key(config) for name, config in configs.items()}  # before any request
    signals = Signals(options.grace)
    with signals.installed(options.handle_signals):
        opening = open_output(
            target, shard=options.selection.shard, sync_every=options.sync_every,
            store_timeout=options.store_timeout,
            slots=sum(c.concurrency for c in configs.values()))
        try:
            output = await signals.interruptible(opening.__aenter__())
        except Interrupted as stop:  # waiting for the lock, or for the store's first answer
            return _interrupted_before(manifest, options, configs, str(target), str(stop))
        try:
            return await Runner(manifest, options, output, configs, keys, signals).run()
        finally:
            # Publishing what is left and releasing the lock: bounded once a signal came.
            closed, _ = await signals.graced(opening.__aexit__(None, None, None),
                                             last_moment=LAST_MOMENT)
            if not closed:
                log.warning("closing %s was cut short: its lock may stay until it expires",
                            output.location)


def _interrupted_before(manifest: Manifest, options: RunOptions,
                        configs: dict[str, ProviderConfig], location: str,
                        message: str) -> Outcome:
    """The outcome of a run stopped before its output was open: nothing ran, nothing is
    known done."""
    plan = make_plan(manifest, options.selection, set(), set(),
                     prices={name: c.prices for name, c in configs.items()})
    counters = Counters()
    summary = summarize(plan, counters, {}, elapsed=0.0, spent_by_job={})
    summary["exit_code"] = Interrupted.exit_code
    return Outcome(Interrupted.exit_code, plan, counters, summary, location,
                   Path(location), message)


class Runner:
    """One run of one manifest into one output folder."""

    def __init__(
        self,
        manifest: Manifest,
        options: RunOptions,
        output: Output,
        configs: dict[str, ProviderConfig],
        keys: dict[str, str | None],
        signals: Signals | None = None,
    ) -> None:
        self.manifest = manifest
        self.signals = signals or Signals(options.grace)
        self.options = options
        self.output = output
        self.root = output.root
        self.ledger = output.ledger
        self.configs = configs
        self.keys = keys
        self.counters = Counters()
        self.layout = Layout(self.root)
        self.images = InputImages()
        self.deriver = Deriver(self.root, manifest)
        self.stopping = asyncio.Event()
        self.auth_error: AuthError | None = None
        self.crash: BaseException | None = None  # batcher's own or the store's, not the provider's
        self._providers: dict[str, _Provider] = {}
        self._workers: list[asyncio.Task[None]] = []
        # Tasks waiting out a retry backoff, then trying again, each in an asyncio task of its
        # own: a worker never sleeps through a backoff (the provider would sit idle).
        self._retrying: set[asyncio.Task[None]] = set()
        self._in_flight: set[asyncio.Task[Any]] = set()  # workers with a request under way
        self._keeping: set[asyncio.Task[None]] = set()  # paid results on their way to the output
        self._unkept = 0  # ok results paid and handed to the output, not kept (yet)
        self._progress: Progress | None = None
        self._tally: dict[str, JobTally] = {}
        budget = options.budget if options.budget is not None else manifest.budget
        self.spend = Spend(limit=budget)
        self.counters.priced = any(config.prices for config in configs.values())
        self.budget_stop: str | None = None  # why the budget stopped the run

    @property
    def interrupted(self) -> bool:
        return self.signals.interrupted

    # ------------------------------------------------------------------ the run

    async def run(self) -> Outcome:
        unlisten = self.signals.listen(self._on_signal)  # from the start: none is missed
        try:
            return await self._run()
        finally:
            unlisten()

    async def _run(self) -> Outcome:
        started = time.time()
        removed = remove_leftovers(self.root)
        if removed:
            log.info("removed %s left by an interrupted run", plural(removed, "temporary file"))
        try:  # nothing is paid yet: a signal stops the listing and adoption at once
            done, failed = await self.signals.interruptible(
                self.output.statuses(self.manifest, self.options.selection))
            await self.signals.interruptible(self._refresh_derived(done))
        except Interrupted as stop:
            return self._interrupted_at_start(started, str(stop))
        plan = make_plan(self.manifest, self.options.selection, done, failed,
                         prices={name: c.prices for name, c in self.configs.items()})
        self._check_budget(plan)
        totals = plan.totals
        log.info("%s: %d done, %d failed before, %d to run -> %s", plural(totals.total, "task"),
                 totals.done, totals.failed, totals.to_run, self.output.location)
        mode = Progress.choose_mode(self.options.progress, sys.stderr)
        self._progress = Progress(totals.to_run, self.counters, mode=mode,
                                  every=self.options.log_every)
        try:
            if totals.to_run:
                await self._run_tasks(done, failed)
        finally:
            # Uploads under way finish (or fail) before the summary; after a signal they get
            # the grace period, and a task whose upload is cut short stays pending.
            settled, _ = await self.signals.graced(self._settle())
            if not settled:
                log.warning("uploads cut short: their tasks stay pending in the store; the next "
                            "run on this machine uploads them from its working copy")
            self._progress.close()
            self.ledger.flush()
        summary = summarize(plan, self.counters, self._tally, elapsed=time.time() - started,
                            budget=self.spend.limit,
                            spent_by_job=self._spent_by_job(plan))
        summary["exit_code"] = exit_code = self._exit_code(summary)
        summary["not_uploaded"] = self._unkept  # in the working copy: the next run uploads them
        # A moment even after a second signal: a folder's summary is a local write.
        finished, _ = await self.signals.graced(self.output.finish(summary),
                                                last_moment=LAST_MOMENT)
        if not finished:  # a signal cut the final writes short: the run did not end
            log.warning("the final writes to %s were cut short", self.output.location)
            summary["exit_code"] = exit_code = Interrupted.exit_code
        return Outcome(exit_code, plan, self.counters, summary, self.output.location,
                       self.root, self._message())

    async def _settle(self) -> None:
        """Wait for the paid results being kept, then for the output's uploads."""
        while self._keeping:
            for result in await asyncio.gather(*list(self._keeping), return_exceptions=True):
                if isinstance(result, Exception):  # its worker, cancelled, could not say so
                    self._crashed(result)
        await self.output.drain()

    def _interrupted_at_start(self, started: float, message: str) -> Outcome:
        """The outcome of a run stopped while it read its output: nothing was sent; the
        counts are the ledger's word (a store's listing may not have been read)."""
        done, failed = self.ledger.statuses(lambda _path, _size: True)
        plan = make_plan(self.manifest, self.options.selection, done, failed,
                         prices={name: c.prices for name, c in self.configs.items()})
        summary = summarize(plan, self.counters, self._tally, elapsed=time.time() - started,
                            budget=self.spend.limit,
                            spent_by_job=self._spent_by_job(plan))
        summary["exit_code"] = Interrupted.exit_code
        return Outcome(Interrupted.exit_code, plan, self.counters, summary,
                       self.output.location, self.root, message)

    def _check_budget(self, plan: Plan) -> None:
        """A budget cannot be kept with a cost it cannot estimate: refuse before any request."""
        if self.spend.limit is None:
            return
        providers = {job.name: job.provider for job in self.manifest.jobs}
        unknown = sorted({(providers[job], "chat" if counts.upper else "image", model)
                          for (job, model), counts in plan.by_model.items() if counts.unknown})
        if not unknown:
            return
        unpriced = [f"{name}/{model}" for name, kind, model in unknown
                    if self.configs[name].prices.of(model, kind) is None]
        by_tokens = [f"{name}/{model}" for name, kind, model in unknown
                     if self.configs[name].prices.of(model, kind) is not None]
        why = []
        if unpriced:
            why.append(f"no price for {', '.join(unpriced)} (add them under providers: NAME: "
                       "prices:)")
        if by_tokens:
            why.append(f"{', '.join(by_tokens)} priced by tokens: an image's tokens cannot be "
                       "estimated before it is made (give an image or request price)")
        raise UsageError(f"a budget of {usd(self.spend.limit)} needs an estimate for every "
                         f"model it runs; {'; '.join(why)}")

    def _spent_by_job(self, plan: Plan) -> dict[str, Cost]:
        """What every ok task of the run's jobs (and shard) cost when it ran: the manifest's
        tasks only, from every ledger of the output (one more walk of the expansion)."""
        jobs = {job for job, _model in plan.by_model}
        return ok_costs_by_job(self.options.selection.tasks(self.manifest),
                               self.output.ok_costs(), jobs)

    async def _refresh_derived(self, done: set[str]) -> None:
        redone = await refresh_derived(self.manifest, self.options.selection, self.output,
                                       self.deriver, done, self._crashed)
        if redone:
            log.info("derived files of %s made again from the kept images (no request)",
                     plural(redone, "task"))

    def _exit_code(self, summary: dict[str, Any]) -> int:
        if self.interrupted:
            return Interrupted.exit_code
        if self.auth_error is not None:
            return AuthError.exit_code
        if summary["failed"] or self.crash is not None or self.budget_stop:
            return 1
        # Tasks held back by --limit are what the user asked for; held back by a stopped
        # provider they are not.
        limited = self.options.selection.limit is not None
        if summary["pending"] and (not limited or self._stopped_providers()):
            return 1
        return 0

    def _stopped_providers(self) -> str | None:
        stopped = [f"{name}: {p.stopped}" for name, p in self._providers.items() if p.stopped]
        return "; ".join(stopped) or None

    def _message(self) -> str | None:
        if self.auth_error is not None:
            return str(self.auth_error)
        if isinstance(self.crash, BatcherError):  # the store stayed down: its own message
            return f"stopped: {self.crash}; the tasks not uploaded stay pending"
        if self.crash is not None:
            return f"stopped by an error: {self.crash!r} (run again with -v for details)"
        if self.budget_stop:
            return (f"the budget stopped the run: {self.budget_stop}; spent "
                    f"{run_spend_text(self._tally.values())} this run; the rest stay pending "
                    "(raise --budget and run again to finish)")
        return self._stopped_providers()

    async def _run_tasks(self, done: set[str], failed: set[str]) -> None:
        # One session for the APIs; another, with no default headers, for image downloads.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector,
                                         trace_configs=[connection_tracing()]) as api, \
                aiohttp.ClientSession() as downloads, \
                open_clients(self.configs, self.keys, api) as clients:
            for name, config in self.configs.items():
                self._providers[name] = _Provider(
                    config, clients[name], Pacer(config.rate_limit, config.concurrency),
                    asyncio.Queue(maxsize=2 * config.concurrency),
                )
            files = FileWriter()
            saver = Saver(self.layout, {
                name: Downloader(downloads, cap=c.download_cap, timeout=c.timeout)
                for name, c in self.configs.items()
            }, files)
            try:
                await self._supervise(done, failed, saver)
            finally:
                await files.close()

    # ------------------------------------------------------------------ supervision

    async def _supervise(self, done: set[str], failed: set[str], saver: Saver) -> None:
        producers = [asyncio.create_task(self._produce(name, done, failed))
                     for name in self._providers]
        self._workers = [
            asyncio.create_task(self._work(provider, saver, failed))
            for provider in self._providers.values()
            for _ in range(provider.config.concurrency)
        ]
        ticker = asyncio.create_task(self._tick())
        try:
            await self._wait_for_workers()
        finally:
            helpers = [*producers, ticker, *self._workers, *self._retrying]
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _all_done(self) -> None:
        """Every worker has seen the end of its queue and every retry has finished (a retry
        may start another before it ends)."""
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._retrying:
            await asyncio.gather(*list(self._retrying), return_exceptions=True)

    async def _wait_for_workers(self) -> None:
        all_done: asyncio.Future[Any] = asyncio.ensure_future(self._all_done())
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({all_done, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not all_done.done():
                # Stopping: nothing new starts; the requests in flight get the grace period.
                self._cancel_idle_workers()
                await asyncio.wait({all_done}, timeout=self.options.grace)
        finally:
            stop.cancel()
            if not all_done.done():
                all_done.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await all_done

    def stop(self, reason: str) -> None:
        """Stop starting requests; those in flight finish."""
        if not self.stopping.is_set():
            log.warning("%s: stopping; requests in flight may finish", reason)
            self.stopping.set()

    def _cancel_idle_workers(self) -> None:
        for worker in [*self._workers, *self._retrying]:
            if worker not in self._in_flight:
                worker.cancel()

    def _on_signal(self, count: int) -> None:
        """The first signal stops new requests; the second cancels those in flight, and the
        paid results waiting for an upload slot."""
        if count == 1:
            self.stopping.set()
            return
        for task in [*self._workers, *self._retrying, *self._keeping]:
            task.cancel()

    async def _tick(self) -> None:
        """Redraw the progress ten times a second, not once per task (a bar's redraw costs
        more than a fast endpoint's answer)."""
        assert self._progress is not None
        while True:
            await asyncio.sleep(min(self.options.log_every, 0.1))
            self._progress.update()

    # ------------------------------------------------------------------ producing

    def _to_run(self, done: set[str], failed: set[str]) -> Iterator[Task]:
        """The tasks this run sends, in expansion order, ``--limit`` counted over all of them."""
        limit = self.options.selection.limit
        sent = 0
        for task, sends in self.options.selection.walk(self.manifest, done, failed):
            if limit is not None and sent >= limit:
                return  # nothing later can be sent
            if sends:
                sent += 1
                yield task

    async def _produce(self, name: str, done: set[str], failed: set[str]) -> None:
        provider = self._providers[name]
        for task in self._to_run(done, failed):
            if self.stopping.is_set() or provider.stopped:
                break
            if task.provider == name:
                await provider.queue.put(task)
        for _ in range(provider.config.concurrency):
            await provider.queue.put(None)

    # ------------------------------------------------------------------ working

    async def _work(self, provider: _Provider, saver: Saver, failed: set[str]) -> None:
        try:
            while (task := await provider.queue.get()) is not None:
                if self.stopping.is_set():
                    return
                if provider.stopped:
                    continue  # left pending: the provider cannot take it now
                await self._take(provider, task, saver, failed, _Tries(time.time()))
        except Exception as exc:  # batcher's own fault (a full disk, a bug): stop, never hang
            self._crashed(exc)

    async def _take(self, provider: _Provider, task: Task, saver: Saver, failed: set[str],
                    tries: _Tries) -> None:
        """Try a task until it is kept, left pending or due for a backoff, which it waits out
        in a task of its own (:meth:`_retry_after`) while this worker takes the next one."""
        kept = await self._execute(provider, task, saver, tries)
        if isinstance(kept, _Backoff):
            retry = asyncio.create_task(
                self._retry_after(kept.seconds, provider, task, saver, failed, tries))
            self._retrying.add(retry)
            provider.backing_off += 1
            retry.add_done_callback(functools.partial(self._retry_done, provider))
            return
        if kept is not None:
            record, sidecar = kept
            await asyncio.shield(self._keep(record, sidecar, task.id in failed))
            if record.status == "ok" and self.deriver.spec(task.job) is not None:
                # After the paid image is kept: a kill while deriving loses only
                # derived files, which the next run makes with no request.
                await replace_derived(self.output, self.deriver, task, record, self._crashed)

    def _retry_done(self, provider: _Provider, retry: asyncio.Task[None]) -> None:
        self._retrying.discard(retry)
        provider.backing_off -= 1

    async def _retry_after(self, seconds: float, provider: _Provider, task: Task, saver: Saver,
                           failed: set[str], tries: _Tries) -> None:
        """Wait out a task's backoff holding no worker, then try it again: its next request
        waits for a turn of the provider's pacer (concurrency, rate, 429 pause) as any other."""
        try:
            await wait_out(seconds)
            if self.stopping.is_set() or provider.stopped:
                return  # left pending
            await self._take(provider, task, saver, failed, tries)
        except Exception as exc:  # batcher's own fault: stop, never hang
            self._crashed(exc)

    def _keep(self, record: Record, sidecar: str | None, was_failed: bool) -> asyncio.Task[None]:
        """Keep a paid result in a task of its own: a signal that cancels its worker (which
        may wait for an upload slot) does not cancel the keeping; the run waits for it."""
        self._unkept += record.status == "ok"
        keeping = asyncio.create_task(self.output.keep(record, sidecar, functools.partial(
            self._kept, was_failed=was_failed), self._crashed))
        self._keeping.add(keeping)
        keeping.add_done_callback(self._keeping.discard)
        return keeping

    def _kept(self, record: Record, *, was_failed: bool) -> None:
        """A task's outcome is durable: record it."""
        self._unkept -= record.status == "ok"
        self._count(record, was_failed=was_failed)
        self.ledger.record(record)  # the progress shows it at the next tick

    def _crashed(self, exc: BaseException) -> None:
        """batcher's own environment failed (a full disk, a store that stays down): stop."""
        log.debug("stopped by an error", exc_info=exc)
        if self.crash is None:
            self.crash = exc
        self.stop(f"error: {exc}")

    def _count(self, record: Record, *, was_failed: bool) -> None:
        ok = record.status == "ok"
        self.counters.ran += 1
        self.counters.ok += ok
        self.counters.failed += not ok
        tally = self._tally.setdefault(record.job, JobTally())
        tally.ran += 1
        tally.ok += ok
        tally.failed += not ok
        tally.failed_before += was_failed

    async def _execute(
        self, provider: _Provider, task: Task, saver: Saver, tries: _Tries
    ) -> tuple[Record, str | None] | _Backoff | None:
        """Try a task until it is saved, its failure is final or it must wait out a backoff:
        its record and sidecar, or the backoff; ``None`` leaves it pending."""
        started, bill = tries.started, tries.bill
        if tries.attempt == 0 and (taken := self._name_taken(task)) is not None:
            # Never sent: its answer would overwrite another task's files.
            return self._failed(saver, task, taken, 0, started, bill), None
        while not provider.stopped:
            tries.attempt += 1
            attempt = tries.attempt
            try:
                kept = await self._attempt(provider, task, saver, started, attempt, bill)
            except ProviderError as error:
                if not (isinstance(error, TransportError) and not error.reached):
                    provider.answered = True  # a status, a reset, a timeout: it is there
                verdict = classify(error)
                action = self._react(provider, error, verdict, attempt)
                if action is Action.FAIL and self._unreachable(provider, error):
                    return None  # never reached: pending, not failed

                if isinstance(error, DownloadError) and action is Action.RETRY:
                    # The downloader has retried already; each retry here pays again.
                    tries.lost_downloads += 1
                    if tries.lost_downloads > provider.config.regenerations:
                        return self._failed(saver, task, error, attempt, started, bill), None
                if action is Action.FAIL:
                    return self._failed(saver, task, error, attempt, started, bill), None
                if action is not Action.RETRY or self.stopping.is_set():
                    return None  # the run or the provider stopped: the task stays pending
                self.counters.retries += 1
                log.debug("task %s attempt %d: %s; retrying", task.id, attempt, error)
                if verdict.rate_limited:  # a 429 paused the whole provider: no wait of its own
                    continue
                wait = verdict.wait if verdict.wait is not None else backoff(attempt)
                if (provider.answered and self.spend.limit is None
                        and provider.backing_off < MAX_BACKING_OFF):
                    return _Backoff(wait)  # its worker takes another task meanwhile
                # The worker waits: an endpoint that never answered and stays unreachable
                # costs `concurrency` tasks' retries (see _unreachable), not more; under a
                # budget, money goes to finishing the tasks begun before starting others.
                await wait_out(wait)
                continue
            provider.answered = True
            return kept  # None: stopped while waiting for a turn, never sent
        return None

    def _name_taken(self, task: Task) -> NameTaken | None:
        stem = self.layout.task_stem(task)
        owner = self.ledger.claim(stem, task.id)
        if owner is None:
            return None
        return NameTaken(f"its files would be named {stem}.*, which task {owner} owns; give "
                         "one of the two an id (or change its prompt) to run it")

    @staticmethod
    def _failed(saver: Saver, task: Task, error: ProviderError, attempt: int, started: float,
                bill: _Bill) -> Record:
        record = saver.failed(task, error, attempt, started)
        record.cost_usd = bill.usd
        return record

    def _unreachable(self, provider: _Provider, error: ProviderError) -> bool:
        """Whether a task's last attempt found an endpoint that has never answered refusing
        connections (a TransportError that never reached it). After as many such tasks as the
        provider's concurrency it is stopped, so a wrong base_url or a server that is down does
        not grind through every task's retries."""
        if provider.answered:
            return False
        provider.unreachable += 1
        if provider.unreachable >= provider.config.concurrency:
            self._stop_provider(provider, f"the endpoint {provider.client.base_url} is "
                                          "unreachable (every connection refused or timed out)")
        return True

    async def _attempt(
        self, provider: _Provider, task: Task, saver: Saver, started: float, attempt: int,
        bill: _Bill,
    ) -> tuple[Record, str] | None:
        """One request, the saving of its answer and of its sidecar: counted as in flight
        throughout, so a stop gives it the grace period rather than cancelling it between
        its files and its record. Its cost is reserved from the budget before it is sent."""
        async with provider.pacer.slot():
            if self.stopping.is_set() or provider.stopped:
                return None
            try:
                await self.output.gate()  # a store's lock lost: nothing more starts
            except BatcherError as exc:
                self._crashed(exc)
                return None
            price = provider.config.prices.of(task.model, task.kind)
            estimated = None if price is None else estimate(task, price)
            try:
                reservation = self.spend.start(estimated)
            except OverBudget as exc:
                self._over_budget(str(exc))
                return None
            self.counters.requests += 1
            worker = asyncio.current_task()
            assert worker is not None
            self._in_flight.add(worker)
            settled = False
            try:
                with task_boundary(task):
                    try:
                        answer, logged = await saver.request(provider.client, task, self.images)
                    except ProviderError as error:
                        settled = self._charge(task, bill, reservation,
                                               failed_attempt_cost(error, estimated,
                                                                   kind=task.kind, price=price))
                        raise
                    images = len(answer.items) if isinstance(answer, ImageAnswer) else 0
                    settled = self._charge(task, bill, reservation, None if price is None else
                                           answer_cost(task.kind, price, images=images,
                                                       usage=answer.usage))
                    files, response = await saver.save(task, answer)
                    record = saver.succeeded(task, files, answer, response, attempt, started)
                    record.cost_usd = bill.usd
                    return record, await saver.write_sidecar(record, logged)
            finally:
                if not settled:  # cancelled in flight, or batcher's own error: maybe paid
                    self.spend.abandon(reservation)
                self._in_flight.discard(worker)

    def _charge(self, task: Task, bill: _Bill, reservation: float | None,
                cost: float | None) -> bool:
        """What one attempt cost goes to the budget, the task's bill and its job's spend
        (tasks left pending included: their attempts were paid too)."""
        self.spend.settle(reservation, cost)
        bill.add(cost)
        self._tally.setdefault(task.job, JobTally()).cost.add(cost)
        self.counters.spent_usd = self.spend.spent
        return True

    def _over_budget(self, why: str) -> None:
        """The budget is reached: no provider starts another task; those in flight finish
        (they are paid for) and the rest stay pending."""
        if self.budget_stop is None:
            self.budget_stop = why
            log.warning("budget %s reached; the requests in flight finish, no new one starts",
                        usd(self.spend.limit or 0))
        for provider in self._providers.values():
            if provider.stopped is None:
                provider.stopped = "budget reached"

    def _react(
        self, provider: _Provider, error: ProviderError, verdict: Verdict, attempt: int
    ) -> Action:
        """Apply a verdict's side effects (pauses, stops); returns what to do with the task."""
        config = provider.config
        if verdict.rate_limited:
            self.counters.rate_limited += 1
        if verdict.action is Action.STOP_RUN:
            source = config.api_key_env or config.api_key_file or "no key configured"
            self.auth_error = AuthError(
                f"provider {config.name} refused the request ({error}); check its API key "
                f"({source}) and that the key may use this endpoint and model"
            )
            self.stop(f"provider {config.name} refused the key")
            return Action.STOP_RUN
        if verdict.action is Action.STOP_PROVIDER:
            return self._stop_provider(provider, stop_reason(error))
        if verdict.wait is not None and verdict.wait > config.max_wait:
            return self._stop_provider(provider, f"it asked to wait {verdict.wait:.0f} s, "
                                                 f"over max_wait {config.max_wait:g} s")
        if verdict.rate_limited:  # even on the last attempt: the whole provider must slow down
            provider.pacer.pause(verdict.wait if verdict.wait is not None else backoff(attempt))
            provider.pacer.slow_down()
        if verdict.action is Action.RETRY and attempt > config.retries:
            return Action.FAIL
        return verdict.action

    def _stop_provider(self, provider: _Provider, reason: str) -> Action:
        if provider.stopped is None:
            provider.stopped = reason
            log.error("provider %s: %s; its remaining tasks stay pending",
                      provider.config.name, reason)
        return Action.STOP_PROVIDER
