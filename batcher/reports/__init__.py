"""What a run leaves for people and tools, all derived from the ledger: summary.json and
results.jsonl (:mod:`.summary`), the contact sheet (:mod:`.sheet`), ``batcher status``
(:mod:`.status`), progress (:mod:`.progress`) and ``batcher merge`` (:mod:`.merge`)."""
