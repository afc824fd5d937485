"""On-device training of a ViT and of the sequence kinds with LiteRT builtin ops only (export/tflite/;
docs/export.md, "On-device training").

Per layer, in TensorFlow (no conversion): the compiled forward and backward of LayerNorm, gelu, MultiHeadAttention,
Dense and PrincipalDense on tokens, the position table and token pooling against the Keras layer's own forward and
autodiff. Then LiteRT: a whole ViT sub-model (factorized MLPs, two heads) converted once: builtin ops only, trains
without TensorFlow, infer and one step equal to Keras's; the flex export of the same ViT; a Conv1D net and a
factorized embedding, one LiteRT step each. TensorFlow only sees batches of 8 (docs/pitfalls.md, "oneDNN and batch
shapes").
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from test_tflite_train import (
    BATCH,
    BUILTIN_OPS,
    CLASSES,
    OPTIONS,
    SHAPE,
    Exported,
    Reference,
    check_step,
    max_errors,
    run_without_tensorflow,
    synthetic_batches,
)

import prism_tf
from export import tflite as tt
from export.tflite import compiler, ops
from prism_tf.models.zoo import PositionEmbedding, vit

TOKENS, DIM = 6, 12
STEP = tt.TrainStep(learning_rate=0.05, momentum=0.9, options=OPTIONS)


def compiled_vs_keras(layer: tf.keras.layers.Layer, inputs: list[np.ndarray], seed: int = 0) -> dict[str, float]:
    """Largest |compiled − Keras| of the layer's output and of the gradients of a random linear function of it with
    respect to every input and every trainable weight, each relative to the largest Keras value of that tensor."""
    tensors = [tf.constant(x) for x in inputs]
    layer(*tensors)  # build
    compiled = compiler.compile_layer(layer, [(None, *x.shape[1:]) for x in inputs], ops.BuiltinOps(BATCH, 2**30))
    probe = None
    results = {}
    for name, run in (("keras", lambda xs: layer(*xs)), ("compiled", lambda xs: compiled(list(xs), True, []))):
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            y = run(tensors)
            if probe is None:
                probe = tf.constant(np.random.default_rng(seed).normal(size=y.shape).astype(np.float32))
            loss = tf.reduce_sum(y * probe)
        grads = tape.gradient(loss, [*tensors, *layer.trainable_weights])
        results[name] = [y.numpy(), *[g.numpy() for g in grads]]
    labels = ["output", *[f"d_input{i}" for i in range(len(inputs))], *[w.name for w in layer.trainable_weights]]
    return {label: float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
            for label, want, got in zip(labels, results["keras"], results["compiled"], strict=True)}


def tokens(seed: int, length: int = TOKENS, dim: int = DIM, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=(BATCH, length, dim))).astype(np.float32)


def assert_close(errors: dict[str, float], tolerance: float) -> None:
    worst = max(errors, key=errors.get)
    assert errors[worst] < tolerance, f"{worst}: {errors[worst]:.2e} (all: {errors})"


def test_layer_norm_matches_keras():
    layer = tf.keras.layers.LayerNormalization(epsilon=1e-6)
    x = tokens(0, scale=3.0) + 2.0
    layer.build(x.shape)
    layer.gamma.assign(np.random.default_rng(1).uniform(0.5, 1.5, DIM))
    layer.beta.assign(np.random.default_rng(2).normal(size=DIM))
    errors = compiled_vs_keras(layer, [x])
    assert errors["output"] == 0.0  # Keras's own unfused formula, op for op
    assert_close(errors, 2e-6)  # the analytic backward pass against autodiff: measured 8e-7


def test_gelu_dense_on_tokens_matches_keras():
    errors = compiled_vs_keras(tf.keras.layers.Dense(20, activation="gelu"), [tokens(3, scale=2.0)])
    assert_close(errors, 1e-6)
    assert compiled_vs_keras(tf.keras.layers.Dense(7), [tokens(4)])["output"] < 1e-6


def test_gelu_gradient_near_zero_and_in_the_tails():
    x = tf.constant(np.concatenate([np.linspace(-12, 12, 97), [0.0, 1e-4, -1e-4, 9.99e-4, 1.001e-3, -1e-3]])
                    .astype(np.float32))
    for function in (ops.gelu, lambda v: tf.keras.activations.gelu(v)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = function(x)
        if function is ops.gelu:
            got_y, got = y.numpy(), tape.gradient(y, x).numpy()
        else:
            want_y, want = y.numpy(), tape.gradient(y, x).numpy()
    assert np.array_equal(got_y, want_y)
    assert np.max(np.abs(got - want)) < 1e-6


def test_principal_dense_on_tokens_matches_keras():
    inputs = tf.keras.Input((TOKENS, DIM))
    outputs = tf.keras.layers.Dense(10, activation="gelu", name="mlp")(inputs)
    model = prism_tf.factorize(tf.keras.Model(inputs, tf.keras.layers.GlobalAveragePooling1D()(outputs)))
    sub = prism_tf.extract(model, prism_tf.sample(model, keep_ratio=0.5, seed=(0, 0, 1), strategy="unbiased"))
    layer = sub.get_layer("mlp")
    assert isinstance(layer, prism_tf.PrincipalDense)
    assert_close(compiled_vs_keras(layer, [tokens(5)]), 1e-6)


@pytest.mark.parametrize("case", ["self", "cross", "key"])
def test_multi_head_attention_matches_keras(case):
    tf.keras.utils.set_random_seed(7)
    layer = tf.keras.layers.MultiHeadAttention(num_heads=3, key_dim=5, value_dim=4)
    query = tokens(6, scale=2.0)
    if case == "self":
        inputs = [query, query]
    elif case == "cross":
        inputs = [query, tokens(7, length=9, dim=8)]
    else:
        inputs = [query, tokens(7, length=9, dim=8), tokens(8, length=9, dim=10)]
    layer(*[tf.constant(x) for x in inputs])
    for weight in layer.trainable_weights:  # non-zero biases
        weight.assign(np.random.default_rng(len(weight.name)).normal(size=weight.shape) * 0.5)
    assert_close(compiled_vs_keras(layer, inputs), 2e-6)


def test_position_table_and_token_pooling_match_keras():
    layer = PositionEmbedding()
    assert_close(compiled_vs_keras(layer, [tokens(9)]), 1e-7)
    assert_close(compiled_vs_keras(tf.keras.layers.GlobalAveragePooling1D(), [tokens(10)]), 1e-7)
    assert_close(compiled_vs_keras(tf.keras.layers.Reshape((TOKENS * 2, DIM // 2)), [tokens(11)]), 0.0 + 1e-12)


def test_layers_the_builtins_cannot_train_name_the_flex_runtime():
    inputs = tf.keras.Input(SHAPE)
    x = tf.keras.layers.Conv2D(8, 8, strides=8, name="patches")(inputs)
    x = tf.keras.layers.Reshape((16, 8))(x)
    attention = tf.keras.layers.MultiHeadAttention(2, 4, dropout=0.1, name="dropping_attention")
    x = tf.keras.layers.GlobalAveragePooling1D()(attention(x, x))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(CLASSES)(x))
    with pytest.raises(ValueError, match=r"'dropping_attention' of type MultiHeadAttention: dropout.*--runtime flex"):
        tt.build_training_module(model, STEP)
    inputs = tf.keras.Input(SHAPE)
    x = tf.keras.layers.Reshape((32 * 32, 3))(inputs)
    tanh_gelu = lambda v: tf.keras.activations.gelu(v, approximate=True)  # noqa: E731
    x = tf.keras.layers.Dense(4, activation=tanh_gelu, name="tanh_gelu")(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(CLASSES)(tf.keras.layers.GlobalAveragePooling1D()(x)))
    with pytest.raises(ValueError, match=r"'tanh_gelu' of type Dense: activation.*--runtime flex"):
        tt.build_training_module(model, STEP)


def make_vit_submodel(seed: int = 0) -> tf.keras.Model:
    """A factorized ViT (width 16, 2 blocks, 2 heads, 8×8 patches of 32×32×3) at keep ratio 0.5, LayerNorm
    parameters randomized."""
    tf.keras.utils.set_random_seed(seed)
    full = vit(width=16, depth=2, heads=2, mlp_ratio=2.0, patch=8, num_classes=CLASSES, input_shape=SHAPE)
    factorized = prism_tf.factorize(full)
    sub = prism_tf.extract(factorized, prism_tf.sample(factorized, keep_ratio=0.5, seed=(0, 0, 3)))
    rng = np.random.default_rng(seed)
    for layer in prism_tf.kinds.walk_layers(sub):
        if isinstance(layer, tf.keras.layers.LayerNormalization):
            layer.gamma.assign(rng.uniform(0.8, 1.2, layer.gamma.shape))
            layer.beta.assign(rng.normal(0.0, 0.1, layer.beta.shape))
    return sub


@pytest.fixture(scope="module")
def vit_exported() -> Exported:
    return Exported(make_vit_submodel(), STEP)


def test_vit_uses_builtin_ops_only_and_trains_without_flex(vit_exported, tmp_path):
    assert {type(layer).__name__ for layer in vit_exported.sub.layers} >= {
        "MultiHeadAttention", "LayerNormalization", "PrincipalDense", "PositionEmbedding", "Reshape",
        "GlobalAveragePooling1D"}
    used = set(tt.model_ops(vit_exported.flatbuffer))
    assert used <= BUILTIN_OPS, f"non-builtin ops: {sorted(used - BUILTIN_OPS)}"
    assert {"GELU", "BATCH_MATMUL", "SOFTMAX", "TRANSPOSE", "FULLY_CONNECTED", "CONV_2D"} <= used
    result = run_without_tensorflow(vit_exported.flatbuffer, tmp_path)  # batches of 8, 5, 8
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(line) for line in result.stdout.split()]
    assert len(losses) == 3 and all(np.isfinite(loss) and loss > 0 for loss in losses)


def test_vit_infer_matches_keras(vit_exported):
    (x, _), = synthetic_batches(1, seed=3)
    got = Interpreter(model_content=vit_exported.flatbuffer).get_signature_runner("infer")(x=x)["logits"]
    want = vit_exported.sub(x, training=False).numpy()
    assert np.max(np.abs(got - want)) < 2e-6 * max(1.0, float(np.max(np.abs(want))))


def test_vit_train_step_in_litert_matches_keras(vit_exported):
    runners = vit_exported.interpreter()
    check_step(vit_exported, Reference(vit_exported), runners["train"], runners["get_weights"])


def test_vit_five_steps_track_keras(vit_exported):
    reference = Reference(vit_exported)
    runners = vit_exported.interpreter()
    batches = synthetic_batches(5, seed=11)
    got = np.array([float(runners["train"](x=x, y=y)["loss"]) for x, y in batches])
    want = np.array([float(reference.train(x, y)[0]) for x, y in batches])
    assert np.max(np.abs(got - want)) < 1e-5
    errors = max_errors(vit_exported.names, runners["get_weights"](), reference.weights())
    assert max(errors.values()) < 1e-5


@pytest.mark.slow  # 18 s; tests/test_tflite_train.py's flex test keeps the runtime in the default suite
def test_vit_flex_export_converts_and_declares_its_flex_ops(tmp_path):
    # ai_edge_litert has no Flex delegate of its own (docs/export.md): without TensorFlow in the process the model
    # refuses to load, so the flex runtime is checked to convert and to declare what it needs.
    module = tt.build_training_module(make_vit_submodel(), STEP, "flex")
    flatbuffer = tt.convert(module, "flex")
    flex_ops = [op for op in tt.model_ops(flatbuffer) if op.startswith("Flex")]
    assert "FlexErf" in flex_ops  # Keras's GELU gradient: LiteRT has no ERF kernel
    result = run_without_tensorflow(flatbuffer, tmp_path)
    assert result.returncode != 0 and "Select TensorFlow op" in result.stderr


def conv1d_net() -> tf.keras.Model:
    """Sequences [12, 3]: a kept-whole first Conv1D (same), a causal one, a strided valid gelu one, pooling, head."""
    inputs = tf.keras.Input((12, 3))
    x = tf.keras.layers.Conv1D(6, 3, padding="same", activation="relu", name="c1")(inputs)
    x = tf.keras.layers.Conv1D(8, 3, padding="causal", activation="relu", name="c2")(x)
    x = tf.keras.layers.Conv1D(8, 3, strides=2, padding="valid", activation="gelu", name="c3")(x)
    x = tf.keras.layers.GlobalAveragePooling1D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x))


def embedding_net() -> tf.keras.Model:
    """Token ids [6] (int32) of a 20-word vocabulary: an Embedding, pooling, head."""
    inputs = tf.keras.Input((6,), dtype=tf.int32)
    x = tf.keras.layers.Embedding(20, 8, name="embed")(inputs)
    x = tf.keras.layers.GlobalAveragePooling1D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x))


@pytest.mark.parametrize("case", ["conv1d", "embedding"])
def test_sequence_kinds_train_in_litert_as_in_keras(case):
    tf.keras.utils.set_random_seed(0)
    factorized = prism_tf.factorize(conv1d_net() if case == "conv1d" else embedding_net())
    sub = prism_tf.extract(factorized, prism_tf.sample(factorized, keep_ratio=0.5, seed=(0, 0, 3),
                                                       strategy="unbiased"))
    principal = {type(layer).__name__ for layer in prism_tf.kinds.principal_layers(sub)}
    assert principal == ({"PrincipalConv1D"} if case == "conv1d" else {"PrincipalEmbedding"})
    exported = Exported(sub, STEP)
    used = set(tt.model_ops(exported.flatbuffer))
    assert used <= BUILTIN_OPS, sorted(used - BUILTIN_OPS)
    assert ({"CONV_2D", "PAD", "GELU"} if case == "conv1d" else {"GATHER", "UNSORTED_SEGMENT_SUM"}) <= used
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(BATCH, 12, 3)).astype(np.float32) if case == "conv1d"
         else rng.integers(0, 20, (BATCH, 6)).astype(np.int32))
    y = rng.integers(0, 3, BATCH).astype(np.int32)
    runners = exported.interpreter()
    want = sub(x, training=False).numpy()
    assert np.max(np.abs(runners["infer"](x=x)["logits"] - want)) < 1e-6
    reference = Reference(exported)
    want_loss, _ = reference.train(x, y)
    assert float(runners["train"](x=x, y=y)["loss"]) == pytest.approx(float(want_loss), abs=1e-6)
    got = runners["get_weights"]()
    errors = max_errors(exported.names, got, reference.weights())
    assert max(errors.values()) < 1e-6, errors  # measured 1.5e-8 (conv1d), 7e-9 (embedding)
    moved = max_errors(exported.names, got, exported.weights)
    assert moved[exported.names[0]] > 1e-4


def test_embedding_with_mask_zero_names_the_flex_runtime():
    inputs = tf.keras.Input((6,), dtype=tf.int32)
    x = tf.keras.layers.Embedding(20, 8, mask_zero=True, name="masked")(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3)(tf.keras.layers.GlobalAveragePooling1D()(x)))
    with pytest.raises(ValueError, match=r"'masked' of type Embedding: mask_zero.*--runtime flex"):
        tt.build_training_module(model, STEP)
