"""One task's course (issue 19): the too-long-wait stop decided with every other verdict in
``retry.classify``, the budget as an ``async with`` gate, and the run reached through
``batcher.run``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ledger_rows, write_manifest
from scripted import Reply, ScriptedServer

from batcher.errors import HTTPStatusError
from batcher.manifest import load_manifest
from batcher.run import Outcome, RunOptions, run
from batcher.run.retry import Action, Cause, classify
from batcher.run.spend import OverBudget, Spend

PROMPTS = ["a", "b", "c", "d"]


# --------------------------------------------------------------------------- max_wait


@pytest.mark.parametrize("status", [429, 503])
def test_a_wait_over_max_wait_stops_the_provider(status: int) -> None:
    verdict = classify(HTTPStatusError(status, "later", retry_after=120.0), max_wait=60.0)
    assert verdict.action is Action.STOP_PROVIDER
    assert verdict.cause is Cause.WAIT_TOO_LONG
    assert verdict.rate_limited is (status == 429)  # a 429 is still counted as one


def test_a_wait_up_to_max_wait_is_retried() -> None:
    verdict = classify(HTTPStatusError(503, "later", retry_after=60.0), max_wait=60.0)
    assert verdict.action is Action.RETRY and verdict.wait == 60.0 and verdict.cause is None
    assert classify(HTTPStatusError(503, "later", retry_after=1e9)).action is Action.RETRY


@pytest.fixture
def slow_server() -> Iterator[ScriptedServer]:
    """Every request answered 503 with a Retry-After of ten minutes."""
    server = ScriptedServer().start()
    server.default = Reply(json.dumps({"error": {"message": "busy"}}).encode(), status=503,
                           headers=(("Retry-After", "600"),))
    yield server
    server.stop()


async def test_a_5xx_asking_to_wait_past_max_wait_sends_nothing_more(
        slow_server: ScriptedServer, tmp_path: Path) -> None:
    path = write_manifest(tmp_path, f"""
        name: patience
        providers:
          slow: {{base_url: "{slow_server.api_url}", concurrency: 1, rate_limit: null,
                  retries: 5, max_wait: 30}}
        jobs:
          - name: talk
            type: chat
            provider: slow
            model: m
            prompts: {json.dumps(PROMPTS)}
    """)

    outcome: Outcome = await asyncio.wait_for(
        run(load_manifest(path), RunOptions(progress=False, handle_signals=False)), 60)

    assert sum(slow_server.requests.values()) == 1  # no retry, no other task sent
    assert outcome.exit_code == 1
    assert outcome.message is not None
    assert "slow" in outcome.message and "max_wait 30" in outcome.message
    assert (outcome.summary["failed"], outcome.summary["pending"]) == (0, len(PROMPTS))
    assert ledger_rows(tmp_path / "output" / "patience") == []


# --------------------------------------------------------------------------- the budget's gate


async def test_a_settled_reservation_becomes_spend() -> None:
    spend = Spend(limit=1.0)
    async with spend.reserve(0.4) as reservation:
        assert spend.reserved == pytest.approx(0.4)
        reservation.settle(0.25)
    assert (spend.spent, spend.reserved, spend.assumed) == (pytest.approx(0.25), 0.0, 0.0)


async def test_a_request_cancelled_in_flight_keeps_its_estimate_held() -> None:
    spend = Spend(limit=1.0)
    entered = asyncio.Event()

    async def send() -> None:
        async with spend.reserve(0.4):
            entered.set()
            await asyncio.Event().wait()  # in flight until cancelled

    sending = asyncio.create_task(send())
    await entered.wait()
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    # It may have been paid: the budget keeps holding it, never reported as spend.
    assert (spend.spent, spend.reserved, spend.assumed) == (0.0, 0.0, pytest.approx(0.4))
    assert spend.held == pytest.approx(0.4)


async def test_a_request_past_the_budget_never_enters_the_gate() -> None:
    spend = Spend(limit=0.5)
    async with spend.reserve(0.4) as first:
        first.settle(0.4)
    entered = False
    with pytest.raises(OverBudget):
        async with spend.reserve(0.2):
            entered = True
    assert not entered
    assert spend.reserved == 0.0 and spend.held == pytest.approx(0.4)
