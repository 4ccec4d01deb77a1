"""Issue #11 "Spend": prices in the manifest, estimates in `plan`, each task's cost in the
ledger, cost fields in summary.json, status and the contact sheet, and the budget that stops a
run. Requests are counted at the built-in server on 127.0.0.1."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import ledger_rows, provider_block, run_cli, start_cli, write_manifest
from s3server import S3Server, s3, store_env

from batcher.errors import ManifestError, UsageError
from batcher.manifest import load_manifest
from batcher.plan import DEFAULT_OUTPUT_TOKENS, Selection, make_plan
from batcher.providers.prices import Price, answer_cost
from batcher.run import Outcome, RunOptions, run
from batcher.store.ledger import Ledger

__all__ = ["s3"]  # a fixture, used by name

IMAGES = "/images/generations"
CHAT = "/chat/completions"
IMAGE_PRICE = 0.01  # flux.1-schnell, per image
REQUEST_PRICE = 0.001  # flux.1-dev, per request, on top of its image price
CHAT_IN, CHAT_OUT = 0.5, 1.5  # local-chat, per 1M tokens

PRICES = f"""
prices:
  flux.1-schnell: {{image: {IMAGE_PRICE}}}
  flux.1-dev: {{image: 0.02, request: {REQUEST_PRICE}}}
  local-chat: {{input: {CHAT_IN}, output: {CHAT_OUT}}}
