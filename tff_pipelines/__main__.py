"""``python -m tff_pipelines``: the command line (importing the package installs and later stops our TFF worker)."""

import sys

from tff_pipelines.cli import main

sys.exit(main())
