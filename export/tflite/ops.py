"""The builtins runtime's primitives: each layer's forward and backward pass with TFLite builtin kernels only
(docs/export.md, "On-device training").

Every primitive is a `tf.custom_gradient` whose backward pass avoids the TF kernels TFLite lacks
(``Conv2DBackpropFilter``, ``ReluGrad``, ``FusedBatchNorm*``, ``SparseSoftmaxCrossEntropyWithLogits``,
``BroadcastGradientArgs``). `BuiltinOps` hands the ones a factorizable layer kind needs to
`prism_tf.kinds.LayerKind.tflite_layer` (the `prism_tf.kinds.TFLiteOps` interface); `export.tflite.compiler` calls
the others (normalization, attention, ReLU, gelu, Add, reshapes, pooling) itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

from prism_tf.kinds.base import CompiledLayer, TFLiteOps
from prism_tf.layers.recurrent import gru_gates, lstm_gates

_Tensor = tf.Tensor
Updates = list  # (variable, new value) pairs a training forward pass assigns (BatchNorm moving statistics)

SUPPORTED = ("Conv2D, PrincipalConv2D, Conv1D, PrincipalConv1D, Dense, PrincipalDense (on inputs of any rank), "
             "Embedding, PrincipalEmbedding, ReversibleEmbedding, PrincipalReversibleEmbedding (no mask_zero), "
             "LSTM, PrincipalLSTM, GRU, PrincipalGRU (tanh/sigmoid, GRU reset_after, no mask, state or "
             "go_backwards), BatchNormalization, GroupNormalization, LayerNormalization (last axis), "
             "MultiHeadAttention, PrincipalMultiHeadAttention (self- or cross-attention, no mask or dropout), "
             "PositionEmbedding, Reshape, ReLU, Activation (relu, gelu, tanh, sigmoid, linear), Add, "
             "GlobalAveragePooling1D, GlobalAveragePooling2D")


FLEX_HINT = ("`--runtime flex` (runtime='flex': TFLite's standard recipe with select TF ops, which needs the Flex "
             "delegate on the device) can train it")


def unsupported_layer(layer: tf.keras.layers.Layer, why: str = "") -> ValueError:
    """The error for a layer the builtins runtime cannot compile: names the layer, its type and ``why``, and
    points to ``--runtime flex`` (Keras autodiff with select TF ops), which trains any layer."""
    detail = f": {why}" if why else ""
    return ValueError(
        f"on-device training with LiteRT builtin ops does not support layer '{layer.name}' of type "
        f"{type(layer).__name__}{detail} (supported: {SUPPORTED}); {FLEX_HINT}"
    )


def activation_function(layer: tf.keras.layers.Layer, function: Callable) -> Callable[[_Tensor], _Tensor]:
    """``layer``'s activation ``function`` as a primitive: ``linear``, ``relu``, ``gelu`` (Keras's default, exact
    erf form), ``tanh`` or ``sigmoid``; anything else is refused."""
    name = getattr(function, "__name__", repr(function))
    if name == "linear":
        return lambda x: x
    found = {"relu": relu, "gelu": gelu, "tanh": tanh, "sigmoid": sigmoid}.get(name)
    if found is None:
        raise unsupported_layer(layer, f"activation '{name}' (only relu, gelu, tanh, sigmoid and linear)")
    return found


class BuiltinOps(TFLiteOps):
    """`prism_tf.kinds.TFLiteOps` with this module's primitives, for one model's compilation.

    Attributes:
      batch_size: the batch size a conv's filter-gradient patch budget is sized for (`Conv`).
      max_patch_bytes: above this many bytes of patches (at ``batch_size``), filter gradients go in batch chunks.
    """

    def __init__(self, batch_size: int, max_patch_bytes: int) -> None:
        self.batch_size = int(batch_size)
        self.max_patch_bytes = int(max_patch_bytes)

    def conv(self, input_shape: tuple, kernel_size: tuple[int, int], strides: tuple[int, int],
             padding: str) -> Callable[[_Tensor, _Tensor], _Tensor]:
        """A `Conv` for inputs of ``input_shape`` (``[None, H, W, C]``): ``(x, kernel) -> y``."""
        return Conv(input_shape, kernel_size, strides, padding, self.batch_size, self.max_patch_bytes)

    def matmul(self, x: _Tensor, w: _Tensor) -> _Tensor:
        """`matmul`: ``x @ w`` over the last axis of ``x`` (any rank >= 2)."""
        return matmul(x, w)

    def bias_add(self, x: _Tensor, b: _Tensor) -> _Tensor:
        """`bias_add`."""
        return bias_add(x, b)

    def scale_rows(self, omega: _Tensor, combination: _Tensor) -> _Tensor:
        """`scale_rows`: ``diag(ω)·B`` with ω frozen."""
        return scale_rows(omega, combination)

    def activation(self, layer: tf.keras.layers.Layer, activation: Callable) -> Callable[[_Tensor], _Tensor]:
        """`activation_function`: relu or linear, else the `unsupported_layer` error."""
        return activation_function(layer, activation)

    def reshape(self, x: _Tensor, shape: list[int]) -> _Tensor:
        """`reshape`."""
        return reshape(x, shape)

    def pad(self, x: _Tensor, paddings: list[tuple[int, int]]) -> _Tensor:
        """`pad`."""
        return pad(x, paddings)

    def gather(self, table: _Tensor, ids: _Tensor) -> _Tensor:
        """`gather`."""
        return gather(table, ids)

    def transpose(self, x: _Tensor, perm: list[int]) -> _Tensor:
        """`transpose`."""
        return transpose(x, perm)

    def add(self, *xs: _Tensor) -> _Tensor:
        """`add`."""
        return add(*xs)

    def unstack(self, x: _Tensor, axis: int) -> list[_Tensor]:
        """`unstack`."""
        return unstack(x, axis)

    def stack(self, xs: list[_Tensor], axis: int) -> _Tensor:
        """`stack`."""
        return stack(xs, axis)

    def lstm_cell(self, z: _Tensor, c: _Tensor) -> tuple[_Tensor, _Tensor]:
        """`lstm_cell`."""
        return lstm_cell(z, c)

    def gru_cell(self, projected: _Tensor, inner: _Tensor, h: _Tensor) -> _Tensor:
        """`gru_cell`."""
        return gru_cell(projected, inner, h)

    def attention(self, query: _Tensor, key: _Tensor, value: _Tensor, heads: int, key_dim: int,
                  value_dim: int) -> _Tensor:
        """`attention`."""
        return attention(query, key, value, heads, key_dim, value_dim)

    def unsupported(self, layer: tf.keras.layers.Layer, why: str = "") -> ValueError:
        """`unsupported_layer`: the error naming ``layer`` (returned, for the caller to raise)."""
        return unsupported_layer(layer, why)


@tf.custom_gradient
def relu(x):
    """ReLU with a mask gradient (GREATER, CAST, MUL instead of ReluGrad)."""
    y = tf.nn.relu(x)

    def grad(dy):
        return dy * tf.cast(y > 0, dy.dtype)

    return y, grad


@tf.custom_gradient
def sigmoid(x):
    """LOGISTIC with the analytic gradient ``dy·y·(1 − y)`` (no SigmoidGrad)."""
    y = tf.sigmoid(x)

    def grad(dy):
        return dy * y * (1.0 - y)

    return y, grad


@tf.custom_gradient
def tanh(x):
    """TANH with the analytic gradient ``dy·(1 − y²)`` (no TanhGrad)."""
    y = tf.tanh(x)

    def grad(dy):
        return dy * (1.0 - y * y)

    return y, grad


def unstack(x: _Tensor, axis: int) -> list[_Tensor]:
    """UNPACK of ``x`` along a static ``axis`` (a recurrent layer's time steps, no strided slices); the gradient is a
    PACK of the pieces' gradients (zeros for a piece nothing used)."""
    count = int(x.shape[axis])

    @tf.custom_gradient
    def pieces(x):
        def grad(*dys):
            return tf.stack([tf.zeros_like(p) if d is None else d for p, d in zip(outputs, dys, strict=True)], axis)

        outputs = tf.unstack(x, num=count, axis=axis)
        return outputs, grad

    return list(pieces(x))


def stack(xs: list[_Tensor], axis: int) -> _Tensor:
    """PACK of equally shaped ``xs`` along a new ``axis``; the gradient is an UNPACK."""
    count = len(xs)

    @tf.custom_gradient
    def stacked(*xs):
        def grad(dy):
            return tf.unstack(dy, num=count, axis=axis)

        return tf.stack(xs, axis), grad

    return stacked(*xs)


@tf.custom_gradient
def lstm_cell(z, c):
    """One LSTM step from the pre-activations ``z = x·W + h·U + b`` (``[batch, 4H]``, Keras's gate order ``i, f, g,
    o``) and the cell state ``c``: ``c' = σ(f)·c + σ(i)·tanh(g)``, ``h' = σ(o)·tanh(c')`` as Keras's standard LSTM
    computes it (SPLIT, LOGISTIC, TANH, MUL, ADD), returning ``(h', c')``. The backward pass is the analytic one
    (MUL, SUB, ADD, CONCATENATION): no SigmoidGrad, TanhGrad or SplitGrad."""
    h, c_new, (i, f, g, o, t) = lstm_gates(z, c)

    def grad(dh, dc_new):
        dc = dc_new + dh * o * (1.0 - t * t)
        dz = tf.concat([dc * g * i * (1.0 - i), dc * c * f * (1.0 - f), dc * i * (1.0 - g * g),
                        dh * t * o * (1.0 - o)], axis=-1)
        return dz, dc * f

    return (h, c_new), grad


@tf.custom_gradient
def gru_cell(projected, inner, h):
    """One GRU step (``reset_after=True``, Keras's default) from ``projected = x·W + b_in`` and ``inner = h·U + b_rec``
    (``[batch, 3H]`` each, gate order ``z, r, h̃``): ``z = σ(x_z + u_z)``, ``r = σ(x_r + u_r)``,
    ``h̃ = tanh(x_h + r·u_h)``, ``h' = z·h + (1 − z)·h̃`` as Keras's standard GRU computes it; analytic backward
    pass in builtins (MUL, SUB, ADD, CONCATENATION)."""
    h_new, (z, r, candidate, u_h) = gru_gates(projected, inner, h)

    def grad(dh):
        da_z = dh * (h - candidate) * z * (1.0 - z)
        da_h = dh * (1.0 - z) * (1.0 - candidate * candidate)
        da_r = da_h * u_h * r * (1.0 - r)
        return (tf.concat([da_z, da_r, da_h], axis=-1), tf.concat([da_z, da_r, da_h * r], axis=-1), dh * z)

    return h_new, grad


@tf.custom_gradient
def add(*xs):
    """Keras's ``Add`` of equally shaped inputs, summed in input order (no BroadcastGradientArgs)."""
    y = xs[0]
    for x in xs[1:]:
        y = y + x

    def grad(dy):
        return [dy for _ in xs]

    return y, grad


@tf.custom_gradient
def bias_add(x, b):
    """``x + b`` over the last axis; b's gradient is ``dy`` summed over every other axis."""
    y = tf.nn.bias_add(x, b)

    def grad(dy):
        return dy, tf.reduce_sum(dy, axis=list(range(len(x.shape) - 1)))

    return y, grad


@tf.custom_gradient
def scale_rows(omega, combination):
    """``diag(ω)·B``: row ``k`` of the ``[rank, out]`` combination times ``ω_k``; ω is frozen (zero gradient).

    The combination a principal layer applies (`prism_tf.layers`), formed before the product as the Keras layer
    forms it. ω as a ``[rank, 1]`` column (a RESHAPE) broadcasts in the MUL; the gradient needs no
    BroadcastGradientArgs.
    """
    column = tf.reshape(omega, [-1, 1])
    y = column * combination

    def grad(dy):
        return tf.zeros_like(omega), dy * column

    return y, grad


@tf.custom_gradient
def matmul(x, w):
    """``x @ w`` over the last axis of an ``x`` of any rank >= 2 (Dense on images or tokens, and the 1×1 combination
    of a principal conv): one FULLY_CONNECTED/BATCH_MATMUL on ``x`` reshaped to ``[-1, in]``."""
    shape = x.shape
    x2 = x if shape.rank == 2 else tf.reshape(x, [-1, shape[-1]])
    y2 = tf.matmul(x2, w)
    y = y2 if shape.rank == 2 else tf.reshape(y2, [-1, *shape[1:-1], w.shape[-1]])

    def grad(dy):
        dy2 = dy if shape.rank == 2 else tf.reshape(dy, [-1, w.shape[-1]])
        dx2 = tf.matmul(dy2, w, transpose_b=True)
        dx = dx2 if shape.rank == 2 else tf.reshape(dx2, [-1, *shape[1:]])
        return dx, tf.matmul(x2, dy2, transpose_a=True)

    return y, grad


_INV_SQRT_2PI = 0.3989422804014327  # φ(0) = 1/√(2π)


@tf.custom_gradient
def gelu(x):
    """Keras's ``gelu`` (``approximate=False``: ``x·Φ(x)``, Φ the normal CDF) as LiteRT's GELU builtin.

    The gradient ``Φ(x) + x·φ(x)`` needs Φ, and LiteRT has no ERF kernel: Φ is the forward's ``gelu(x) / x``
    (``0.5 + x·φ(0)`` where ``|x| < 1e-3``, exact there to 1e-10), φ an EXP. Same erf, so the same number as
    TensorFlow's autodiff of ``0.5·x·(1 + erf(x/√2))`` up to float32 round-off.
    """
    y = tf.nn.gelu(x, approximate=False)  # the converter fuses TF's erf formula into one GELU

    def grad(dy):
        small = tf.abs(x) < 1e-3
        cdf = tf.where(small, 0.5 + x * _INV_SQRT_2PI, y / tf.where(small, tf.ones_like(x), x))
        pdf = tf.exp(-0.5 * tf.square(x)) * _INV_SQRT_2PI
        return dy * (cdf + x * pdf)

    return y, grad


def reshape(x: _Tensor, shape: list[int]) -> _Tensor:
    """``tf.reshape(x, shape)``; the gradient reshapes back to ``x``'s static shape (``-1`` for the batch)."""
    back = [-1 if d is None else int(d) for d in x.shape]

    @tf.custom_gradient
    def reshaped(x):
        def grad(dy):
            return tf.reshape(dy, back)

        return tf.reshape(x, shape), grad

    return reshaped(x)


def pad(x: _Tensor, paddings: list[tuple[int, int]]) -> _Tensor:
    """PAD with zeros by ``(before, after)`` per axis; the gradient is a STRIDED_SLICE of the unpadded part."""
    window = tuple(slice(before, -after if after else None) for before, after in paddings)

    @tf.custom_gradient
    def padded(x):
        def grad(dy):
            return dy[window]

        return tf.pad(x, [list(p) for p in paddings]), grad

    return padded(x)


def gather(table: _Tensor, ids: _Tensor) -> _Tensor:
    """``table[ids]`` (GATHER) for integer ``ids`` of any shape; the table's gradient is UNSORTED_SEGMENT_SUM of
    the output gradients by id (what TensorFlow's sparse gradient adds up, as a dense ``[rows, dim]`` tensor)."""
    rows, dim = int(table.shape[0]), int(table.shape[-1])
    ids = tf.cast(ids, tf.int32) if ids.dtype != tf.int32 else ids

    @tf.custom_gradient
    def lookup(table):
        def grad(dy):
            return tf.math.unsorted_segment_sum(tf.reshape(dy, [-1, dim]), tf.reshape(ids, [-1]), rows)

        return tf.gather(table, ids), grad

    return lookup(table)


def transpose(x: _Tensor, perm: list[int]) -> _Tensor:
    """TRANSPOSE by ``perm``; the gradient transposes by its inverse (a constant)."""
    inverse = [perm.index(i) for i in range(len(perm))]

    @tf.custom_gradient
    def transposed(x):
        def grad(dy):
            return tf.transpose(dy, inverse)

        return tf.transpose(x, perm), grad

    return transposed(x)


def scale(x: _Tensor, factor: float) -> _Tensor:
    """``x · factor`` for a Python constant (MUL; no BroadcastGradientArgs in the gradient)."""

    @tf.custom_gradient
    def scaled(x):
        def grad(dy):
            return dy * factor

        return x * factor, grad

    return scaled(x)


def batch_matmul(a: _Tensor, b: _Tensor, transpose_b: bool = False) -> _Tensor:
    """``a @ b`` (``a @ bᵀ``) over the last two axes of equally ranked ``a``, ``b`` with the same leading axes
    (BATCH_MATMUL, also in the gradient)."""

    @tf.custom_gradient
    def product(a, b):
        y = tf.matmul(a, b, transpose_b=transpose_b)

        def grad(dy):
            if transpose_b:
                return tf.matmul(dy, b), tf.matmul(dy, a, transpose_a=True)
            return tf.matmul(dy, b, transpose_b=True), tf.matmul(a, dy, transpose_a=True)

        return y, grad

    return product(a, b)


@tf.custom_gradient
def softmax(x):
    """SOFTMAX over the last axis; the gradient ``(dy − Σ dy·y)·y`` (TensorFlow's SoftmaxGrad, in builtins)."""
    y = tf.nn.softmax(x)

    def grad(dy):
        return (dy - tf.reduce_sum(dy * y, -1, keepdims=True)) * y

    return y, grad


@tf.custom_gradient
def add_table(x, table):
    """``x + table`` for a table of ``x``'s shape without the batch (a learned position table); the table's gradient
    is ``dy`` summed over the batch."""

    def grad(dy):
        return dy, tf.reduce_sum(dy, 0)

    return x + table, grad


def token_average_pool(x: _Tensor, tokens: int) -> _Tensor:
    """The mean over the ``tokens`` axis of a ``[batch, tokens, dim]`` ``x`` (GlobalAveragePooling1D); the gradient
    is a TILE."""

    @tf.custom_gradient
    def pool(x):
        def grad(dy):
            return tf.tile(dy[:, tf.newaxis, :], [1, tokens, 1]) / float(tokens)

        return tf.reduce_mean(x, axis=1), grad

    return pool(x)


def layer_norm(layer: tf.keras.layers.LayerNormalization, shape: tuple) -> CompiledLayer:
    """Keras LayerNormalization over the last axis, as Keras computes it unfused (``tf.nn.moments``, then
    ``x·inv + (β − mean·inv)`` with ``inv = rsqrt(var + ε)·γ``), with the analytic backward pass."""
    epsilon = float(layer.epsilon)
    channels = int(shape[-1])
    axes = list(range(len(shape) - 1))

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        mean = tf.reduce_mean(x, -1, keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(x, mean), -1, keepdims=True)
        rstd = tf.math.rsqrt(variance + epsilon)
        inv = rstd * gamma
        y = x * inv + (beta - mean * inv)

        def grad(dy):
            xhat = (x - mean) * rstd
            dxhat = dy * gamma
            dx = (dxhat - tf.reduce_mean(dxhat, -1, keepdims=True)
                  - xhat * tf.reduce_mean(dxhat * xhat, -1, keepdims=True)) * rstd
            return dx, tf.reduce_sum(dy * xhat, axes), tf.reduce_sum(dy, axes)

        return y, grad

    def apply(inputs, training, updates):
        gamma = tf.convert_to_tensor(layer.gamma) if layer.scale else tf.ones([channels])
        beta = tf.convert_to_tensor(layer.beta) if layer.center else tf.zeros([channels])
        return normalize(inputs[0], gamma, beta)

    return apply


def attention(query: _Tensor, key: _Tensor, value: _Tensor, heads: int, key_dim: int, value_dim: int) -> _Tensor:
    """Multi-head attention of projected ``[batch, tokens, heads·size]`` query, key and value (biases added), as
    Keras's MultiHeadAttention computes it: the query scaled by ``1/√key_dim``, per head (TRANSPOSE to ``[batch,
    heads, tokens, size]``) the scores by one BATCH_MATMUL, SOFTMAX, the weighted values by another BATCH_MATMUL;
    returns the heads merged, ``[batch, query tokens, heads·value_dim]``, for the output projection. Every piece
    has its own builtin backward pass."""
    query_tokens = int(query.shape[1])

    def split(x, size):  # [batch, heads, tokens, size]
        return transpose(reshape(x, [-1, int(x.shape[1]), heads, size]), [0, 2, 1, 3])

    q = split(scale(query, 1.0 / math.sqrt(float(key_dim))), key_dim)
    scores = softmax(batch_matmul(q, split(key, key_dim), transpose_b=True))  # [batch, heads, T, S]
    context = transpose(batch_matmul(scores, split(value, value_dim)), [0, 2, 1, 3])  # [batch, T, heads, value_dim]
    return reshape(context, [-1, query_tokens, heads * value_dim])


def global_average_pool(x: _Tensor, height: int, width: int) -> _Tensor:
    """The mean over the ``height × width`` positions of a 4-D ``x``; the gradient is a TILE."""

    @tf.custom_gradient
    def pool(x):
        def grad(dy):
            return tf.tile(dy[:, tf.newaxis, tf.newaxis, :], [1, height, width, 1]) / float(height * width)

        return tf.reduce_mean(x, axis=[1, 2]), grad

    return pool(x)


def cross_entropy(logits: _Tensor, onehot: _Tensor) -> _Tensor:
    """Mean sparse softmax cross-entropy, ``−Σ onehot·log_softmax / N``, with gradient ``(softmax − onehot)/N``."""

    @tf.custom_gradient
    def loss(logits):
        count = tf.cast(tf.shape(logits)[0], logits.dtype)
        log_probs = tf.nn.log_softmax(logits)
        value = -tf.reduce_sum(onehot * log_probs) / count

        def grad(dl):
            return dl * (tf.exp(log_probs) - onehot) / count

        return value, grad

    return loss(logits)


class Conv:
    """2-D convolution (NHWC, no dilation) with a builtin-only backward pass (docs/export.md, "On-device training").

    Input gradient: ``conv2d_transpose`` (TRANSPOSE_CONV; a MatMul for stride-1 1×1). Filter gradient: the
    ``[N·Ho·Wo, k·k·Cin]`` patch matrix times the output gradient — one PAD, k·k strided slices (stride handled by
    the slice step) and a CONCATENATION, or just a strided slice for 1×1 — in one MatMul; when the patches of
    ``batch_size`` examples exceed ``max_patch_bytes``, summed over batch chunks in a WHILE loop.
    """

    def __init__(self, input_shape: tuple, kernel: tuple[int, int], strides: tuple[int, int], padding: str,
                 batch_size: int, max_patch_bytes: int) -> None:
        _, self.height, self.width, self.channels = (int(d) if d is not None else None for d in input_shape)
        self.kernel, self.strides, self.padding = kernel, strides, padding.upper()
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"unsupported padding {padding!r}")
        out, pads = [], []
        for size, k, s in ((self.height, kernel[0], strides[0]), (self.width, kernel[1], strides[1])):
            if self.padding == "SAME":
                o = -(-size // s)
                total = max((o - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            else:
                o = (size - k) // s + 1
                pads.append((0, 0))
            out.append(o)
        self.out_height, self.out_width = out
        self.pads = pads
        self.pointwise = kernel == (1, 1)
        patch_bytes = self.out_height * self.out_width * kernel[0] * kernel[1] * self.channels * 4
        self.chunk = None  # examples per chunk, None for one shot
        if not self.pointwise and patch_bytes * batch_size > max_patch_bytes:
            self.chunk = max(1, max_patch_bytes // patch_bytes)

    def __call__(self, x: _Tensor, w: _Tensor) -> _Tensor:
        """``conv2d(x, w)`` with the builtin-only gradient."""

        @tf.custom_gradient
        def conv(x, w):
            y = tf.nn.conv2d(x, w, strides=[1, *self.strides, 1], padding=self.padding)

            def grad(dy):
                return self.input_gradient(x, w, dy), self.filter_gradient(x, dy, w.shape)

            return y, grad

        return conv(x, w)

    def input_gradient(self, x: _Tensor, w: _Tensor, dy: _Tensor) -> _Tensor:
        """``∂loss/∂x`` from the output gradient ``dy``."""
        if self.pointwise and self.strides == (1, 1):
            cout = w.shape[-1]
            dx = tf.matmul(tf.reshape(dy, [-1, cout]), tf.reshape(w, [self.channels, cout]), transpose_b=True)
            return tf.reshape(dx, [-1, self.height, self.width, self.channels])
        return tf.nn.conv2d_transpose(dy, w, tf.shape(x), strides=[1, *self.strides, 1], padding=self.padding)

    def _patches(self, x: _Tensor) -> _Tensor:
        """``[n, Ho, Wo, k·k·Cin]``: the (padded) input window of each output position, in kernel order."""
        (top, bottom), (left, right) = self.pads
        if top or bottom or left or right:
            x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        sh, sw = self.strides
        span_h, span_w = (self.out_height - 1) * sh + 1, (self.out_width - 1) * sw + 1
        columns = [x[:, i:i + span_h:sh, j:j + span_w:sw, :]
                   for i in range(self.kernel[0]) for j in range(self.kernel[1])]
        return columns[0] if len(columns) == 1 else tf.concat(columns, axis=-1)

    def filter_gradient(self, x: _Tensor, dy: _Tensor, kernel_shape: tf.TensorShape) -> _Tensor:
        """``∂loss/∂w``: patches times ``dy``, in batch chunks beyond the patch budget."""
        rows = self.kernel[0] * self.kernel[1] * self.channels
        cout = int(kernel_shape[-1])

        def chunk_gradient(xs, dys):
            patches = tf.reshape(self._patches(xs), [-1, rows])
            return tf.matmul(patches, tf.reshape(dys, [-1, cout]), transpose_a=True)

        if self.chunk is None:
            grad = chunk_gradient(x, dy)
        else:
            size = self.chunk
            count = (tf.shape(x)[0] + size - 1) // size

            def body(i, total):
                start = i * size
                return i + 1, total + chunk_gradient(x[start:start + size], dy[start:start + size])

            _, grad = tf.while_loop(lambda i, total: i < count, body,
                                    [tf.constant(0), tf.zeros([rows, cout], dy.dtype)])
        return tf.reshape(grad, kernel_shape)


def batch_norm(layer: tf.keras.layers.BatchNormalization, axes: list[int], examples: int) -> CompiledLayer:
    """Keras BatchNormalization: batch statistics and a moving-average update in training, moving ones otherwise.

    ``axes`` are the reduced axes (all but the last); ``examples`` the positions per example (the batch size
    multiplies it) for the Bessel correction of the moving variance.
    """
    momentum, epsilon = float(layer.momentum), float(layer.epsilon)

    def params(channels: int) -> tuple[_Tensor, _Tensor]:
        gamma = tf.convert_to_tensor(layer.gamma) if layer.scale else tf.ones([channels])
        beta = tf.convert_to_tensor(layer.beta) if layer.center else tf.zeros([channels])
        return gamma, beta

    def apply(inputs, training, updates):
        (x,) = inputs
        gamma, beta = params(x.shape[-1])
        if not training:
            inv = tf.math.rsqrt(tf.convert_to_tensor(layer.moving_variance) + epsilon) * gamma
            return x * inv + (beta - tf.convert_to_tensor(layer.moving_mean) * inv)
        mean = tf.stop_gradient(tf.reduce_mean(x, axes))
        variance = tf.stop_gradient(tf.reduce_mean(tf.math.squared_difference(x, mean), axes))

        @tf.custom_gradient
        def normalize(x, gamma, beta):
            rstd = tf.math.rsqrt(variance + epsilon)
            xhat = (x - mean) * rstd
            y = xhat * gamma + beta

            def grad(dy):
                dxhat = dy * gamma
                dx = (dxhat - tf.reduce_mean(dxhat, axes) - xhat * tf.reduce_mean(dxhat * xhat, axes)) * rstd
                return dx, tf.reduce_sum(dy * xhat, axes), tf.reduce_sum(dy, axes)

            return y, grad

        y = normalize(x, gamma, beta)
        # Keras's fused BN: the moving variance takes the Bessel-corrected batch variance n/(n-1).
        n = tf.cast(tf.shape(x)[0], tf.float32) * float(examples)
        unbiased = variance * (n / tf.maximum(n - 1.0, 1.0))
        updates.append((layer.moving_mean, layer.moving_mean * momentum + mean * (1.0 - momentum)))
        updates.append((layer.moving_variance, layer.moving_variance * momentum + unbiased * (1.0 - momentum)))
        return y

    return apply


def group_norm(layer: tf.keras.layers.GroupNormalization, shape: tuple) -> CompiledLayer:
    """Keras GroupNormalization over ``[N, H·W, G, C/G]`` (4-D throughout), training and inference alike."""
    _, height, width, channels = shape
    groups, epsilon = int(layer.groups), float(layer.epsilon)
    grouped = [-1, height * width, groups, channels // groups]
    axes = [1, 3]

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        xg = tf.reshape(x, grouped)
        mean = tf.reduce_mean(xg, axes, keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(xg, mean), axes, keepdims=True)
        rstd = tf.math.rsqrt(variance + epsilon)
        xhat = tf.reshape((xg - mean) * rstd, [-1, height, width, channels])
        y = xhat * gamma + beta

        def grad(dy):
            dxhat = tf.reshape(dy * gamma, grouped)
            xhat_g = tf.reshape(xhat, grouped)
            dx = (dxhat - tf.reduce_mean(dxhat, axes, keepdims=True)
                  - xhat_g * tf.reduce_mean(dxhat * xhat_g, axes, keepdims=True)) * rstd
            return (tf.reshape(dx, [-1, height, width, channels]), tf.reduce_sum(dy * xhat, [0, 1, 2]),
                    tf.reduce_sum(dy, [0, 1, 2]))

        return y, grad

    def apply(inputs, training, updates):
        gamma = tf.convert_to_tensor(layer.gamma) if layer.scale else tf.ones([channels])
        beta = tf.convert_to_tensor(layer.beta) if layer.center else tf.zeros([channels])
        return normalize(inputs[0], gamma, beta)

    return apply


__all__ = ["FLEX_HINT", "SUPPORTED", "BuiltinOps", "Conv", "Updates", "activation_function", "add", "add_table",
           "attention", "batch_matmul", "batch_norm", "bias_add", "cross_entropy", "gather", "gelu",
           "global_average_pool", "group_norm", "gru_cell", "layer_norm", "lstm_cell", "matmul",
           "pad", "relu", "reshape", "scale", "scale_rows", "sigmoid", "softmax", "stack",
           "tanh", "token_average_pool", "transpose", "unstack", "unsupported_layer"]
