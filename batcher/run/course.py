"""The course of one task: from its send to a kept record.

A task waits for a turn of its provider's pacer (concurrency, rate, 429 pause), passes the
budget's gate (its estimate reserved, :meth:`batcher.run.spend.Spend.reserve`), is sent, and its
answer becomes files, a sidecar and a ledger record. Every retry rule is applied in one place,
:meth:`Course.after_failure`, to the verdict of :func:`batcher.run.retry.classify`. A task
waiting out a backoff gives its worker back and re-enters when its wait ends.

A paid result is kept by a task of its own, shielded from its worker's cancellation (as arq
shields its bookkeeping); the pool waits for it with the uploads. A result's files are renamed
into place before its ledger row is queued, and queuing a row is synchronous, so a cancellation
can lose a request in flight but never split a file from its row.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batcher.backoff import backoff
from batcher.bodies import InputImages
from batcher.errors import BatcherError, DownloadError, NameTaken, ProviderError, TransportError
from batcher.manifest.tasks import Task
from batcher.plan import estimate
from batcher.providers.base import ImageAnswer
from batcher.providers.prices import Price, answer_cost, failed_attempt_cost
from batcher.records import Record
from batcher.reports.progress import Counters
from batcher.reports.summary import JobTally
from batcher.run.outcome import Stops
from batcher.run.retry import Action, classify
from batcher.run.saving import Saver, task_boundary
from batcher.run.setup import Lane
from batcher.run.spend import OverBudget, Reservation, Spend
from batcher.store.derive import Deriver
from batcher.store.names import Layout
from batcher.store.output import Output
from batcher.store.rederive import replace_derived

log = logging.getLogger(__name__)
wait_out = asyncio.sleep  # how a task waits out its backoff (tests gate it on events)
# Tasks of one provider that may wait out a backoff away from a worker at once; past this a
# worker waits itself, so a provider failing everything never opens a whole manifest's tasks.
MAX_BACKING_OFF = 1024

Kept = tuple[Record, str | None]  # a task's record and the name of its sidecar


@dataclass(slots=True)
class _Bill:
    """What one task cost in this run so far, retries included; ``None`` once a part of it
    was of unknown price."""

    usd: float | None = 0.0

    def add(self, cost: float | None) -> None:
        self.usd = None if cost is None or self.usd is None else self.usd + cost


@dataclass(slots=True)
class Tries:
    """One task's attempts in this run so far: carried across its backoffs."""

    started: float  # when the task was first taken (before its turn of the pacer)
    attempt: int = 0
    lost_downloads: int = 0  # generations paid for whose images could not be downloaded
    bill: _Bill = field(default_factory=_Bill)


@dataclass(frozen=True, slots=True)
class Retry:
    """Send the task again after ``wait`` seconds (``None``: at once, a 429 has paused the
    whole provider), waited out ``away`` from its worker (in a task of its own) or in it."""

    wait: float | None = None
    away: bool = False


