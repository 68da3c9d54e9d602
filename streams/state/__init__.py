"""Durable local state: the dedupe ledger, the learning journal, and bounded in-memory series."""
