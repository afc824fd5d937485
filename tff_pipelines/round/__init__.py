"""One PriSM round as TFF computations: `layout` (the round's types), `distributor`, `client_work`, `aggregator`,
`finalizer`, composed by `process` (docs/design.md, "A round's data flow")."""
