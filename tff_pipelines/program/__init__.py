"""The entry points: `cli` (``python -m tff_pipelines``) and `driver` (a simulation's rounds, evaluation and
checkpoints), named after TFF's ``tff.program``, the layer that drives a federated program."""
