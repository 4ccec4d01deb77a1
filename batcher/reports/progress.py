"""Progress for people and for CI: a tqdm bar on a terminal, plain lines elsewhere.

Log records are routed around the bar (through ``tqdm.write``) so they never tear it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm

from batcher.wording import usd


@dataclass(slots=True)
class Counters:
    """What this run did so far."""

    ran: int = 0
    ok: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    spent_usd: float = 0.0  # what this run's answers cost, where a price was known
    priced: bool = False  # whether the run has prices (spend is shown only then)


# Narrower than this, tqdm trims the line (counts first, then everything: CI pseudo-terminals
# and `script` often report 0 columns), so plain lines say more.
MIN_BAR_COLUMNS = 40


def _columns(stream: TextIO) -> int:
    """The width of the terminal behind ``stream``; 0 when it does not say."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a log line must never break the run
            self.handleError(record)


class Progress:
    """Reports ``Counters`` against the number of tasks to run.

    ``mode`` is "bar" (tqdm), "lines" (a plain line every ``every`` seconds, for CI) or "off".
    """

    def __init__(
        self, total: int, counters: Counters, *, mode: str, every: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total = total
        self.counters = counters
        self.mode = mode
        self.every = every
        self.stream = stream or sys.stderr
        self._started = time.monotonic()
        self._last_line = self._started
        self._bar: tqdm | None = None
        self._handler: logging.Handler | None = None
        if mode == "bar":
            self._bar = tqdm(total=total, unit="task", file=self.stream, dynamic_ncols=True)
            self._handler = _TqdmHandler()
            self._handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            root = logging.getLogger()
            self._saved_handlers = root.handlers[:]
            root.handlers = [self._handler]

    @staticmethod
    def choose_mode(requested: bool | None, stream: TextIO) -> str:
        """"off" when asked, a bar on a terminal that can draw one, plain lines otherwise."""
        if requested is False:
            return "off"
        return "bar" if stream.isatty() and _columns(stream) >= MIN_BAR_COLUMNS else "lines"

    def _postfix(self) -> str:
        c = self.counters
        spent = f" spent={usd(c.spent_usd)}" if c.priced else ""
        return f"ok={c.ok} failed={c.failed} retries={c.retries} 429s={c.rate_limited}{spent}"

    def update(self) -> None:
        """Call after each finished task."""
        if self._bar is not None:
            self._bar.n = self.counters.ran
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.refresh()
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self._last_line >= self.every:
                self._last_line = now
                self.line()

    def line(self) -> None:
        """One plain progress line: done/total, counts, rate, ETA."""
        elapsed = time.monotonic() - self._started
        ran = self.counters.ran
        rate = ran / elapsed if elapsed > 0 else 0.0
        left = self.total - ran
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        print(
            f"progress {ran}/{self.total} {self._postfix()} rate={rate:.1f}/s eta={eta}",
            file=self.stream, flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self.update()
            self._bar.close()
            logging.getLogger().handlers = self._saved_handlers
