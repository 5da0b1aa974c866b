"""Evaluation: metrics over held-out data."""
