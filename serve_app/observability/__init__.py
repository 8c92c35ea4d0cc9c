"""Metrics, per-model request statistics and structured logs."""
