"""PriSM and its peers, one class per method, so the federated process is written once (docs/algorithm.md §4).

Every method returns, per client and round, a `prism_tf.Selection`; the process, traffic accounting and
aggregation do not change. The interface is `Method` (`base`); the methods, grouped by what a client trains:

| module     | methods                                       | a client trains                                  |
|------------|-----------------------------------------------|--------------------------------------------------|
| `spectral` | `prism`, `fedhm`                              | principal kernels of the factorized server model |
| `whole`    | `fedavg`, `small`                             | all of the (unfactorized) server model           |
| `width`    | `heterofl`, `fjord`, `fed_dropout`, `fedrolex` | channel subsets of the unfactorized server model |

``Method.create(name, **options)`` builds a method by name (`METHODS` lists them). Adding a method is one module
in this package whose `Method` subclass is decorated with `register` (every module here is imported with the
package), plus its tests.
"""

from __future__ import annotations

import importlib
import pkgutil

from prism_tf.federated.methods.base import (
    REGISTRY,
    CostBudget,
    Method,
    deployed_models,
    equal_cost_method,
    register,
    round_selections,
)
from prism_tf.federated.methods.spectral import FedHM, PriSM, SpectralMethod
from prism_tf.federated.methods.whole import FedAvg, Small, WholeModelMethod
from prism_tf.federated.methods.width import FedDropout, FedRolex, FjORD, HeteroFL, NestedWidthMethod, WidthMethod

for _module in pkgutil.iter_modules(__path__):  # a method added as a new module registers itself here
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

# The order the CLI has always listed the first methods in; methods added since follow in registration order.
_LISTED = ("prism", "fedavg", "small", "heterofl", "fjord", "fed_dropout", "fedhm", "fedrolex")
METHODS: tuple[str, ...] = tuple(sorted(REGISTRY, key=lambda n: _LISTED.index(n) if n in _LISTED else len(_LISTED)))
"""The registered methods' names (the CLI's ``--method`` choices)."""

__all__ = ["METHODS", "REGISTRY", "CostBudget", "FedAvg", "FedDropout", "FedHM", "FedRolex", "FjORD", "HeteroFL",
           "Method", "NestedWidthMethod", "PriSM", "Small", "SpectralMethod", "WholeModelMethod", "WidthMethod",
           "deployed_models", "equal_cost_method", "register", "round_selections"]
