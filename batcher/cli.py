"""The command line: parse arguments, set up logging, run, map errors to exit codes.

Exit codes: 0 every task ok; 1 some failed; 2 bad manifest or command line (nothing sent);
3 the provider refused the key or config; 130 interrupted (the same command resumes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from batcher import commands
from batcher.errors import BatcherError, Interrupted, UsageError
from batcher.limits import Rate, parse_rate
from batcher.plan import Selection
from batcher.runner import RunOptions
from batcher.store import parse_store_url

log = logging.getLogger("batcher")


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write I/N, such as 2/4") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be from 1 to N")
    return index, count


def _rate(text: str) -> Rate:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded(
    kind: type[int] | type[float], low: float, high: float = math.inf, *,
    low_open: bool = False, noun: str = "number",
) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` in [low, high] (or (low, high] if ``low_open``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        too_low = value <= low if low_open else value < low
        if too_low or value > high or value != value:  # value != value: NaN
            bound = f"more than {low:g}" if low_open else f"at least {low:g}"
            limit = f"{bound} and at most {high:g}" if high != math.inf else bound
            raise argparse.ArgumentTypeError(f"must be {limit}")
        return value

    return parse


def _target(text: str) -> str:
    """An output folder or a store URL, kept as written (a Path would fold ``s3://``)."""
    try:
        parse_store_url(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_positive = _bounded(int, 1, noun="whole number")
_seconds = _bounded(float, 0, 1e9, low_open=True, noun="number of seconds")
_latency = _bounded(float, 0, 3600, noun="number of seconds")
_port = _bounded(int, 0, 65535, noun="port number")
_fraction = _bounded(float, 0, 1)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="a YAML manifest or a JSONL task file")
    parser.add_argument("--output", type=_target, metavar="DIR|URL",
                        help="output folder, or a store URL s3://BUCKET/PREFIX, gs://..., "
                             "az://... (default: the manifest's output)")
    parser.add_argument("--provider", help="provider for a JSONL task file (default: vultr)")
    parser.add_argument("--concurrency", type=_positive, help="most requests in flight")
    parser.add_argument("--rate", type=_rate, help="rate limit, such as 60/min or 20/10s")
    parser.add_argument("--only", metavar="JOB", help="run only this job")
    parser.add_argument("--limit", type=_positive, help="run at most N new tasks")
    parser.add_argument("--skip-failed", action="store_true", help="leave failed tasks alone")
    parser.add_argument("--shard", type=_shard, metavar="I/N", help="run only shard I of N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batcher", description="Run manifests of image and chat jobs, paced and resumable."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run what is not done yet")
    _add_run_options(run)
    run.add_argument("--dry-run", action="store_true", help="plan only; send nothing")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    run.add_argument("--log-every", type=_seconds, default=10.0, metavar="S",
                     help="seconds between progress lines when not on a terminal")
    run.add_argument("--grace", type=_seconds, default=10.0, metavar="S",
                     help="seconds in-flight requests get to finish after Ctrl-C")
    run.add_argument("--sync-every", type=_seconds, default=30.0, metavar="S",
                     help="with a store output: seconds between ledger uploads (default 30)")
    run.add_argument("--store-timeout", type=_seconds, default=300.0, metavar="S",
                     help="with a store output: seconds a failing store is retried before the "
                          "run stops, tasks pending (default 300)")

    plan = sub.add_parser("plan", help="count what a run would do; send nothing")
    _add_run_options(plan)
    plan.add_argument("--check", action="store_true",
                      help="ask each provider's /models and flag unknown model names")

    validate = sub.add_parser("validate", help="check a manifest (exit 0 or 2)")
    validate.add_argument("manifest", type=Path)
    validate.add_argument("--provider")

    status = sub.add_parser("status", help="what the ledger says")
    status.add_argument("target", help="a manifest, an output folder or a store URL")
    status.add_argument("--output", type=_target, metavar="DIR|URL",
                        help="the output to read (default: the manifest's)")
    status.add_argument("--json", action="store_true")
    status.add_argument("--verify", action="store_true", help="re-hash every file")

    models = sub.add_parser("models", help="list a provider's models")
    models.add_argument("provider")
    models.add_argument("--manifest", type=Path, help="a manifest that defines the provider")

    serve = sub.add_parser("serve", help="the built-in OpenAI-compatible server")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--latency", type=_latency, default=0.0, metavar="S")
    serve.add_argument("--rate-limit", type=_rate, metavar="N/PERIOD",
                       help="answer 429 past this many requests in a rolling window")
    serve.add_argument("--api-key", help="require this bearer key (401 otherwise)")
    serve.add_argument("--fault-rate", type=_fraction, default=0.0,
                       help="fraction of distinct requests that fail on their first try")
    serve.add_argument("--fault-kinds", default="500,502,503,reset,truncated")
    serve.add_argument("--fail-rate", type=_fraction, default=0.0,
                       help="fraction of distinct requests that always fail")

    merge = sub.add_parser("merge", help="combine shard outputs into one")
    merge.add_argument("inputs", nargs="+", type=Path)
    merge.add_argument("--output", type=Path, required=True)

    report = sub.add_parser("report", help="write results.jsonl and index.html again")
    report.add_argument("output", type=_target, metavar="DIR|URL",
                        help="an output folder or a store URL")
    return parser


def _run_options(args: argparse.Namespace) -> RunOptions:
    selection = Selection(
        only=args.only, shard=args.shard, skip_failed=args.skip_failed, limit=args.limit
    )
    return RunOptions(
        output=args.output, selection=selection, concurrency=args.concurrency, rate=args.rate,
        progress=False if getattr(args, "no_progress", False) else None,
        log_every=getattr(args, "log_every", 10.0), grace=getattr(args, "grace", 10.0),
        sync_every=getattr(args, "sync_every", None),
        store_timeout=getattr(args, "store_timeout", None),
    )


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "run" and args.dry_run:
        args.command, args.check = "plan", False
    if args.command in {"run", "plan"}:
        options = _run_options(args)
        if args.command == "plan":
            return commands.plan(args.manifest, args.provider, options, check=args.check)
        return asyncio.run(commands.run(args.manifest, args.provider, options))
    if args.command == "validate":
        return commands.validate(args.manifest, args.provider)
    if args.command == "status":
        return commands.status(args.target, args.output, as_json=args.json, verify=args.verify)
    if args.command == "models":
        return asyncio.run(commands.models(args.provider, args.manifest))
    if args.command == "serve":
        return commands.serve(args)
    if args.command == "merge":
        return commands.merge(args.inputs, args.output)
    if args.command == "report":
        return commands.report(args.output)
    raise UsageError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("batcher").setLevel(logging.INFO)
    try:
        return dispatch(args)
    except BatcherError as error:
        print(f"batcher: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # the disk or the network refused; a message, not a traceback
        log.debug("stopped by an OS error", exc_info=True)
        print(f"batcher: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before a run's own signal handling is in place
        print("batcher: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except BrokenPipeError:
        return 1


def entry() -> None:
    """The ``batcher`` command: :func:`main`, then exit.

    After a run into an object store, the process ends with ``os._exit`` once its output is
    flushed: obstore's background runtime can abort the interpreter while it shuts down (seen
    in about one store run in five here), which would turn a finished run's exit code into a
    crash. Every file and the ledger are closed by then.
    """
    code = main()
    if "obstore" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
