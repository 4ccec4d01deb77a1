"""The pool: one run of one manifest into one output, supervised.

:func:`run` opens the output and hands the pool what :mod:`batcher.run.setup` builds. Each
provider has its own producer, walking the manifest's expansion for that provider's tasks, and
as many workers as its concurrency, so a slow provider never holds back a fast one. A worker
hands each task to :class:`batcher.run.course.Course`, which takes it from its send to a kept
record (pacing, the budget, every retry rule, the keeping); how the run ended is
:mod:`batcher.run.outcome`'s.

Signals (:mod:`batcher.run.signals`) are handled from the opening of the output to its closing.
While workers send, the first signal stops new requests, cancels the workers that have nothing
in flight (waiting for a turn, a 429 pause or a backoff) and gives the others a grace period;
the second signal (or the end of the grace period) cancels those too, and the paid results
waiting for an upload slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batcher.errors import Interrupted
from batcher.manifest import Manifest
from batcher.manifest.tasks import Task
from batcher.plan import Plan, Selection, output_dir
from batcher.reports.progress import Counters, Progress
from batcher.reports.summary import JobTally, ok_costs_by_job, summarize
from batcher.run.course import Course
from batcher.run.outcome import Outcome, Stops, interrupted
from batcher.run.setup import Lane, Providers, RunOptions, check_budget, equipped
from batcher.run.signals import LAST_MOMENT, Signals
from batcher.run.spend import Spend
from batcher.store.atomic import remove_leftovers
from batcher.store.derive import Deriver
from batcher.store.names import Layout
from batcher.store.output import Output, open_output
from batcher.store.rederive import refresh_derived
from batcher.wording import plural

log = logging.getLogger(__name__)


async def run(manifest: Manifest, options: RunOptions) -> Outcome:
    """Run every selected task that is not done yet; see :class:`Pool`."""
    target = output_dir(manifest, options.output)
    providers = Providers.of(manifest, options)  # keys before any request
    signals = Signals(options.grace)
    with signals.installed(options.handle_signals):
        opening = open_output(
            target, shard=options.selection.shard, sync_every=options.sync_every,
            store_timeout=options.store_timeout, slots=providers.slots)
        try:
            output = await signals.interruptible(opening.__aenter__())
        except Interrupted as stop:  # waiting for the lock, or for the store's first answer
            plan = providers.plan(manifest, options.selection, set(), set())
            counters = Counters()  # nothing ran, nothing is known done
            summary = summarize(plan, counters, {}, elapsed=0.0, spent_by_job={})
            return interrupted(plan, counters, summary, str(target), Path(str(target)),
                               str(stop))
        try:
            return await Pool(manifest, options, output, providers, signals).run()
        finally:
            # Publishing what is left and releasing the lock: bounded once a signal came.
            closed, _ = await signals.graced(opening.__aexit__(None, None, None),
                                             last_moment=LAST_MOMENT)
            if not closed:
                log.warning("closing %s was cut short: its lock may stay until it expires",
                            output.location)


class Pool:
    """One run of one manifest into one output: its phases, producers, workers and stop."""

    def __init__(self, manifest: Manifest, options: RunOptions, output: Output,
                 providers: Providers, signals: Signals) -> None:
        self.manifest = manifest
        self.options = options
        self.output = output
        self.providers = providers
        self.signals = signals
        self.stops = Stops(signals)
        self.counters = Counters()
        self.counters.priced = any(config.prices for config in providers.configs.values())
        self.tally: dict[str, JobTally] = {}
        budget = options.budget if options.budget is not None else manifest.budget
        self.spend = Spend(limit=budget)
        self.deriver = Deriver(output.root, manifest)
        self.course: Course | None = None  # once the run has tasks to send
        self._workers: list[asyncio.Task[None]] = []
        self._progress: Progress | None = None

    async def run(self) -> Outcome:
        unlisten = self.signals.listen(self._on_signal)  # from the start: none is missed
        try:
            return await self._run()
        finally:
            unlisten()

    async def _run(self) -> Outcome:
        started = time.time()
        removed = remove_leftovers(self.output.root)
        if removed:
            log.info("removed %s left by an interrupted run", plural(removed, "temporary file"))
        try:  # nothing is paid yet: a signal stops the listing and adoption at once
            done, failed = await self.signals.interruptible(
                self.output.statuses(self.manifest, self.options.selection))
            await self.signals.interruptible(self._refresh_derived(done))
        except Interrupted as stop:
            return self._interrupted_at_start(started, str(stop))
        plan = self.providers.plan(self.manifest, self.options.selection, done, failed)
        check_budget(self.manifest, self.providers.configs, plan, self.spend.limit)
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
                log.warning("keeping the paid results cut short: their tasks stay pending; the "
                            "next run on this machine keeps them with no request")
            self._progress.close()
            self.output.ledger.flush()
        return await self._finish(plan, started)

    async def _finish(self, plan: Plan, started: float) -> Outcome:
        """The summary, written to the output, and the outcome."""
        summary = self._summary(plan, started)
        limited = self.options.selection.limit is not None
        summary["exit_code"] = exit_code = self.stops.exit_code(summary, limited=limited)
        # In the working copy: the next run uploads them.
        summary["not_uploaded"] = self.course.keeper.unkept if self.course else 0
        # A moment even after a second signal: a folder's summary is a local write.
        finished, _ = await self.signals.graced(self.output.finish(summary),
                                                last_moment=LAST_MOMENT)
        if not finished:  # a signal cut the final writes short: the run did not end
            log.warning("the final writes to %s were cut short", self.output.location)
            summary["exit_code"] = exit_code = Interrupted.exit_code
        return Outcome(exit_code, plan, self.counters, summary, self.output.location,
                       self.output.root, self.stops.message(self.tally))

    async def _settle(self) -> None:
        """Wait for the paid results being kept, then for the output's uploads."""
        if self.course is not None:
            await self.course.keeper.settle()
        await self.output.drain()

    def _interrupted_at_start(self, started: float, message: str) -> Outcome:
        """The outcome of a run stopped while it read its output: nothing was sent; the
        counts are the ledger's word (a store's listing may not have been read)."""
        done, failed = self.output.ledger.statuses(lambda _path, _size: True)
        plan = self.providers.plan(self.manifest, self.options.selection, done, failed)
        return interrupted(plan, self.counters, self._summary(plan, started),
                           self.output.location, self.output.root, message)

    def _summary(self, plan: Plan, started: float) -> dict[str, Any]:
        # What every ok task of the run's jobs (and shard) cost when it ran: the manifest's
        # tasks only, from every ledger of the output (one more walk of the expansion).
        spent_by_job = ok_costs_by_job(self.options.selection.tasks(self.manifest),
                                       self.output.ok_costs(), {job for job, _ in plan.by_model})
        return summarize(plan, self.counters, self.tally, elapsed=time.time() - started,
                         budget=self.spend.limit, spent_by_job=spent_by_job)

    async def _refresh_derived(self, done: set[str]) -> None:
        redone = await refresh_derived(self.manifest, self.options.selection, self.output,
                                       self.deriver, done, self.stops.crashed)
        if redone:
            log.info("derived files of %s made again from the kept images (no request)",
                     plural(redone, "task"))

    # ------------------------------------------------------------------ supervision

    async def _run_tasks(self, done: set[str], failed: set[str]) -> None:
        async with equipped(self.providers, Layout(self.output.root)) as equipment:
            self.stops.lanes = equipment.lanes
            self.course = Course(self.output, equipment.saver, self.deriver, self.spend,
                                 self.stops, self.counters, self.tally, failed)
            producers = [asyncio.create_task(self._produce(name, lane, done, failed))
                         for name, lane in equipment.lanes.items()]
            self._workers = [asyncio.create_task(self._work(lane))
                             for lane in equipment.lanes.values()
                             for _ in range(lane.config.concurrency)]
            ticker = asyncio.create_task(self._tick())
            try:
                await self._wait_for_workers()
            finally:
                helpers = [*producers, ticker, *self._workers, *self.course.retrying]
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)

    async def _all_done(self) -> None:
        """Every worker has seen the end of its queue and every retry has finished (a retry
        may start another before it ends)."""
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self.course and self.course.retrying:
            await asyncio.gather(*list(self.course.retrying), return_exceptions=True)

    async def _wait_for_workers(self) -> None:
        all_done: asyncio.Future[Any] = asyncio.ensure_future(self._all_done())
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.stops.stopping.wait())
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

    def _cancel_idle_workers(self) -> None:
        assert self.course is not None
        for worker in [*self._workers, *self.course.retrying]:
            if worker not in self.course.in_flight:
                worker.cancel()

    def _on_signal(self, count: int) -> None:
        """The first signal stops new requests; the second cancels those in flight, and the
        paid results waiting for an upload slot."""
        if count == 1:
            self.stops.stopping.set()
            return
        if self.course is not None:
            for task in [*self._workers, *self.course.retrying,
                         *self.course.keeper.keeping]:
                task.cancel()

    async def _tick(self) -> None:
        """Redraw the progress ten times a second, not once per task (a bar's redraw costs
        more than a fast endpoint's answer)."""
        assert self._progress is not None
        while True:
            await asyncio.sleep(min(self.options.log_every, 0.1))
            self._progress.update()

    # ------------------------------------------------------------------ producing, working

    async def _produce(self, name: str, lane: Lane, done: set[str], failed: set[str]) -> None:
        for task in _to_send(self.manifest, self.options.selection, done, failed):
            if self.stops.stopping.is_set() or lane.stopped:
                break
            if task.provider == name:
                await lane.queue.put(task)
        for _ in range(lane.config.concurrency):
            await lane.queue.put(None)

    async def _work(self, lane: Lane) -> None:
        assert self.course is not None
        try:
            while (task := await lane.queue.get()) is not None:
                if self.stops.stopping.is_set():
                    return
                if lane.stopped:
                    continue  # left pending: the provider cannot take it now
                await self.course.take(lane, task)
        except Exception as exc:  # batcher's own fault (a full disk, a bug): stop, never hang
            self.stops.crashed(exc)


def _to_send(manifest: Manifest, selection: Selection, done: set[str],
             failed: set[str]) -> Iterator[Task]:
    """The tasks a run sends, in expansion order, ``--limit`` counted over all of them."""
    sent = 0
    for task, sends in selection.walk(manifest, done, failed):
        if selection.limit is not None and sent >= selection.limit:
            return  # nothing later can be sent
        if sends:
            sent += 1
            yield task
