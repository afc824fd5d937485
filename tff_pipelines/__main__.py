"""``python -m tff_pipelines``: the command line (importing the package installs and later stops our TFF worker)."""

import sys

if sys.argv[1:2] == ["worker"]:  # a worker host needs no TensorFlow in Python: start in well under a second
    from tff_pipelines.worker_process import main as worker_main

    sys.exit(worker_main(sys.argv[2:]))

from tff_pipelines.cli import main  # noqa: E402

sys.exit(main())