"""


async def run_manifest(path: Path, **options: Any) -> Outcome:
    manifest = load_manifest(path)
    return await run(manifest, RunOptions(progress=False, handle_signals=False, **options))


def posts(server: Any, suffix: str = IMAGES) -> int:
    return len(server.stats.matching(suffix))


def images_job(name: str, count: int, *, model: str = "flux.1-schnell", n: int = 1) -> str:
    return (f"  - name: {name}\n    type: image\n    provider: test\n    model: {model}\n"
            f"    prompts: {json.dumps([f'{name} picture {i}' for i in range(count)])}\n"
            f"    params: {{size: 256x256, response_format: b64_json, n: {n}}}\n")


def chat_job(name: str, prompts: list[str], *, max_tokens: int | None = 40) -> str:
    params = f"\n    params: {{max_tokens: {max_tokens}}}" if max_tokens else ""
    return (f"  - name: {name}\n    type: chat\n    provider: test\n    model: local-chat\n"
            f"    prompts: {json.dumps(prompts)}{params}\n")


def manifest(tmp_path: Path, server: Any, jobs: str, *, prices: str = PRICES,
             top: str = "", output: str = "out", **provider: Any) -> Path:
    text = (f"name: spend\noutput: {output}\n{top}"
            + provider_block(server, extra=prices, **provider) + "jobs:\n" + jobs)
    return write_manifest(tmp_path, text)


def summary_of(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "out" / "summary.json").read_text())


# --------------------------------------------------------------------------- plan


def test_plan_estimates_per_model_job_and_total_with_unknown_prices_shown_as_unknown(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    jobs = (images_job("shots", 3, n=2) + images_job("dev", 2, model="flux.1-dev")
            + images_job("nopriced", 2, model="local-image")
            + chat_job("captions", ["abcd" * 25]))  # 100 characters: 25 tokens estimated
    path = manifest(tmp_path, server, jobs)

    done = run_cli("plan", str(path), cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    lines = {line.split()[0] + " " + line.split()[1]: line for line in done.stdout.splitlines()
             if line.split() and line.split()[0] in {"shots", "dev", "nopriced", "captions"}}
    assert lines["shots flux.1-schnell"].endswith("$0.0600")  # 3 tasks x n=2 x $0.01
    assert lines["dev flux.1-dev"].endswith("$0.0420")  # 2 x ($0.02 + $0.001), 3 digits
    assert lines["nopriced local-image"].endswith("unknown")  # never $0.00
    assert lines["captions local-chat"].endswith("<= $0.0000725")
    total = [line for line in done.stdout.splitlines() if line.startswith("total")][0]
    assert total.endswith("+ 2 unknown")
    assert "upper estimate" in done.stdout
    assert "cost unknown for local-image" in done.stdout
    assert posts(server) == 0 and posts(server, CHAT) == 0  # plan sends nothing


async def test_plan_estimates_only_what_is_left_to_run(tmp_path: Path, server_factory: Any) -> None:
    server = await server_factory()
    path = manifest(tmp_path, server, images_job("shots", 6))
    outcome = await run_manifest(path, selection=_limit(4))
    assert outcome.summary["ok"] == 4

    loaded = load_manifest(path)
    with Ledger(tmp_path / "out" / "ledger.sqlite", readonly=True) as ledger:
        done, failed = ledger.statuses(tmp_path / "out")
    plan = make_plan(loaded, Selection(), done, failed)
    assert plan.totals.to_run == 2
    assert math.isclose(plan.totals.cost.usd, 2 * IMAGE_PRICE)  # done tasks cost nothing to plan


def _limit(count: int) -> Selection:
    return Selection(limit=count)


# --------------------------------------------------------------------------- run


async def test_each_task_costs_what_it_returned_and_jobs_add_up_to_the_total(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    jobs = (images_job("shots", 3, n=2) + images_job("dev", 2, model="flux.1-dev")
            + chat_job("captions", ["a harbour at dawn", "a city at night, in rain"]))
    path = manifest(tmp_path, server, jobs)

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0
    rows = ledger_rows(tmp_path / "out", decode=True)
    for row in rows:
        if row["model"] == "flux.1-schnell":
            assert len(row["files"]) == 2
            assert math.isclose(row["cost_usd"], 2 * IMAGE_PRICE)
        elif row["model"] == "flux.1-dev":
            assert math.isclose(row["cost_usd"], 0.02 + REQUEST_PRICE)
        else:  # chat: from the usage the server answered with
            usage = row["usage"]
            expected = (usage["prompt_tokens"] * CHAT_IN
                        + usage["completion_tokens"] * CHAT_OUT) / 1e6
            assert usage["completion_tokens"] > 0 and math.isclose(row["cost_usd"], expected)
    summary = summary_of(tmp_path)
    assert summary == outcome.summary
    ledger_total = sum(row["cost_usd"] for row in rows)
    assert math.isclose(summary["cost_usd"], ledger_total, abs_tol=1e-6)
    assert math.isclose(summary["cost_total_usd"], ledger_total, abs_tol=1e-6)
    assert summary["cost_unknown"] == 0
    by_job = summary["jobs"]
    assert math.isclose(sum(job["cost_usd"] for job in by_job.values()), summary["cost_usd"],
                        abs_tol=1e-6)
    assert math.isclose(by_job["shots"]["cost_usd"], 6 * IMAGE_PRICE)

    # A second run pays nothing more: this run's cost is 0, every ok task's cost stays.
    again = await run_manifest(path)
    assert again.summary["cost_usd"] == 0.0
    assert math.isclose(again.summary["cost_total_usd"], ledger_total, abs_tol=1e-6)

    status = run_cli("status", str(path), "--json", cwd=tmp_path)
    report = json.loads(status.stdout)
    assert math.isclose(report["cost_usd"], ledger_total, abs_tol=1e-6)
    assert report["cost_unknown"] == 0
    html = (tmp_path / "out" / "index.html").read_text()
    assert f"spent: ${ledger_total:,.2f}" in html
    line = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert line["metadata"]["cost_usd"] is not None


async def test_unknown_prices_are_unknown_never_zero(tmp_path: Path, server_factory: Any) -> None:
    server = await server_factory()
    path = manifest(tmp_path, server, images_job("shots", 2)
                    + images_job("pro", 3, model="local-image"))
    outcome = await run_manifest(path)
    assert outcome.exit_code == 0
    summary = outcome.summary
    assert summary["jobs"]["pro"]["cost_usd"] is None
    assert summary["jobs"]["pro"]["cost_total_usd"] is None
    assert summary["jobs"]["pro"]["cost_unknown"] == 3
    assert math.isclose(summary["cost_total_usd"], 2 * IMAGE_PRICE)  # the known part
    assert summary["cost_unknown"] == 3
    rows = {row["model"]: row for row in ledger_rows(tmp_path / "out")}
    assert rows["local-image"]["cost_usd"] is None

    status = run_cli("status", str(path), cwd=tmp_path)
    pro = [line for line in status.stdout.splitlines() if line.startswith("pro ")][0]
    assert pro.endswith("unknown")
    assert "+ 3 unknown" in status.stdout


# --------------------------------------------------------------------------- the budget


def test_a_budget_stops_the_run_at_about_half_and_a_larger_one_finishes_without_repaying(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server(latency=0.05)
    path = manifest(tmp_path, server, images_job("shots", 20), concurrency=4)

    first = run_cli("run", str(path), "--no-progress", "--budget", "0.105", cwd=tmp_path)

    assert first.returncode == 1, first.stderr
    assert "the budget stopped the run" in first.stderr
    assert "spent $0.100 this run" in first.stderr
    summary = summary_of(tmp_path)
    assert summary["cost_usd"] <= 0.105
    assert summary["ok"] == 10 and summary["pending"] == 10 and summary["failed"] == 0
    assert posts(server) == 10  # nothing started past the budget
    assert summary["budget_usd"] == 0.105

    second = run_cli("run", str(path), "--no-progress", "--budget", "1", cwd=tmp_path)

    assert second.returncode == 0, second.stderr
    summary = summary_of(tmp_path)
    assert summary["ok"] == 20 and summary["ran"] == 10
    assert posts(server) == 20  # the first ten were not paid again
    assert math.isclose(summary["cost_usd"], 10 * IMAGE_PRICE)
    assert math.isclose(summary["cost_total_usd"], 20 * IMAGE_PRICE)


async def test_the_manifest_budget_holds_and_the_flag_overrides_it(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = manifest(tmp_path, server, images_job("shots", 6), top="budget: 0.03\n")
    outcome = await run_manifest(path)
    assert outcome.exit_code == 1 and outcome.summary["ok"] == 3 and posts(server) == 3
    assert outcome.message is not None and "budget" in outcome.message
    outcome = await run_manifest(path, budget=0.05)
    assert outcome.exit_code == 0 and outcome.summary["ok"] == 6 and posts(server) == 6


def test_a_budget_with_a_model_of_unknown_price_is_refused_before_any_request(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = manifest(tmp_path, server, images_job("shots", 2)
                    + images_job("pro", 2, model="local-image"))

    done = run_cli("run", str(path), "--no-progress", "--budget", "5", cwd=tmp_path)

    assert done.returncode == 2
    assert "no price for test/local-image" in done.stderr
    assert "Traceback" not in done.stderr
    assert posts(server) == 0


async def test_retries_after_a_5xx_count_toward_the_budget_and_a_429_does_not(
    tmp_path: Path, server_factory: Any
) -> None:
    # Every body fails once with a 500, then succeeds: each task is paid twice as far as
    # batcher can know, so a budget for 6 tasks runs 3.
    server = await server_factory(fault_rate=1.0, fault_kinds=("500",))
    path = manifest(tmp_path, server, images_job("shots", 6), concurrency=1)
    outcome = await run_manifest(path, budget=0.06)
    assert outcome.summary["ok"] == 3 and outcome.summary["pending"] == 3
    assert outcome.summary["retries"] == 3 and posts(server) == 6
    assert math.isclose(outcome.summary["cost_usd"], 6 * IMAGE_PRICE)
    for row in ledger_rows(tmp_path / "out"):
        assert math.isclose(row["cost_usd"], 2 * IMAGE_PRICE)

    # A 429 is a refusal: it cost nothing.
    limited = await server_factory(fault_rate=1.0, fault_kinds=("429",))
    other = tmp_path / "other"
    other.mkdir()
    path = manifest(other, limited, images_job("shots", 2), concurrency=1)
    outcome = await run_manifest(path, output=other / "out")
    assert outcome.summary["rate_limited"] == 2
    assert math.isclose(outcome.summary["cost_usd"], 2 * IMAGE_PRICE)


async def test_an_image_model_priced_by_tokens_costs_its_usage_and_cannot_take_a_budget(
    tmp_path: Path, server_factory: Any
) -> None:
    # Priced like gpt-image models: by tokens. The built-in server's image answers carry no
    # usage, so what they cost is unknown; an estimate for a budget is impossible.
    server = await server_factory()
    prices = "prices:\n  flux.1-schnell: {input: 5, output: 40}\n"
    path = manifest(tmp_path, server, images_job("shots", 2), prices=prices)
    with pytest.raises(UsageError, match="priced by tokens"):
        await run_manifest(path, budget=1)
    assert posts(server) == 0
    outcome = await run_manifest(path)
    assert outcome.summary["cost_usd"] is None and outcome.summary["cost_unknown"] == 2
    assert answer_cost("image", Price(input=5, output=40), images=1,
                       usage={"input_tokens": 100, "output_tokens": 1000}) == \
        (100 * 5 + 1000 * 40) / 1e6


async def test_a_chat_estimate_counts_every_choice_it_asks_for(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = manifest(tmp_path, server, chat_job("captions", ["x" * 40], max_tokens=100)
                    .replace("max_tokens: 100", "max_tokens: 100, n: 3"))
    plan = make_plan(load_manifest(path), Selection(), set(), set())
    one_choice = (10 * CHAT_IN + 100 * CHAT_OUT) / 1e6
    assert math.isclose(plan.totals.cost.usd, one_choice + 2 * 100 * CHAT_OUT / 1e6)


async def test_paid_attempts_of_tasks_left_pending_are_in_the_runs_spend(
    tmp_path: Path, server_factory: Any
) -> None:
    # Every first attempt fails with a 500 (counted as paid): four start, fail, and one retry
    # fits the budget; the other three tasks stay pending, and what their first attempts cost
    # is still this run's spend.
    server = await server_factory(fault_rate=1.0, fault_kinds=("500",))
    path = manifest(tmp_path, server, images_job("shots", 8), concurrency=4)
    outcome = await run_manifest(path, budget=0.05)
    summary = outcome.summary
    assert summary["ok"] == 1 and summary["pending"] == 7
    paid = posts(server) * IMAGE_PRICE
    assert posts(server) == 5 and math.isclose(summary["cost_usd"], paid, abs_tol=1e-6)
    assert math.isclose(summary["jobs"]["shots"]["cost_usd"], paid, abs_tol=1e-6)
    assert outcome.message is not None and "spent $0.0500 this run" in outcome.message
    assert math.isclose(summary["cost_total_usd"], 2 * IMAGE_PRICE)  # the ok task, twice


def test_a_run_of_unknown_price_says_so_beside_the_known_part(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    jobs = images_job("shots", 2) + images_job("free", 2, model="local-image")
    path = manifest(tmp_path, server, jobs)

    done = run_cli("run", str(path), "--no-progress", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    summary = summary_of(tmp_path)
    assert math.isclose(summary["cost_usd"], 2 * IMAGE_PRICE, abs_tol=1e-6)
    assert summary["cost_unknown_requests"] == 2 and summary["cost_unknown"] == 2
    assert summary["jobs"]["free"]["cost_usd"] is None
    assert "spent $0.0200 this run (+ 2 requests of unknown price)" in done.stderr
    only = run_cli("run", str(path), "--no-progress", "--only", "free", "--output", "again",
                   cwd=tmp_path)
    assert only.returncode == 0, only.stderr
    assert "spent unknown this run (+ 2 requests of unknown price)" in only.stderr


async def test_a_regeneration_after_a_lost_download_is_paid_and_counted(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory(fault_rate=1.0, fault_kinds=("url_404",))
    jobs = images_job("shots", 2).replace("b64_json", "url")
    path = manifest(tmp_path, server, jobs, concurrency=1)
    outcome = await run_manifest(path)
    assert outcome.exit_code == 0 and posts(server) == 4  # each generated twice
    for row in ledger_rows(tmp_path / "out"):
        assert math.isclose(row["cost_usd"], 2 * IMAGE_PRICE)


async def test_chat_without_max_tokens_is_estimated_at_the_default_bound(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = manifest(tmp_path, server, chat_job("captions", ["x" * 40, "y" * 40],
                                               max_tokens=None))
    one = (10 * CHAT_IN + DEFAULT_OUTPUT_TOKENS * CHAT_OUT) / 1e6
    # Room for one request's upper estimate, not two: the second is refused, though both
    # answers together would cost far less than the budget (were the bound ignored, both
    # would run).
    outcome = await run_manifest(path, budget=one * 1.5)
    assert outcome.summary["ok"] == 1 and outcome.summary["pending"] == 1
    assert outcome.summary["cost_usd"] <= one * 1.5
    assert posts(server, CHAT) == outcome.summary["ok"] + outcome.summary["failed"]


def test_progress_lines_show_the_spend(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server(latency=0.2)
    path = manifest(tmp_path, server, images_job("shots", 6), concurrency=1)
    done = run_cli("run", str(path), "--log-every", "0.1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("progress ")]
    assert progress and all(" spent=$" in line for line in progress)
    # One request at a time, each image answered at its price: a line written after N tasks
    # were kept shows N images' worth, or N + 1 when the next answer was paid but not yet kept.
    shown = [(int(re.search(r" ok=(\d+)", line)[1]),  # type: ignore[index]
              re.search(r" spent=(\S+)", line)[1]) for line in progress]  # type: ignore[index]
    assert any(ok for ok, _spent in shown), progress

    def amount(images: int) -> str:  # three significant digits below $1: $0.0200 for two
        return f"${images * IMAGE_PRICE:.4f}" if images else "$0.00"
    assert all(spent in (amount(ok), amount(ok + 1)) for ok, spent in shown), progress


async def test_one_budget_holds_across_providers_each_at_its_own_prices(
    tmp_path: Path, server_factory: Any
) -> None:
    cheap, dear = await server_factory(latency=0.02), await server_factory(latency=0.02)
    second = provider_block(dear, concurrency=2, extra="prices: {'*': {image: 0.03}}")
    second = second.replace("providers:\n  test:", "  dear:")
    path = write_manifest(tmp_path, "name: spend\noutput: out\n"
                          + provider_block(cheap, concurrency=2, extra=PRICES) + second
                          + "jobs:\n" + images_job("cheap", 10)
                          + images_job("dear", 10).replace("provider: test", "provider: dear"))

    outcome = await run_manifest(path, budget=0.2)

    summary = outcome.summary
    assert outcome.exit_code == 1 and summary["pending"] > 0
    assert outcome.message is not None and "budget" in outcome.message
    paid = posts(cheap) * IMAGE_PRICE + posts(dear) * 0.03
    assert math.isclose(summary["cost_usd"], paid, abs_tol=1e-6) and paid <= 0.2 + 1e-9
    # Each answer costs its estimate, so the run stops only when the next request would pass
    # the budget: within the dearer estimate of it, with both providers paid for.
    assert paid > 0.2 - 0.03 + 1e-9, paid
    assert posts(cheap) and posts(dear)
    assert math.isclose(summary["jobs"]["cheap"]["cost_usd"], posts(cheap) * IMAGE_PRICE,
                        abs_tol=1e-6)
    assert math.isclose(summary["jobs"]["dear"]["cost_usd"], posts(dear) * 0.03, abs_tol=1e-6)


def test_shards_into_a_store_keep_their_own_budgets_and_status_adds_up_their_spend(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server(latency=0.02)
    url = f"s3://{s3.bucket()}/spend"
    path = manifest(tmp_path, server, images_job("shots", 24), output=url, concurrency=2)

    def shards(budget: str) -> None:
        running = [start_cli("run", str(path), "--no-progress", "--shard", f"{i}/2",
                             "--budget", budget, env=store_env(s3.url, str(tmp_path / f"m{i}")))
                   for i in (1, 2)]
        for shard in running:
            _out, err = shard.communicate(timeout=120)
            assert "Traceback" not in err, err
            if budget == "1":
                assert shard.returncode == 0, err
            else:  # each shard stopped by its own budget, having spent it
                assert shard.returncode == 1, err
                assert "the budget stopped the run" in err and "spent $0.0500 this run" in err

    shards("0.05")  # each shard may spend $0.05: five images each
    assert posts(server) == 10

    status = run_cli("status", str(path), "--json",
                     env=store_env(s3.url, str(tmp_path / "fresh")))
    report = json.loads(status.stdout)
    assert status.returncode == 1 and report["ok"] == 10
    assert math.isclose(report["cost_usd"], 10 * IMAGE_PRICE, abs_tol=1e-6)

    shards("1")
    assert posts(server) == 24  # nothing paid twice
    status = run_cli("status", str(path), "--json",
                     env=store_env(s3.url, str(tmp_path / "fresh-2")))
    report = json.loads(status.stdout)
    assert status.returncode == 0 and report["ok"] == 24
    assert math.isclose(report["cost_usd"], 24 * IMAGE_PRICE, abs_tol=1e-6)


# --------------------------------------------------------------------------- manifest errors


@pytest.mark.parametrize(("prices", "line", "field", "words"), [
    ("prices:\n  flux.1-schnell: {image: -1}", 6, "providers.test.prices.flux.1-schnell.image",
     "0 or more"),
    ("prices:\n  flux.1-schnell: {per_image: 0.1}", 6,
     "providers.test.prices.flux.1-schnell.per_image", "unknown price field"),
    ("prices:\n  flux.1-schnell: 0.1", 6, "providers.test.prices.flux.1-schnell",
     "must be a mapping"),
    ("prices: [1, 2]", 5, "providers.test.prices", "must be a mapping"),
])
def test_bad_prices_name_file_line_and_field(
    tmp_path: Path, prices: str, line: int, field: str, words: str
) -> None:
    text = ("name: t\nproviders:\n  test:\n    base_url: http://127.0.0.1:9/v1\n"
            + "".join(f"    {row}\n" for row in prices.splitlines())
            + "jobs:\n" + images_job("shots", 1))
    path = write_manifest(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.line == line and caught.value.field == field
    assert words in str(caught.value)
    done = run_cli("validate", str(path), cwd=tmp_path)
    assert done.returncode == 2 and f"{path}:{line}: {field}" in done.stderr


@pytest.mark.parametrize("budget", ["0", "-3", "lots", "true"])
def test_a_bad_budget_is_a_manifest_error_and_a_bad_flag_a_usage_error(
    tmp_path: Path, budget: str
) -> None:
    text = f"name: t\nbudget: {budget}\njobs:\n" + images_job("shots", 1)
    path = write_manifest(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.line == 2 and caught.value.field == "budget"
    flag = run_cli("run", str(path), "--budget", budget, cwd=tmp_path)
    assert flag.returncode == 2 and "--budget" in flag.stderr

