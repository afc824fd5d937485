"""prism-tf: PriSM principal sub-model training for Keras (docs/algorithm.md §1–§3).

    fm  = prism_tf.factorize(model)                    # principal-kernel model, exact at full rank
    sel = prism_tf.sample(fm, keep_ratio=0.2, seed=7)  # one client's kernels
    sub = prism_tf.extract(fm, sel)                    # a genuinely smaller Keras model
    prism_tf.merge(fm, sub, sel)                       # write its kernels back
    prism_tf.cost(sub)                                 # params, flops, activation bytes

Importing the package has no side effects and imports nothing heavy: each name below is loaded on first use, so
``import prism_tf.quiet`` can still run before TensorFlow is imported. Everything not in ``__all__`` (``walk_layers``,
``flat_weights``, ...) is importable by its module path (docs/design.md, "Where things live").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Name -> module that defines it: the user's verbs and types.
_EXPORTS = {
    "factorize": "prism_tf.factorization", "unfactorize": "prism_tf.factorization",
    "refactorize": "prism_tf.factorization", "plan_factorization": "prism_tf.factorization",
    "FactorizationReport": "prism_tf.factorization",
    "sample": "prism_tf.sampling", "Selection": "prism_tf.sampling", "LayerSelection": "prism_tf.sampling",
    "STRATEGIES": "prism_tf.sampling",
    "extract": "prism_tf.submodel", "merge": "prism_tf.submodel", "aggregate": "prism_tf.submodel",
    "kernel_coverage": "prism_tf.submodel",
    "cost": "prism_tf.costs",
    "SubmodelPlan": "prism_tf.plan",
    "PrincipalConv2D": "prism_tf.layers", "PrincipalDense": "prism_tf.layers",
    "CUSTOM_OBJECTS": "prism_tf.kinds",
    "evaluate": "prism_tf.evaluation",
}

__all__ = [
    "CUSTOM_OBJECTS", "STRATEGIES", "FactorizationReport", "LayerSelection", "PrincipalConv2D", "PrincipalDense",
    "Selection", "SubmodelPlan", "aggregate", "cost", "evaluate", "extract", "factorize", "kernel_coverage", "merge",
    "models", "plan_factorization", "refactorize", "sample", "unfactorize",
]
assert set(__all__) == {*_EXPORTS, "models"}

if TYPE_CHECKING:  # what static tools see; at run time `__getattr__` loads the same names on first use
    from prism_tf import models
    from prism_tf.costs import cost
    from prism_tf.evaluation import evaluate
    from prism_tf.factorization import FactorizationReport, factorize, plan_factorization, refactorize, unfactorize
    from prism_tf.kinds import CUSTOM_OBJECTS
    from prism_tf.layers import PrincipalConv2D, PrincipalDense
    from prism_tf.plan import SubmodelPlan
    from prism_tf.sampling import STRATEGIES, LayerSelection, Selection, sample
    from prism_tf.submodel import aggregate, extract, kernel_coverage, merge


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")  # a submodule: prism_tf.server, prism_tf.spectral, ...
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'prism_tf' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
