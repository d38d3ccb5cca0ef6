"""``python -m seediff ...``: the same command line as the ``seediff`` script (and the Ray job entrypoint)."""

import sys

from seediff.pipeline.cli import main

sys.exit(main())
