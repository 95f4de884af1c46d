"""Entry point: `python -m kvtuner_hicache.eval`."""

import sys

from kvtuner_hicache.eval.cli import main

sys.exit(main())
