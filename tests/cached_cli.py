"""`python -m tests.cached_cli ARGS`: `python -m pipelines.cli ARGS` with the test run's trace
cache (tests/trace_cache.py, folder in $PITOME_TEST_TRACES), for tests whose subject is the
process (Ctrl-C, workers sharing a study) rather than the export; the one end-to-end job in a
real process (tests/test_cli.py) runs without it."""

import os
import sys
from pathlib import Path

from exporter import onnx_export
from tests.trace_cache import TraceCache

onnx_export._trace = TraceCache(Path(os.environ["PITOME_TEST_TRACES"]), onnx_export._trace)

from pipelines.cli.commands import main  # noqa: E402 - after the cache is in place

sys.exit(main())
