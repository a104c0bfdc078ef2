"""Ingest: what arrives is kept (spooled, indexed) before it is acknowledged, and series are
declared complete."""
