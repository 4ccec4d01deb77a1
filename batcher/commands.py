"""What each command does, returning its exit code; printing for people happens here."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path

import aiohttp

from batcher.errors import AuthError, BatcherError, Interrupted, ProviderError, UsageError
from batcher.ledger import LEDGER_NAME, Ledger
from batcher.limits import Rate
from batcher.manifest import Manifest, load_manifest
from batcher.plan import Plan, make_plan, output_dir
from batcher.providers import OpenAICompatible, builtin_providers, open_clients, resolve_key
from batcher.retry import Action, classify
from batcher.runner import RunOptions, effective_configs, used_providers
from batcher.runner import run as run_manifest
from batcher.status import ledger_status, print_status


def validate(path: Path, provider: str | None) -> int:
    manifest = load_manifest(path, provider=provider)
    jobs = ", ".join(job.name for job in manifest.jobs)
    print(f"{path}: ok ({len(manifest.jobs)} jobs: {jobs})")
    return 0


async def run(path: Path, provider: str | None, options: RunOptions) -> int:
    manifest = load_manifest(path, provider=provider)
    outcome = await run_manifest(manifest, options)
    summary = outcome.summary
    print(
        f"batcher: {summary['ok']} ok, {summary['failed']} failed, {summary['pending']} pending "
        f"of {summary['total']} ({summary['skipped']} already done, {summary['ran']} ran, "
        f"{summary['retries']} retries, {summary['rate_limited']} rate-limited) in "
        f"{summary['elapsed_s']:.1f} s -> {outcome.output}",
        file=sys.stderr,
    )
    if outcome.message:
        print(f"batcher: {outcome.message}", file=sys.stderr)
    if outcome.exit_code == Interrupted.exit_code:
        print("batcher: interrupted; run the same command to finish", file=sys.stderr)
    return outcome.exit_code


def _done_and_failed(root: Path) -> tuple[set[str], set[str]]:
    ledger = Ledger.open_existing(root)
    if ledger is None:
        return set(), set()
    with ledger:
        return ledger.statuses(root)


def plan(path: Path, provider: str | None, options: RunOptions, *, check: bool) -> int:
    manifest = load_manifest(path, provider=provider)
    root = output_dir(manifest, options.output)
    done, failed = _done_and_failed(root)
    result = make_plan(manifest, options.selection, done, failed)
    configs = effective_configs(manifest, options, used_providers(manifest, options.selection.only))
    _print_plan(result, {name: c.rate_limit for name, c in configs.items()}, root)
    if check:
        return asyncio.run(_check_models(manifest, options))
    return 0


def _print_plan(result: Plan, rates: dict[str, Rate | None], root: Path) -> None:
    print(f"{'job':<24} {'model':<40} {'total':>9} {'done':>9} {'failed':>8} {'to run':>9}")
    for (job, model), c in result.by_model.items():
        print(f"{job:<24} {model:<40} {c.total:>9} {c.done:>9} {c.failed:>8} {c.to_run:>9}")
    t = result.totals
    print(f"{'total':<65} {t.total:>9} {t.done:>9} {t.failed:>8} {t.to_run:>9}")
    eta = result.eta_seconds(rates)
    limits = ", ".join(f"{name} {rate or 'unlimited'}" for name, rate in sorted(rates.items()))
    eta_text = "unknown (no rate limit)" if eta is None else _duration(eta)
    print(f"output: {root}\nrate limits: {limits}\nETA at the rate limit: {eta_text}")


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
    print(f"check: {missing} model names not served" if missing else
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
            fail_rate=args.fail_rate,
        )
    except ValueError as exc:
        raise UsageError(f"serve: {exc}") from None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(options))
    return 0


def status(target: Path, output: Path | None, *, as_json: bool, verify: bool) -> int:
    manifest = None
    if target.is_file():
        manifest = load_manifest(target)
        root = output_dir(manifest, output)
    else:
        root = output or target
    if not (root / LEDGER_NAME).is_file():
        raise UsageError(f"{root}: no ledger here (nothing has run into this folder yet)")
    report = ledger_status(root, manifest, verify=verify)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_status(report)
    # As the contract has it: 0 only when every task is ok and (with --verify) every file is
    # as recorded, so a CI step can gate on it.
    return 1 if report["failed"] or report["pending"] or report.get("changed") else 0


def merge(inputs: list[Path], output: Path) -> int:
    from batcher.merge import merge_outputs

    count = merge_outputs(inputs, output)
    print(f"merged {count} tasks from {len(inputs)} outputs into {output}")
    return 0


def report(output: Path) -> int:
    from batcher.report import write_listings

    ledger = Ledger.open_existing(output)
    if ledger is None:
        raise UsageError(f"{output}: no ledger here")
    with ledger:
        write_listings(output, ledger)
    print(f"wrote {output / 'results.jsonl'} and {output / 'index.html'}")
    return 0
