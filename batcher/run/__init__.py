"""What happens per task. :func:`run` (:mod:`.pool`, the supervisor: producers, workers,
signals and grace) runs a manifest with what :mod:`.setup` builds; :mod:`.course` takes one
task from its send to a kept record (every retry rule, the budget's gate, the keeping);
:mod:`.outcome` says how the run ended. Pacing is :mod:`.limits`, the verdict on a failure
:mod:`.retry`, answers to files and records :mod:`.saving`, spend and the budget :mod:`.spend`,
Ctrl-C and SIGTERM :mod:`.signals`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batcher.run.outcome import Outcome
    from batcher.run.pool import run
    from batcher.run.setup import RunOptions

__all__ = ["Outcome", "RunOptions", "run"]
_HOMES = {"Outcome": "batcher.run.outcome", "RunOptions": "batcher.run.setup",
          "run": "batcher.run.pool"}


def __getattr__(name: str) -> Any:
    # Imported on first use: modules below the run (providers, plan, reports) still import
    # its leaf helpers (limits, retry, spend), which must not pull in the pool.
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
