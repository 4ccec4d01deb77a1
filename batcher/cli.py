"""The command line: parse arguments, set up logging, run, map errors to exit codes.

Exit codes: 0 every task ok; 1 some failed; 2 bad manifest or command line (nothing sent);
3 the provider refused the key or config; 130 interrupted (the same command resumes); 141
stdout was closed (``| head``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import select
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher import commands
from batcher.errors import BatcherError, Interrupted, UsageError
from batcher.manifest.load import DEFAULT_JSONL_PROVIDER
from batcher.plan import Selection
from batcher.providers.config import builtin_providers
from batcher.providers.rates import Rate, parse_rate
from batcher.run.setup import RunOptions
from batcher.store import parse_store_url
from batcher.version import version

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
            article = "an" if noun[:1] in "aeiou" else "a"
            raise argparse.ArgumentTypeError(f"{text!r} is not {article} {noun}") from None
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
_usd = _bounded(float, 0, 1e12, low_open=True, noun="amount in USD")
NO_BUDGET = "none"


def _budget(text: str) -> float | str:
    """``--budget``: an amount in USD, or ``none`` to switch a manifest's budget off."""
    if text.strip().lower() == NO_BUDGET:
        return NO_BUDGET
    return float(_usd(text))


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path,
                        help="a YAML manifest, or a JSONL task file (one task per line)")
    parser.add_argument("--output", type=_target, metavar="DIR|URL",
                        help="output folder, or an object-store URL s3://BUCKET/PREFIX, "
                             "gs://..., az://... (default: the manifest's output, else "
                             "output/NAME)")
    _jsonl_provider(parser)
    parser.add_argument("--concurrency", type=_positive, metavar="N",
                        help="most requests in flight, a whole number; overrides every "
                             "provider's concurrency (default: each provider's own)")
    parser.add_argument("--rate", type=_rate, metavar="N/PERIOD",
                        help="rate limit N/s, N/min, N/h or N/<number><unit> such as 20/10s; "
                             "overrides every provider's rate_limit (default: each provider's own)")
    parser.add_argument("--only", metavar="JOB", help="run only the job of this name "
                        "(default: every job)")
    parser.add_argument("--limit", type=_positive, metavar="N",
                        help="run at most N new tasks, first in manifest order (default: no limit)")
    parser.add_argument("--skip-failed", action="store_true",
                        help="leave tasks that failed in an earlier run alone "
                             "(default: retry them)")
    parser.add_argument("--shard", type=_shard, metavar="I/N",
                        help="run only shard I of N, I from 1 to N, such as 2/4 (default: all)")
    parser.add_argument("--budget", type=_budget, metavar="USD|none",
                        help="most this run may spend, in USD such as 2.50, by the manifest's "
                             "prices; no task starts past it, the rest stay pending (exit 1); "
                             "every model run needs a price; `none` switches the manifest's "
                             "budget off (default: the manifest's budget, else none). With "
                             "--shard, each shard's own")


# Written out rather than imported: importing the server costs every command a tenth of its
# start-up. A test keeps these equal to batcher.server's FAULT_KINDS and ServerOptions.
SERVER_FAULT_KINDS = ("500, 502, 503, 429, reset, truncated, garbage, empty_data, bad_b64, "
                      "url_404, not_image, slow")
DEFAULT_FAULT_KINDS = "500,502,503,reset,truncated"

_RUN_CODES = """\
exit codes:
  0    every task ok
  1    some tasks failed or stayed pending (a provider stopped, the store went away);
       the rest are saved
  2    the manifest or the command line is wrong, a key is missing, or the output (a
       folder or a store) is in use or cannot be opened; nothing was sent
  3    the provider refused the key or the config (401/403); the run stopped early
  130  interrupted (Ctrl-C, SIGTERM); the same command resumes
  141  stdout was closed (its reader stopped, as in `| head`): any command ends quietly
"""