class Course:
    """Takes the tasks the workers hand it from their send to a kept record."""

    def __init__(self, output: Output, saver: Saver, deriver: Deriver, spend: Spend,
                 stops: Stops, counters: Counters, tally: dict[str, JobTally],
                 failed: set[str]) -> None:
        self.output = output
        self.ledger = output.ledger
        self.layout = Layout(output.root)
        self.saver = saver
        self.deriver = deriver
        self.spend = spend
        self.stops = stops
        self.counters = counters
        self.tally = tally
        self.keeper = Keeper(output, counters, tally, failed, stops.crashed)
        self.images = InputImages()
        self.in_flight: set[asyncio.Task[Any]] = set()  # workers with a request under way
        # Tasks waiting out a backoff, then trying again, each in an asyncio task of its own.
        self.retrying: set[asyncio.Task[None]] = set()

    async def take(self, lane: Lane, task: Task, tries: Tries | None = None) -> None:
        """Try a task until it is kept, left pending or due for a backoff away from this
        worker, which it waits out in a task of its own while the worker takes the next one."""
        if tries is None:
            tries = Tries(time.time())
        step = await self._execute(lane, task, tries)
        if isinstance(step, Retry):
            retry = asyncio.create_task(self._retry_after(step.wait, lane, task, tries))
            self.retrying.add(retry)
            lane.backing_off += 1
            retry.add_done_callback(functools.partial(self._retry_done, lane))
        elif step is not None:
            record, sidecar = step
            await asyncio.shield(self.keeper.keep(record, sidecar))
            if record.status == "ok" and self.deriver.spec(task.job) is not None:
                # After the paid image is kept: a kill while deriving loses only
                # derived files, which the next run makes with no request.
                await replace_derived(self.output, self.deriver, task, record,
                                      self.stops.crashed)

    def _retry_done(self, lane: Lane, retry: asyncio.Task[None]) -> None:
        self.retrying.discard(retry)
        lane.backing_off -= 1

    async def _retry_after(self, seconds: float | None, lane: Lane, task: Task,
                           tries: Tries) -> None:
        """Wait out a task's backoff holding no worker, then try it again: its next request
        waits for a turn of the provider's pacer (concurrency, rate, 429 pause) as any other."""
        try:
            if seconds is not None:
                await wait_out(seconds)
            if self.stops.stopping.is_set() or lane.stopped:
                return  # left pending
            await self.take(lane, task, tries)
        except Exception as exc:  # batcher's own fault: stop, never hang
            self.stops.crashed(exc)

    async def _execute(self, lane: Lane, task: Task, tries: Tries) -> Kept | Retry | None:
        """Try a task until it is saved, its failure is final or it must wait out a backoff
        away from its worker: its record and sidecar, that retry, or ``None`` (pending)."""
        if tries.attempt == 0 and (taken := self._name_taken(task)) is not None:
            # Never sent: its answer would overwrite another task's files.
            return self._failed(task, taken, tries), None
        while not lane.stopped:
            tries.attempt += 1
            try:
                kept = await self._attempt(lane, task, tries)
            except ProviderError as error:
                step = self.after_failure(lane, task, error, tries)
                if not isinstance(step, Retry) or step.away:
                    return step  # failed for good, pending, or its worker takes another task
                if step.wait is not None:  # None: a 429 paused the whole provider
                    await wait_out(step.wait)
                continue
            lane.answered = True
            return kept  # None: stopped while waiting for a turn, never sent
        return None

    def after_failure(self, lane: Lane, task: Task, error: ProviderError,
                      tries: Tries) -> Kept | Retry | None:
        """Every retry rule, in one place: a failed attempt makes its task fail for good (its
        record), wait out a backoff, or stay pending (``None``)."""
        if not (isinstance(error, TransportError) and not error.reached):
            lane.answered = True  # a status, a reset, a timeout: it is there
        config = lane.config
        verdict = classify(error, max_wait=config.max_wait)
        self.counters.rate_limited += verdict.rate_limited
        if verdict.cause is not None:  # the run or the provider stops: the task stays pending
            self.stops.verdict(lane, verdict, error)
            return None
        if verdict.rate_limited:  # even on the last attempt: the whole provider must slow down
            lane.pacer.pause(verdict.wait if verdict.wait is not None else backoff(tries.attempt))
            lane.pacer.slow_down()
        retry = verdict.action is Action.RETRY and tries.attempt <= config.retries
        if not retry and not lane.answered:
            # Never reached: pending, not failed. After as many such tasks as the provider's
            # concurrency it is stopped, so a wrong base_url or a server that is down does not
            # grind through every task's retries.
            lane.unreachable += 1
            if lane.unreachable >= config.concurrency:
                self.stops.unreachable(lane)
            return None
        if retry and isinstance(error, DownloadError):
            # The downloader has retried already; each retry here pays again.
            tries.lost_downloads += 1
            retry = tries.lost_downloads <= config.regenerations
        if not retry:
            return self._failed(task, error, tries), None
        if self.stops.stopping.is_set():
            return None
        self.counters.retries += 1
        log.debug("task %s attempt %d: %s; retrying", task.id, tries.attempt, error)
        if verdict.rate_limited:
            return Retry()
        # Away from the worker only once the endpoint has answered (one that never did costs
        # `concurrency` tasks' retries, not more) and without a budget (money goes to finishing
        # the tasks begun before starting others).
        away = (lane.answered and self.spend.limit is None
                and lane.backing_off < MAX_BACKING_OFF)
        wait = verdict.wait if verdict.wait is not None else backoff(tries.attempt)
        return Retry(wait, away)

    def _name_taken(self, task: Task) -> NameTaken | None:
        stem = self.layout.task_stem(task)
        owner = self.ledger.claim(stem, task.id)
        if owner is None:
            return None
        return NameTaken(f"its files would be named {stem}.*, which task {owner} owns; give "
                         "one of the two an id (or change its prompt) to run it")

    def _failed(self, task: Task, error: ProviderError, tries: Tries) -> Record:
        record = self.saver.failed(task, error, tries.attempt, tries.started)
        record.cost_usd = tries.bill.usd
        return record

    async def _attempt(self, lane: Lane, task: Task, tries: Tries) -> Kept | None:
        """One request through the provider's pacer and the budget's gate; ``None``: stopped
        before it was sent."""
        async with lane.pacer.slot():
            if self.stops.stopping.is_set() or lane.stopped:
                return None
            try:
                await self.output.gate()  # a store's lock lost: nothing more starts
            except BatcherError as exc:
                self.stops.crashed(exc)
                return None
            price = lane.config.prices.of(task.model, task.kind)
            estimated = None if price is None else estimate(task, price)
            try:
                async with self.spend.reserve(estimated) as reservation:
                    return await self._send(lane, task, tries, reservation, price)
            except OverBudget as exc:
                self.stops.over_budget(str(exc), self.spend.limit)
                return None

    async def _send(self, lane: Lane, task: Task, tries: Tries, reservation: Reservation,
                    price: Price | None) -> Kept:
        """The request, the saving of its answer and of its sidecar: counted as in flight
        throughout, so a stop gives it the grace period rather than cancelling it between its
        files and its record."""
        self.counters.requests += 1
        worker = asyncio.current_task()
        assert worker is not None
        self.in_flight.add(worker)
        try:
            with task_boundary(task):
                try:
                    answer, logged = await self.saver.request(lane.client, task, self.images)
                except ProviderError as error:
                    self._charge(task, tries, reservation, failed_attempt_cost(
                        error, reservation.amount, kind=task.kind, price=price))
                    raise
                images = len(answer.items) if isinstance(answer, ImageAnswer) else 0
                self._charge(task, tries, reservation, None if price is None else answer_cost(
                    task.kind, price, images=images, usage=answer.usage))
                files, response = await self.saver.save(task, answer)
                record = self.saver.succeeded(task, files, answer, response, tries.attempt,
                                              tries.started)
                record.cost_usd = tries.bill.usd
                return record, await self.saver.write_sidecar(record, logged)
        finally:
            self.in_flight.discard(worker)

    def _charge(self, task: Task, tries: Tries, reservation: Reservation,
                cost: float | None) -> None:
        """What one attempt cost goes to the budget, the task's bill and its job's spend
        (tasks left pending included: their attempts were paid too)."""
        reservation.settle(cost)
        tries.bill.add(cost)
        self.tally.setdefault(task.job, JobTally()).cost.add(cost)
        self.counters.spent_usd = self.spend.spent


