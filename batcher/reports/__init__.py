"""What a run leaves for people and tools, rendered from the records the store hands over:
summary.json's contents and results.jsonl lines (:mod:`.summary`), the contact sheet
(:mod:`.sheet`), ``batcher status`` (:mod:`.status`), its markdown form (:mod:`.markdown`)
and the progress line (:mod:`.progress`). The store writes the files
(:mod:`batcher.store.listings`)."""