# Each command's help ends with its exit codes and one example.
_EPILOGS = {
    "batcher": _RUN_CODES + "\nexample:\n  batcher run jobs/demo.yaml\n\n"
               "`batcher COMMAND --help` tells more about each command.",
    "run": _RUN_CODES + "\nexample:\n  batcher run jobs/demo.yaml --concurrency 4 --rate 30/min",
    "plan": "exit codes:\n  0    planned\n  2    the manifest or the command line is wrong, or "
            "--check found a model a provider does not serve\n"
            "\nexample:\n  batcher plan jobs/demo.yaml --rate 30/min",
    "validate": "exit codes:\n  0    the manifest can be run\n  2    it cannot: the problem "
                "as file:line: field: what is wrong\n\nexample:\n  batcher validate jobs/demo.yaml",
    "status": "exit codes:\n  0    every task ok\n  1    some tasks failed or are pending, or "
              "--verify found a file missing or changed\n  2    no ledger there, or the "
              "manifest is wrong\n  141  stdout was closed before all was printed (`| head`)"
              "\n\nexample:\n  batcher status jobs/demo.yaml --verify",
    "models": "exit codes:\n  0    listed\n  1    the provider could not be reached\n"
              "  2    unknown provider or missing key\n  3    the provider refused the key\n"
              "\nexample:\n  batcher models local",
    "serve": "exit codes:\n  0    stopped with Ctrl-C\n  2    a bad option, or the port is in "
             "use\n\nexample:\n  batcher serve --port 8000 --fault-rate 0.2 "
             "--fault-kinds 500,reset",
    "merge": "exit codes:\n  0    merged\n  2    a folder is not a batcher output, or its "
             "files do not match its ledger\n\nexample:\n"
             "  batcher merge out/shard-1 out/shard-2 --output out/all",
    "prune": "exit codes:\n  0    pruned (or nothing to prune)\n  2    the manifest or the "
             "command line is wrong, no ledger there, the output is in use by a run,\n"
             "       none of its tasks belongs to a job of the manifest, or it would remove "
             "every task\n       of a job the manifest still has (a different --provider, "
             "params or vars?;\n       --force prunes anyway); nothing was removed\n"
             "\nexample:\n  batcher prune jobs/demo.yaml --dry-run",
    "unlock": "exit codes:\n  0    removed (or there was no lock)\n  2    not a store URL, or "
              "no such bucket\n\nexample:\n  batcher unlock s3://assets/launch --shard 2/4",
    "report": "exit codes:\n  0    written\n  2    no ledger in the folder\n\nexample:\n"
              "  batcher report output/demo",
    "publish": "exit codes:\n  0    every asset published\n  1    some assets have no ok, "
               "unrejected variant (listed); the rest are published\n  2    the manifest, "
               "the picks file or the command line is wrong, or no job has asset:; nothing "
               "written\n\nexample:\n  batcher publish jobs/icons.yaml --to s3://game/icons",
    "review": "exit codes:\n  0    stopped with Ctrl-C\n  2    the manifest or the picks file "
              "is wrong, or no job has asset:\n\nexample:\n  batcher review jobs/icons.yaml",
}



def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    description = summary[:1].upper() + summary[1:] + "."
    parser = sub.add_parser(name, help=summary, description=description,
                            epilog=_EPILOGS[name], formatter_class=_Formatter)
    # -v after the command too; SUPPRESS keeps the value given before the command.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show debug logs")
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's lines (exit codes, examples) as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batcher", description="Run manifests of image and chat jobs, paced and resumable.",
        epilog=_EPILOGS["batcher"], formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"batcher {version()}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show debug logs (also after the command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_arguments(_command(sub, command.name, command.summary))
    return parser


