"""Asset sets: a person's picks and rejects (:mod:`.picks`), the variants of each asset and the
one chosen (:mod:`.variants`), more seeds where rejects leave too few (:mod:`.keep`), a run's ok
files (:mod:`.source`), the set with the picks applied (:mod:`.assets`), ``batcher publish``
(:mod:`.publish`), the review page (:mod:`.review`, :mod:`.review_page`), the sheet grouped by
asset (:mod:`.marks`) and what the commands print (:mod:`.command`). A job's ``asset:`` names
are the manifest's (:mod:`batcher.manifest.assets`, :mod:`batcher.manifest.named`).
"""
