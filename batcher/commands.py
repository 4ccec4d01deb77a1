"""What each command does, returning its exit code: loads, asks the store and the run, and
prints for people (the status table, the progress line and publish's lines are printed by
:mod:`batcher.reports.status`, :mod:`batcher.reports.progress` and :mod:`batcher.publish`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import functools
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from batcher.errors import AuthError, BatcherError, Interrupted, ProviderError, UsageError
from batcher.location import beside
from batcher.manifest import Manifest, load_manifest
from batcher.plan import Counts, Plan, make_plan, output_dir
from batcher.providers import OpenAICompatible, builtin_providers, open_clients, resolve_key
from batcher.providers.prices import cost_text
from batcher.providers.rates import Rate
from batcher.reports.status import (
    ledger_status,
    print_status,
    run_failures,
)
from batcher.run.pool import run as run_manifest
from batcher.run.retry import Action, classify
from batcher.run.setup import RunOptions, effective_configs, used_providers
from batcher.store import StoreURL, output_target
from batcher.store.ledger import LEDGER_NAME, Ledger
from batcher.store.view import open_view
from batcher.store.view import unlock as store_unlock
from batcher.wording import plural, usd

if TYPE_CHECKING:
    from batcher.store.stale import PruneSet


def _load(path: Path, provider: str | None, *, budget_off: bool) -> Manifest:
    """The manifest of ``run`` and ``plan``; ``--budget none`` switches its budget off."""
    manifest = load_manifest(path, provider=provider)
    return dataclasses.replace(manifest, budget=None) if budget_off else manifest


def validate(path: Path, provider: str | None) -> int:
    manifest = load_manifest(path, provider=provider)
    from batcher.publish.command import picks_warnings

    for warning in picks_warnings(manifest):  # stale picks: a warning, never an error
        print(f"warning: {warning}", file=sys.stderr)
    jobs = ", ".join(job.name for job in manifest.jobs)
    print(f"{path}: ok ({plural(len(manifest.jobs), 'job')}: {jobs})")
    return 0


async def run(path: Path, provider: str | None, options: RunOptions, *,
              prune_first: bool = False, force: bool = False, budget_off: bool = False) -> int:
    manifest = await _with_kept_seeds(_load(path, provider, budget_off=budget_off),
                                      options.output)
    if prune_first:  # a missing key or an unknown --only job stops before anything is removed
        configs = effective_configs(manifest, options,
                                    used_providers(manifest, options.selection.only))
        for config in configs.values():
            resolve_key(config)
        await _prune(manifest, options.output, dry_run=False, required=False, force=force)
    started = time.time()
    outcome = await run_manifest(manifest, options)
    summary = outcome.summary
    print(
        f"batcher: {summary['ok']} ok, {summary['failed']} failed, {summary['pending']} pending "
        f"of {summary['total']} ({summary['skipped']} already done, {summary['ran']} ran, "
        f"{_not_uploaded(summary)}"
        f"{plural(summary['retries'], 'retry')}, {summary['rate_limited']} rate-limited) in "
        f"{summary['elapsed_s']:.1f} s -> {outcome.output}",
        file=sys.stderr,
    )
    spend = _spend_line(summary, outcome.counters.priced)
    if spend:
        print(f"batcher: {spend}", file=sys.stderr)
    if outcome.message:
        print(f"batcher: {outcome.message}", file=sys.stderr)
    if summary.get("not_uploaded"):
        print(f"batcher: {plural(summary['not_uploaded'], 'paid result')} only in this "
              f"machine's working copy ({outcome.root}); the next run here uploads any still "
              "to do without a request", file=sys.stderr)
    if outcome.exit_code == Interrupted.exit_code:
        print("batcher: interrupted; run the same command to finish", file=sys.stderr)
    if outcome.counters.failed:
        _print_failures(outcome.root, started, outcome.output)
    if outcome.exit_code != 2 and any(job.asset for job in manifest.jobs):
        await _asset_sheet(manifest, options.output)
    return outcome.exit_code


def _not_uploaded(summary: dict[str, Any]) -> str:
    """Paid results a store did not get (a signal cut the uploads short, or it went down):
    they are in this machine's working copy, and the next run here uploads them."""
    count = summary.get("not_uploaded") or 0
    return f"{count} paid but not uploaded, " if count else ""


async def _asset_sheet(manifest: Manifest, output: str | Path | None) -> None:
    """An asset set's contact sheet: grouped by asset, the picks file's decisions marked."""
    from batcher.publish.marks import refresh_sheet

    try:
        await refresh_sheet(manifest, output_dir(manifest, output))
    except (BatcherError, OSError) as exc:  # the run is kept; only its sheet is plain
        print(f"batcher: the contact sheet is not grouped by asset: {exc}", file=sys.stderr)