def _run_arguments(run: argparse.ArgumentParser) -> None:
    _add_run_options(run)
    run.add_argument("--dry-run", action="store_true", help="plan only; send nothing")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar or lines (default: a bar on a terminal, "
                          "plain lines elsewhere)")
    run.add_argument("--log-every", type=_seconds, default=10.0, metavar="S",
                     help="seconds between progress lines when there is no bar (default: 10)")
    run.add_argument("--grace", type=_seconds, default=10.0, metavar="S",
                     help="seconds in-flight requests get to finish after Ctrl-C (default: 10)")
    run.add_argument("--sync-every", type=_seconds, default=30.0, metavar="S",
                     help="with a store output: seconds between ledger uploads (default: 30)")
    run.add_argument("--prune", action="store_true",
                     help="first remove the files and ledger rows of tasks the manifest no "
                          "longer has (the whole manifest counts, whatever --only says; not "
                          "with --shard: prune once, before or after the shards)")
    run.add_argument("--force", action="store_true",
                     help="with --prune: prune even when it would remove every task of a job "
                          "the manifest still has (see `batcher prune --help`)")
    run.add_argument("--store-timeout", type=_seconds, default=300.0, metavar="S",
                     help="with a store output: seconds a failing store is retried before the "
                          "run stops with its tasks pending (default: 300)")


def _plan_arguments(plan: argparse.ArgumentParser) -> None:
    _add_run_options(plan)
    plan.add_argument("--check", action="store_true",
                      help="ask each provider's /models and flag unknown model names")


def _jsonl_provider(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", metavar="NAME", help="provider for a JSONL task file "
                        f"(default: {DEFAULT_JSONL_PROVIDER})")


def _validate_arguments(validate: argparse.ArgumentParser) -> None:
    validate.add_argument("manifest", type=Path, help="a YAML manifest or a JSONL task file")
    _jsonl_provider(validate)


def _status_arguments(status: argparse.ArgumentParser) -> None:
    status.add_argument("target", help="a manifest, an output folder or a store URL")
    status.add_argument("--output", type=_target, metavar="DIR|URL",
                        help="the output of the manifest (default: the manifest's)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--verify", action="store_true",
                        help="re-hash every file against the sha256 in the ledger")
    status.add_argument("--markdown", action="store_true",
                        help="print a GitHub-flavoured summary (for $GITHUB_STEP_SUMMARY): "
                             "counts, spend, failures, and with a manifest its assets without "
                             "an ok variant and those not picked yet")


def _models_arguments(models: argparse.ArgumentParser) -> None:
    built_in = ", ".join(builtin_providers())
    models.add_argument("provider", help=f"a built-in provider ({built_in}) or one the "
                        "--manifest defines")
    models.add_argument("--manifest", type=Path, metavar="FILE",
                        help="a manifest that defines or overrides the provider "
                             "(default: the built-in providers only)")


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--port", type=_port, default=8000,
                       help="port of the API; 0 picks a free one (default: 8000)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--latency", type=_latency, default=0.0, metavar="S",
                       help="seconds added before each generation answer (default: 0)")
    serve.add_argument("--rate-limit", type=_rate, metavar="N/PERIOD",
                       help="answer 429 past N requests in a rolling window, such as 60/min "
                            "(default: no limit)")
    serve.add_argument("--api-key", metavar="KEY",
                       help="require this bearer key, 401 otherwise (default: no key)")
    serve.add_argument("--fault-rate", type=_fraction, default=0.0, metavar="F",
                       help="fraction from 0 to 1 of distinct requests that fail on their "
                            "first try (default: 0)")
    serve.add_argument("--fault-kinds", default=DEFAULT_FAULT_KINDS, metavar="K,K,...",
                       help=f"comma-separated faults to inject, from: {SERVER_FAULT_KINDS} "
                            f"(default: {DEFAULT_FAULT_KINDS})")
    serve.add_argument("--fail-rate", type=_fraction, default=0.0, metavar="F",
                       help="fraction from 0 to 1 of distinct requests that always fail with "
                            "500 (default: 0)")


