"""Benchmark data: items, their parsing and checking, scoring rules and training pairs.

Below `merging` (ATM trains on it, REPAIR calibrates on it) and `fitness` (which scores on it),
so that neither of those imports the other; it imports only `core`.
"""
