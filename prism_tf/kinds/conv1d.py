"""``Conv1D`` ↔ `PrincipalConv1D` (docs/algorithm.md §1): the ``[k, Cin, Cout]`` kernel as a ``[k·Cin, Cout]``
matrix; a principal kernel is one ``k×Cin`` filter, combined by a pointwise ``B``. The rules are `Conv2D`'s
(`ConvKind`): the first convolution (it sees the raw features) and pointwise (``k = 1``) ones are kept whole."""

from __future__ import annotations

import tensorflow as tf

from prism_tf.kinds.base import ConvKind
from prism_tf.layers import PrincipalConv1D


class Conv1DKind(ConvKind):
    name = "conv1d"
    source = tf.keras.layers.Conv1D
    principal = PrincipalConv1D