async def _with_kept_seeds(manifest: Manifest, output: str | Path | None) -> Manifest:
    """The manifest with the seeds ``keep: N`` adds where rejects left too few variants."""
    from batcher.publish.keep import manifest_for_run

    return await manifest_for_run(manifest, output_dir(manifest, output))


def _spend_line(summary: dict[str, Any], priced: bool) -> str | None:
    """What the run spent, said when the run had prices or a budget."""
    if not priced and summary["budget_usd"] is None:
        return None  # no price at all: summary.json says unknown, a line would be noise
    text = f"spent {cost_text(summary['cost_usd'])} this run"
    if summary["cost_unknown_requests"]:
        text += f" (+ {plural(summary['cost_unknown_requests'], 'request')} of unknown price)"
    text += f"; {cost_text(summary['cost_total_usd'])} for the {summary['ok']} ok tasks"
    if summary["cost_unknown"]:
        text += f" ({summary['cost_unknown']} of them of unknown price)"
    if summary["budget_usd"] is not None:
        text += f"; budget {usd(summary['budget_usd'])}"
    return text


EXAMPLE_CHARS = 200  # an example message is a hint, not the whole provider answer


def _print_failures(root: Path, started: float, location: str) -> None:
    """The commonest reasons this run's tasks failed, one example message each."""
    with Ledger(root / LEDGER_NAME, readonly=True) as ledger:
        reasons, more = run_failures(ledger.records(), started)
    print("batcher: failed tasks by reason:", file=sys.stderr)
    for item in reasons:
        example = " ".join(item.example.split())
        if len(example) > EXAMPLE_CHARS:
            example = example[:EXAMPLE_CHARS - 3] + "..."
        print(f"  {item.count:>6}  {item.reason}: {example}", file=sys.stderr)
    if more:
        print(f"  and {plural(more, 'more reason')}: batcher status {location}",
              file=sys.stderr)


def _done_and_failed(target: Path | StoreURL) -> tuple[set[str], set[str]]:
    return asyncio.run(_statuses(target))


async def _statuses(target: Path | StoreURL) -> tuple[set[str], set[str]]:
    async with open_view(target, required=False) as view:
        return view.ledger.statuses(view.present)


def plan(path: Path, provider: str | None, options: RunOptions, *, check: bool,
         prune_first: bool = False, force: bool = False, budget_off: bool = False) -> int:
    manifest = asyncio.run(_with_kept_seeds(_load(path, provider, budget_off=budget_off),
                                            options.output))
    if prune_first:  # run --dry-run --prune: what the prune would remove, then the plan
        asyncio.run(_prune(manifest, options.output, dry_run=True, required=False,
                           force=force))
    root = output_dir(manifest, options.output)
    done, failed = _done_and_failed(root)
    configs = effective_configs(manifest, options, used_providers(manifest, options.selection.only))
    result = make_plan(manifest, options.selection, done, failed,
                       prices={name: c.prices for name, c in configs.items()})
    _print_plan(result, {name: c.rate_limit for name, c in configs.items()}, root)
    budget = options.budget if options.budget is not None else manifest.budget
    _print_estimate(result, budget)
    if check:
        return asyncio.run(_check_models(manifest, options))
    return 0


def _print_plan(result: Plan, rates: dict[str, Rate | None], root: Path | StoreURL) -> None:
    print(f"{'job':<24} {'model':<40} {'total':>9} {'done':>9} {'failed':>8} {'to run':>9}  "
          "est. cost")
    for (job, model), c in result.by_model.items():
        print(f"{job:<24} {model:<40} {c.total:>9} {c.done:>9} {c.failed:>8} {c.to_run:>9}  "
              f"{_estimate(c)}")
    for job, c in result.job_counts().items():
        if len({model for name, model in result.by_model if name == job}) > 1:
            print(f"{'job ' + job:<65} {c.total:>9} {c.done:>9} {c.failed:>8} {c.to_run:>9}  "
                  f"{_estimate(c)}")
    t = result.totals
    print(f"{'total':<65} {t.total:>9} {t.done:>9} {t.failed:>8} {t.to_run:>9}  "
          f"{_estimate(t)}")
    eta = result.eta_seconds(rates)
    limits = ", ".join(f"{name} {rate or 'unlimited'}" for name, rate in sorted(rates.items()))
    eta_text = "unknown (no rate limit)" if eta is None else _duration(eta)
    print(f"output: {root}\nrate limits: {limits}\nETA at the rate limit: {eta_text}")


def _estimate(counts: Counts) -> str:
    """The estimated cost of the tasks to run: ``<=`` marks an upper estimate (chat)."""
    return counts.cost.text(upper=counts.upper) if counts.to_run else "-"


