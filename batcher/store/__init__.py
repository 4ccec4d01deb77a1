"""Every byte batcher keeps, on disk or in a bucket: names and layout, the ledger's sidecars,
the listings and summary.json, locks, prune, merge, verify.

A run writes through one small interface (:class:`~batcher.store.output.Output`), every other
command reads through another (:class:`~batcher.store.view.View`); each has a folder half and
an object-store half, so no command branches on where an output lives. The heavier modules
(obstore, the mirror) load only when a command needs them.
"""

from batcher.location import StoreURL, output_target, parse_store_url

__all__ = ["StoreURL", "output_target", "parse_store_url"]
