"""Everything a user writes, loaded and checked before a request is sent: YAML manifests
(:mod:`.load`, :mod:`.jobs`, :mod:`.fields`, :mod:`.yamllines`), JSONL task files
(:mod:`.jsonl`), vars files (:mod:`.varsfile`) and asset names (:mod:`.assets`,
:mod:`.named`); and the tasks it expands to, with their ids (:mod:`.tasks`).

A manifest that cannot be run raises :class:`~batcher.errors.ManifestError` naming the file,
the line and the field.
"""

from batcher.manifest.fields import placeholders
from batcher.manifest.jobs import JobSpec, Manifest
from batcher.manifest.load import load_manifest
from batcher.manifest.yamllines import load_yaml_with_lines

__all__ = ["JobSpec", "Manifest", "load_manifest", "load_yaml_with_lines", "placeholders"]
