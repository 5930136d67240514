"""End-to-end jobs (export -> validate -> benchmark -> report) and the CLI."""
