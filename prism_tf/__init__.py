"""prism-tf: PriSM principal sub-model training for Keras (docs/algorithm.md §1–§3).

    fm  = prism_tf.factorize(model)                    # principal-kernel model, exact at full rank
    sel = prism_tf.sample(fm, keep_ratio=0.2, seed=7)  # one client's kernels
    sub = prism_tf.extract(fm, sel)                    # a genuinely smaller Keras model
    prism_tf.merge(fm, sub, sel)                       # write its kernels back
    prism_tf.cost(sub)                                 # params, flops, activation bytes
"""

from prism_tf import _quiet

_quiet.import_tensorflow()  # before anything imports TensorFlow: its CPU-only start-up noise never shows

from prism_tf import budget, evaluation, local_step, models, server, slicing, spectral, streams  # noqa: E402
from prism_tf.cost import cost  # noqa: E402
from prism_tf.factorize import (  # noqa: E402
    FactorizationReport,
    factorize,
    plan_factorization,
    principal_layers,
    refactorize,
    unfactorize,
    walk_layers,
)
from prism_tf.layers import PrincipalConv2D, PrincipalDense, is_principal  # noqa: E402
from prism_tf.plan import SubmodelPlan  # noqa: E402
from prism_tf.sampling import STRATEGIES, LayerSelection, Selection, sample, sample_from_singular_values  # noqa: E402
from prism_tf.submodel import (  # noqa: E402
    aggregate,
    extract,
    flat_weights,
    kernel_coverage,
    merge,
    set_flat_weights,
    submodel_architecture,
    submodel_weights,
)

CUSTOM_OBJECTS = {"PrincipalConv2D": PrincipalConv2D, "PrincipalDense": PrincipalDense}

__all__ = [
    "CUSTOM_OBJECTS", "STRATEGIES", "FactorizationReport", "LayerSelection", "PrincipalConv2D", "PrincipalDense",
    "Selection", "SubmodelPlan", "aggregate", "cost", "extract", "factorize", "flat_weights", "is_principal",
    "kernel_coverage", "merge", "models", "plan_factorization", "principal_layers", "refactorize", "sample",
    "sample_from_singular_values", "set_flat_weights", "slicing", "spectral", "submodel_architecture",
    "submodel_weights", "unfactorize", "walk_layers", "evaluation", "budget", "streams", "local_step", "server",
]