class Keeper:
    """Keeps paid results, each in an asyncio task of its own: a signal that cancels a worker
    (which may wait for an upload slot) does not cancel the keeping; the pool waits for it."""

    def __init__(self, output: Output, counters: Counters, tally: dict[str, JobTally],
                 failed: set[str], crashed: Callable[[BaseException], None]) -> None:
        self.output = output
        self.counters = counters
        self.tally = tally
        self.failed = failed  # the tasks that had failed before this run
        self.crashed = crashed
        self.keeping: set[asyncio.Task[None]] = set()  # paid results on their way to the output
        self.unkept = 0  # ok results paid and handed to the output, not kept (yet)

    def keep(self, record: Record, sidecar: str | None) -> asyncio.Task[None]:
        self.unkept += record.status == "ok"
        keeping = asyncio.create_task(self.output.keep(record, sidecar, functools.partial(
            self._kept, was_failed=record.id in self.failed), self.crashed))
        self.keeping.add(keeping)
        keeping.add_done_callback(self.keeping.discard)
        return keeping

    async def settle(self) -> None:
        """Wait for every paid result being kept, those handed over meanwhile included."""
        while self.keeping:
            for result in await asyncio.gather(*list(self.keeping), return_exceptions=True):
                if isinstance(result, Exception):  # its worker, cancelled, could not say so
                    self.crashed(result)

    def _kept(self, record: Record, *, was_failed: bool) -> None:
        """A task's outcome is durable: count it and queue its ledger row."""
        ok = record.status == "ok"
        self.unkept -= ok
        self.counters.ran += 1
        self.counters.ok += ok
        self.counters.failed += not ok
        tally = self.tally.setdefault(record.job, JobTally())
        tally.ran += 1
        tally.ok += ok
        tally.failed += not ok
        tally.failed_before += was_failed
        self.output.ledger.record(record)  # the progress shows it at the next tick
