"""The TFF worker processes rounds run in: `runtime` (our local worker's lifecycle behind TFF's context),
`worker_process` (starting and stopping a worker binary, TF-free), `loopback` (the bind shim), `remote` (rounds
spread over ``python -m tff_pipelines worker`` hosts; docs/deploy.md)."""
