"""Where a run keeps its results: a folder, or an object store through a local working copy.

The runner sees one small interface (:class:`~batcher.store.output.Output`); what the rest of
batcher may use from here is below. The heavier modules (obstore, the mirror) load only when a
command needs them.
"""

from batcher.location import StoreURL, output_target, parse_store_url

__all__ = ["StoreURL", "output_target", "parse_store_url"]
