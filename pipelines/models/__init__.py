"""The model registry (short names -> builders, preprocessing, token layout) and the shipped models."""
