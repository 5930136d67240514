"""Training scripts for the shipped models; run from a checkout (`python -m pipelines.training.NAME`), not installed."""
