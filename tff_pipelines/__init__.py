"""prism-tf pipelines: entry points (CLI, notebooks, tests) for PriSM federated learning on TFF.

Importing this package starts the local TFF C++ worker under our control (`tff_pipelines.runtime`): its output
goes to a log file, it is stopped at exit and on SIGTERM/SIGHUP, and it dies with this process even on
SIGKILL.
Without this, TFF's own worker inherits stdout and outlives the script, so `python -m tff_pipelines ... | cat`
and CI hang.
"""

from tff_pipelines import runtime

runtime.install_local_context()
