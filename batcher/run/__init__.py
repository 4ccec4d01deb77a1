"""What happens per task. :func:`run` (:mod:`.pool`, the supervisor: producers, workers,
signals and grace) runs a manifest with what :mod:`.setup` builds; :mod:`.course` takes one
task from its send to a kept record (every retry rule, the budget's gate, the keeping);
:mod:`.outcome` says how the run ended. Pacing is :mod:`.limits`, the verdict on a failure
:mod:`.retry`, answers to files and records :mod:`.saving`, the budget :mod:`.spend`, Ctrl-C
and SIGTERM :mod:`.signals`."""

from batcher.run.outcome import Outcome
from batcher.run.pool import run
from batcher.run.setup import RunOptions

__all__ = ["Outcome", "RunOptions", "run"]
