"""Benchmarks of the pipeline against its reference implementations (ingestion, training)."""
