"""Evaluation: sample-quality metrics and the benchmark harness."""
