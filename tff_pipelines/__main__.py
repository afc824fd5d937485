"""``python -m tff_pipelines``: the command line ."""

import sys

if sys.argv[1:2] == ["worker"]:  # a worker host needs no TensorFlow in Python: start in well under a second
    from tff_pipelines.workers.worker_process import main as worker_main

    sys.exit(worker_main(sys.argv[2:]))

from prism_tf.quiet import import_tensorflow  # noqa: E402

import_tensorflow()  # before anything imports TensorFlow: its CPU-only start-up noise never shows

from tff_pipelines.program.cli import main  # noqa: E402

sys.exit(main())
