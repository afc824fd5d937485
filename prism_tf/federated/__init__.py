"""A federated run described without TFF (docs/design.md, "Where things live"): `config` (its options),
`recipe` (the client training recipe), `methods` (PriSM and its peers, one registered class per method), `replay`
(any round rebuilt from the run directory), `rundir` (every file of a run, read and written only there, with its
format version) and `data` (loaders and partitions).

Both the TFF pipelines (`tff_pipelines`) and the exporter (`export`) build on these; nothing here imports TFF.
"""
