"""Keras layers holding kernels as principal kernels (docs/algorithm.md §1).

- `PrincipalConv2D`, `PrincipalConv1D`, `PrincipalDense`, `PrincipalEmbedding`: one kernel, one factor pair
  (`prism_tf.layers.principal`);
- `PrincipalLSTM`, `PrincipalGRU`: input and recurrent kernels, two factor pairs (`prism_tf.layers.recurrent`);
- `PrincipalMultiHeadAttention`: query, key, value and output projections, four pairs (`prism_tf.layers.attention`);
- `ReversibleEmbedding` (tied input embedding and output projection) and its principal form (`prism_tf.layers.tied`).
"""

from prism_tf.layers.attention import PrincipalMultiHeadAttention
from prism_tf.layers.principal import (
    BIAS,
    COMBINATION,
    PRINCIPAL,
    ROLES,
    SCALE,
    SINGULAR_VALUES,
    Factors,
    PrincipalConv1D,
    PrincipalConv2D,
    PrincipalDense,
    PrincipalEmbedding,
)
from prism_tf.layers.recurrent import PrincipalGRU, PrincipalLSTM
from prism_tf.layers.tied import PrincipalReversibleEmbedding, ReversibleEmbedding

__all__ = ["BIAS", "COMBINATION", "PRINCIPAL", "ROLES", "SCALE", "SINGULAR_VALUES", "Factors", "PrincipalConv1D",
           "PrincipalConv2D", "PrincipalDense", "PrincipalEmbedding", "PrincipalGRU", "PrincipalLSTM",
           "PrincipalMultiHeadAttention", "PrincipalReversibleEmbedding", "ReversibleEmbedding"]
