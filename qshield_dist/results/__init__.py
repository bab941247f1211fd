"""Results: what a trial's rows are, where they are kept, and which of them are current.

schema.py   the row schema: columns, types, the volatile ones, SCHEMA_VERSION
store.py    ResultStore: the layout, atomic writes and reads, the manifest, what is done
ledger.py   the store's index of what each result file holds (so resume opens no file twice)
compact.py  launch --compact: per-trial files merged into a few large parts, safe against kills
current.py  each stage's results version, why a row is stale, when a trial counts as done
"""