def _print_estimate(result: Plan, budget: float | None) -> None:
    totals = result.totals
    if totals.to_run and (totals.cost.known or budget is not None):
        note = " (an upper estimate: chat output counted at max_tokens)" if totals.upper else ""
        print(f"estimated cost: {_estimate(totals)}{note}")
    if totals.unknown:
        models = sorted({model for (_job, model), c in result.by_model.items() if c.unknown})
        print(f"cost unknown for {', '.join(models)}: no price (add prices: under the "
              "provider in the manifest), or an image model priced by tokens")
    if budget is not None:
        if totals.unknown:
            verdict = "cannot be kept: a model's cost is unknown (run refuses it)"
        elif totals.cost.usd > budget:
            verdict = "the estimate passes it: a run stops when it is reached"
        else:
            verdict = "the estimate is within it"
        print(f"budget: {usd(budget)}; {verdict}")


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


async def _check_models(manifest: Manifest, options: RunOptions) -> int:
    """Ask each provider's /models; flag model names it does not serve. Exit 2 if any."""
    configs = effective_configs(manifest, options, used_providers(manifest, options.selection.only))
    keys = {name: resolve_key(config) for name, config in configs.items()}
    wanted: dict[str, set[str]] = {}
    for job in manifest.jobs:
        if job.provider in configs:
            wanted.setdefault(job.provider, set()).update(job.models)
    listed = {job.name for job in manifest.jobs if job.file is not None}
    for task in options.selection.tasks(manifest) if listed else ():  # models in JSONL files
        if task.job in listed:
            wanted.setdefault(task.provider, set()).add(task.model)
    missing = 0
    async with aiohttp.ClientSession() as session, open_clients(configs, keys, session) as clients:
        for name, client in clients.items():
            served = set(await _models_of(client))
            for model in sorted(wanted.get(name, set()) - served):
                missing += 1
                print(f"check: provider {name} does not serve model {model!r}")
    print(f"check: {plural(missing, 'model name')} not served" if missing else
          "check: every model is served")
    return 2 if missing else 0


async def _models_of(client: OpenAICompatible) -> list[str]:
    """The provider's model list, its failures put as a user would want to read them."""
    name = client.config.name
    try:
        return await client.list_models()
    except ProviderError as exc:
        if classify(exc).action is Action.STOP_RUN:
            raise AuthError(f"provider {name} refused the key: {exc}") from exc
        raise BatcherError(f"provider {name} at {client.base_url}: {exc}") from exc


async def models(name: str, manifest_path: Path | None) -> int:
    providers = load_manifest(manifest_path).providers if manifest_path else builtin_providers()
    config = providers.get(name)
    if config is None:
        raise UsageError(f"unknown provider {name!r} (known: {', '.join(sorted(providers))})")
    keys = {name: resolve_key(config)}
    async with aiohttp.ClientSession() as session, \
            open_clients({name: config}, keys, session) as clients:
        for model in await _models_of(clients[name]):
            print(model)
    return 0


def serve(args: argparse.Namespace) -> int:
    from batcher.server import ServerOptions, serve_forever

    try:
        options = ServerOptions(
            host=args.host, port=args.port, latency=args.latency,
            rate_limit=(args.rate_limit.count, args.rate_limit.period) if args.rate_limit else None,
            api_key=args.api_key, fault_rate=args.fault_rate,
            fault_kinds=tuple(k.strip() for k in args.fault_kinds.split(",") if k.strip()),
            fail_rate=args.fail_rate, log_requests=True,
        )
    except ValueError as exc:
        raise UsageError(f"serve: {exc}") from None
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_forever(options, announce=lambda text: print(text, flush=True)))
    except OSError as exc:  # binding failed: a port in use, an address not of this machine
        raise UsageError(_cannot_listen(args.host, args.port, exc)) from None
    return 0


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"serve: port {port} on {host} is in use; choose another with --port "
                "(0 picks a free one)")
    return f"serve: cannot listen on {host}:{port} ({exc.strerror or exc})"


def status(target: str, output: str | None, *, as_json: bool, verify: bool,
           markdown: bool = False) -> int:
    manifest = None
    if Path(target).is_file():
        manifest = asyncio.run(_with_kept_seeds(load_manifest(Path(target)), output))
        root = output_dir(manifest, output)
    else:
        root = output_target(output or target)
    report = asyncio.run(_status(root, manifest, verify=verify))
    if markdown:  # for $GITHUB_STEP_SUMMARY
        from batcher.publish.command import asset_summary
        from batcher.reports.markdown import render_markdown

        assets = asset_summary(manifest, root) if manifest is not None else None
        print(render_markdown(report, assets), end="")
    elif as_json:
        print(json.dumps(report, indent=2))
    else:
        print_status(report)
        for holder in report.get("holders", []):  # a store's live locks: who, for unlock
            print(f"lock {holder['lock']}: held by {holder['holder']} (lease "
                  f"{holder['lease_s']:g} s)")
    # 0 only when every task is ok: a CI step can gate on `batcher status`.
    return 1 if report["failed"] or report["pending"] or report.get("changed") else 0


