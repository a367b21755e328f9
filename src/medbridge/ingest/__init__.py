"""Ingest: only anonymised data gets in, every file is fingerprinted, small files are packed."""