def _merge_arguments(merge: argparse.ArgumentParser) -> None:
    merge.add_argument("inputs", nargs="+", type=Path, metavar="OUT",
                       help="output folders of the shards")
    merge.add_argument("--output", type=Path, required=True, metavar="DIR",
                       help="the folder to merge into (required)")


def _prune_arguments(prune: argparse.ArgumentParser) -> None:
    prune.add_argument("manifest", type=Path, help="a YAML manifest or a JSONL task file")
    prune.add_argument("--output", type=_target, metavar="DIR|URL",
                       help="the output folder or store URL (default: the manifest's)")
    _jsonl_provider(prune)
    prune.add_argument("--dry-run", action="store_true",
                       help="list what would be removed; remove nothing")
    prune.add_argument("--force", action="store_true",
                       help="prune even what looks like a mistake: every task of a job the "
                            "manifest still has, or tasks made with another provider than "
                            "the job's (default: refuse, exit 2, nothing removed)")


def _report_arguments(report: argparse.ArgumentParser) -> None:
    report.add_argument("output", type=_target, metavar="DIR|URL|MANIFEST",
                        help="an output folder or a store URL; or a manifest with asset: "
                             "(its output's sheet grouped by asset, with the picks marked)")


def _unlock_arguments(unlock: argparse.ArgumentParser) -> None:
    unlock.add_argument("output", type=_target, metavar="URL", help="the store URL of the output")
    unlock.add_argument("--shard", type=_shard, metavar="I/N",
                        help="the lock of shard I of N (default: the unsharded run's)")


def _publish_arguments(publish: argparse.ArgumentParser) -> None:
    _add_asset_source(publish)
    publish.add_argument("--to", type=_target, required=True, metavar="DIR|URL",
                         help="where the set goes: a folder or a store URL (required)")
    publish.add_argument("--dry-run", action="store_true",
                         help="list what would be written and removed; write nothing")


def _review_arguments(review: argparse.ArgumentParser) -> None:
    _add_asset_source(review)
    review.add_argument("--port", type=_port, default=0,
                        help="port on 127.0.0.1; 0 picks a free one (default: 0)")


def _add_asset_source(command: argparse.ArgumentParser) -> None:
    """The manifest with asset: and the run's output, which publish and review both read."""
    command.add_argument("manifest", type=Path, help="a YAML manifest whose jobs have asset:")
    command.add_argument("--output", type=_target, metavar="DIR|URL",
                         help="the run's output (default: the manifest's)")


@dataclass(frozen=True, slots=True)
class _Command:
    """A command of ``batcher --help``: its name, its one-line summary, its arguments."""

    name: str
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]


# The commands in the order `batcher --help` lists them; the epilogs are in _EPILOGS.
_COMMANDS = (
    _Command("run", "run what is not done yet", _run_arguments),
    _Command("plan", "count what a run would do; send nothing", _plan_arguments),
    _Command("validate", "check a manifest (exit 0 or 2)", _validate_arguments),
    _Command("status", "what the ledger says: ok, failed, pending, why", _status_arguments),
    _Command("models", "list a provider's models", _models_arguments),
    _Command("serve", "the built-in OpenAI-compatible server", _serve_arguments),
    _Command("merge", "combine shard outputs into one", _merge_arguments),
    _Command("prune", "remove the files and ledger rows of tasks the manifest no longer has",
             _prune_arguments),
    _Command("report", "write results.jsonl and index.html again", _report_arguments),
    _Command("unlock", "remove a store's lock left by a run that is gone", _unlock_arguments),
    _Command("publish", "write the asset set (each asset's chosen variant, by name) and "
             "assets.json to a folder or a bucket", _publish_arguments),
    _Command("review", "a local page to pick and reject each asset's variants (writes the "
             "picks file)", _review_arguments),
)


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
        budget=None if args.budget == NO_BUDGET else args.budget,
    )


def dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "prune", False) and args.shard is not None:
        raise UsageError("run --prune with --shard: shards run side by side and prune needs "
                         "the whole output; run `batcher prune MANIFEST` once, before or after "
                         "the shards")
    prune = getattr(args, "prune", False)
    if getattr(args, "force", False) and args.command == "run" and not prune:
        raise UsageError("run --force: only with --prune (it lets prune remove what looks "
                         "like a mistake)")
    if args.command == "run" and args.dry_run:
        args.command, args.check = "plan", False
    if args.command in {"run", "plan"}:
        options = _run_options(args)
        force, budget_off = getattr(args, "force", False), args.budget == NO_BUDGET
        if args.command == "plan":
            return commands.plan(args.manifest, args.provider, options, check=args.check,
                                 prune_first=prune, force=force, budget_off=budget_off)
        return asyncio.run(commands.run(args.manifest, args.provider, options,
                                        prune_first=prune, force=force, budget_off=budget_off))
    if args.command == "validate":
        return commands.validate(args.manifest, args.provider)
    if args.command == "status":
        return commands.status(args.target, args.output, as_json=args.json, verify=args.verify,
                               markdown=args.markdown)
    if args.command == "models":
        return asyncio.run(commands.models(args.provider, args.manifest))
    if args.command == "serve":
        return commands.serve(args)
    if args.command == "merge":
        return commands.merge(args.inputs, args.output)
    if args.command == "report":
        return commands.report(args.output)
    if args.command in {"publish", "review"}:
        from batcher.publish import command

        if args.command == "publish":
            return command.publish(args.manifest, args.output, args.to, dry_run=args.dry_run)
        return command.review(args.manifest, args.output, port=args.port)
    if args.command == "unlock":
        return commands.unlock(args.output, args.shard)
    if args.command == "prune":
        return commands.prune(args.manifest, args.provider, args.output, dry_run=args.dry_run,
                              force=args.force)
    raise UsageError(f"unknown command {args.command}")


STDOUT_CLOSED = 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe ended


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code.

    A closed stdout (``batcher status ... | head -1``: the reader stopped) ends any command
    quietly with :data:`STDOUT_CLOSED`, never 1, which a CI gate reads as "tasks pending".
    What a run finished is saved by then: its ledger is written before anything is printed.
    A stdout (or stderr) closed before the start (``batcher run ... >&-``) is the null device:
    the command runs and keeps its own exit code.
    """
    _open_closed_streams()
    try:
        try:
            code = _main(argv)
        except SystemExit as stop:  # argparse: --help, --version, a bad argument
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        sys.stdout.flush()  # a closed stdout shows here, not in the interpreter's exit
        return code
    except BrokenPipeError as error:
        if _stdout_is_closed():
            return _stdout_closed()
        print(f"batcher: {error}", file=sys.stderr)  # a socket or a file of batcher's own
        return 1


def _open_closed_streams() -> None:
    """Give a standard stream that was closed as a descriptor (Python then sets it to None)
    the null device, on its own descriptor while that is free: a file batcher opens later (the
    ledger) must never be descriptor 1 or 2, where a stray write would land in it."""
    for number, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(number)
        except OSError:  # free: the null device takes it
            null = os.open(os.devnull, os.O_WRONLY)
            if null != number:
                os.dup2(null, number)
                os.close(null)
            setattr(sys, name, open(number, "w", closefd=False))  # noqa: SIM115
        else:  # already taken by a file of its own: leave that alone
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115


def _stdout_is_closed() -> bool:
    """Whether stdout is a pipe nobody reads any more (poll says so without writing)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no descriptor, or no poll() here
        return True


def _stdout_closed() -> int:
    """Point stdout and stderr (often the same pipe) at the null device: the interpreter
    would flush what is buffered at exit, fail again, and print that it did."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return STDOUT_CLOSED


def _main(argv: Sequence[str] | None) -> int:
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
    except BrokenPipeError:
        raise  # stdout closed: main() ends quietly
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
