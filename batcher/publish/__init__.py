"""Asset sets: a job's ``asset:`` names (:mod:`.names`), a person's picks and rejects
(:mod:`.picks`), the variants of each asset and the one chosen (:mod:`.variants`), more seeds
where rejects leave too few (:mod:`.keep`), ``batcher publish`` (:mod:`.publish`) and the review
page (:mod:`.review`).
"""
