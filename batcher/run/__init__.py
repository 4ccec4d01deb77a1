"""What happens per task: the worker pool (:mod:`.pool`), pacing (:mod:`.limits`), the retry
rules (:mod:`.retry`), answers to files and records (:mod:`.saving`) and spend and the budget
(:mod:`.spend`)."""