async def _status(target: Path | StoreURL, manifest: Manifest | None, *,
                  verify: bool) -> dict[str, Any]:
    async with open_view(target) as view:
        problems = await view.verify() if verify else None
        summary = await view.summary() if manifest is None else None
        locks = await view.locks()
        report = ledger_status(view.ledger, view.location, manifest, summary=summary,
                               problems=problems, running=locks.running)
        if locks.holders is not None:
            report["holders"] = locks.holders
        return report


def merge(inputs: list[Path], output: Path) -> int:
    from batcher.store.merge import merge_outputs

    count = merge_outputs(inputs, output)
    print(f"merged {plural(count, 'task')} from {plural(len(inputs), 'output')} into {output}")
    return 0


def prune(path: Path, provider: str | None, output: str | None, *, dry_run: bool,
          force: bool = False) -> int:
    manifest = asyncio.run(_with_kept_seeds(load_manifest(path, provider=provider), output))
    asyncio.run(_prune(manifest, output, dry_run=dry_run, force=force))
    return 0


PRUNE_SAMPLE = 20  # tasks listed one per line; the rest as a count


async def _prune(manifest: Manifest, output: str | Path | None, *, dry_run: bool,
                 required: bool = True, force: bool = False) -> None:
    """Prune the manifest's output (the whole manifest counts, whatever --only says); with
    ``required`` false an output nothing has run into yet is quietly left alone."""
    from batcher.store.prune import prune

    found = await prune(manifest, output_dir(manifest, output), dry_run=dry_run,
                        announce=functools.partial(_print_prune, dry_run=dry_run),
                        required=required, force=force)
    if not found.kept and not found.tasks and not found.names and not required:
        return  # nothing has run into the output yet
    if found.tasks or found.names:
        done = "nothing removed (--dry-run)" if dry_run else "removed"
        print(f"prune: {done}; {plural(found.kept, 'task')} kept in {found.location}")


def _print_prune(found: PruneSet, *, dry_run: bool) -> None:
    """What goes, said before anything goes: a line per task up to a sample, then a count."""
    verb = "would remove" if dry_run else "removing"
    if not found.tasks and not found.names:
        print(f"prune: nothing to remove in {found.location}: every task there is in the "
              "manifest")
        return
    print(f"prune: {verb} {plural(len(found.tasks), 'task')} the manifest no longer has "
          f"({plural(len(found.names), 'file')}) from {found.location}")
    for task in found.tasks[:PRUNE_SAMPLE]:
        seed = "" if task.seed is None else f" seed {task.seed}"
        prompt = " ".join(task.prompt.split())
        prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        print(f"  {task.job}/{task.model}{seed} [{task.status}]: {prompt}")
    if len(found.tasks) > PRUNE_SAMPLE:
        print(f"  and {plural(len(found.tasks) - PRUNE_SAMPLE, 'more task')}")
    if found.leftover:
        print(f"  and {plural(found.leftover, 'file')} an interrupted prune left behind")


def report(target: str) -> int:
    if Path(target).suffix.lower() in {".yaml", ".yml"} and Path(target).is_file():
        manifest = load_manifest(Path(target))
        root = output_dir(manifest, None)
        if any(job.asset for job in manifest.jobs):  # an asset set: grouped by asset
            from batcher.publish.marks import refresh_sheet

            if not asyncio.run(refresh_sheet(manifest, root)):
                raise UsageError(f"{root}: no ledger here")
            print(f"wrote {beside(root, 'results.jsonl')} and {beside(root, 'index.html')}")
            return 0
        target = str(root)
    output = output_target(target)
    asyncio.run(_write_listings(output))
    print(f"wrote {beside(output, 'results.jsonl')} and {beside(output, 'index.html')}")
    return 0


async def _write_listings(target: Path | StoreURL) -> None:
    async with open_view(target) as view:
        await view.write_listings()


def unlock(target: str, shard: tuple[int, int] | None) -> int:
    """Remove a store's lock (a run's, or its shard's), saying whose it was."""
    url = output_target(target)
    name, holder = asyncio.run(store_unlock(url, shard))
    if holder is None:
        print(f"unlock: {url} has no lock {name}; nothing to remove")
    else:
        print(f"unlock: removed {url}/{name}, held by {holder}; that run stops writing at its "
              "next heartbeat")
    return 0
