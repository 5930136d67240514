"""`python -m pipelines.cli ARGS`: the `pitome-export` command from a checkout."""

import sys

from pipelines.cli.commands import main

sys.exit(main())
