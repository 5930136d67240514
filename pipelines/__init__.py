"""End-to-end jobs (export -> validate -> benchmark -> report), the CLI, the model registry and data."""
