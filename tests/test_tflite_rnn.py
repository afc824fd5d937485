"""On-device training of the layers with several kernels with LiteRT builtin ops only (export/tflite/;
docs/export.md, "On-device training"): LSTM, GRU (plain and principal), PrincipalMultiHeadAttention and the tied
ReversibleEmbedding.

Per layer, in TensorFlow: the unrolled recurrent layers' forward and backward against Keras's own layer and
autodiff. Then LiteRT: a charlstm-like next-token model (labels ``[N, T]``), its GRU variant, a ViT with factorized
attention and a tied-embedding language model, each factorized, sampled at keep 0.5 and extracted: builtin ops only,
``infer`` equal to Keras's, the weights after one and after five ``train`` steps equal to the same steps in
TensorFlow. TensorFlow only sees batches of 8 (docs/pitfalls.md, "oneDNN and batch shapes").
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_tflite_train import BATCH, BUILTIN_OPS, CLASSES, SHAPE, Exported, Reference, max_errors, synthetic_batches
from test_tflite_vit import STEP, assert_close, compiled_vs_keras

import prism_tf
from export import tflite as tt
from prism_tf.models.zoo import vit

VOCAB, STEPS = 20, 10


def sequences(seed: int, batch: int = BATCH, steps: int = 5, features: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, steps, features)).astype(np.float32)


def randomize(layer: tf.keras.layers.Layer, scale: float = 0.5) -> None:
    for weight in layer.trainable_weights:
        weight.assign(np.random.default_rng(len(weight.name)).normal(size=weight.shape) * scale)


def principal_form(layer: tf.keras.layers.Layer, shape: tuple) -> tf.keras.layers.Layer:
    """``layer`` (built) in a one-layer model, factorized and extracted at keep 0.5: its principal form."""
    inputs = tf.keras.Input(shape)
    model = tf.keras.Model(inputs, layer(inputs))
    factorized = prism_tf.factorize(model)
    sub = prism_tf.extract(factorized, prism_tf.sample(factorized, keep_ratio=0.5, seed=(0, 0, 1),
                                                       strategy="unbiased"))
    return sub.get_layer(layer.name)


@pytest.mark.parametrize("form", ["plain", "principal"])
@pytest.mark.parametrize("sequences_out", [True, False], ids=["sequences", "last"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_unrolled_recurrent_layer_matches_keras(kind, sequences_out, form):
    tf.keras.utils.set_random_seed(0)
    x = sequences(0)
    cls = tf.keras.layers.LSTM if kind == "lstm" else tf.keras.layers.GRU
    layer = cls(6, return_sequences=sequences_out, name="rnn")
    layer(tf.constant(x))
    randomize(layer)  # non-zero biases, saturating gates
    if form == "principal":
        layer = principal_form(layer, x.shape[1:])
        assert type(layer).__name__ == f"Principal{cls.__name__}"
    assert_close(compiled_vs_keras(layer, [x]), 1e-6)  # measured ≤ 4.4e-7 (plain LSTM), ≤ 1.6e-7 otherwise


@pytest.mark.parametrize("case", ["go_backwards", "relu", "return_state", "reset_before"])
def test_recurrent_options_the_builtins_cannot_train_name_the_flex_runtime(case):
    inputs = tf.keras.Input((5, 4))
    if case == "go_backwards":
        x = tf.keras.layers.LSTM(6, go_backwards=True, name="rnn")(inputs)
    elif case == "relu":
        x = tf.keras.layers.GRU(6, activation="relu", name="rnn")(inputs)
    elif case == "return_state":
        x = tf.keras.layers.LSTM(6, return_state=True, name="rnn")(inputs)[0]
    else:
        x = tf.keras.layers.GRU(6, reset_after=False, name="rnn")(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3)(x))
    expected = {"go_backwards": r"'rnn' of type LSTM: go_backwards.*--runtime flex",
                "relu": r"'rnn' of type GRU: activations relu/sigmoid.*--runtime flex",
                "return_state": r"'rnn' \(LSTM\) has several outputs.*--runtime flex",
                "reset_before": r"'rnn' of type GRU: reset_after=False.*--runtime flex"}[case]
    with pytest.raises(ValueError, match=expected):
        tt.build_training_module(model, STEP)


def char_model(cell: str = "lstm") -> tf.keras.Model:
    """charlstm in small: Embedding(20, 8) → RNN(12) → RNN(10) (both return_sequences) → Dense(20) per step."""
    cls = tf.keras.layers.LSTM if cell == "lstm" else tf.keras.layers.GRU
    inputs = tf.keras.Input((STEPS,), dtype=tf.int32)
    x = tf.keras.layers.Embedding(VOCAB, 8, name="embedding")(inputs)
    x = cls(12, return_sequences=True, name="rnn1")(x)
    x = cls(10, return_sequences=True, name="rnn2")(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(VOCAB, name="classifier")(x))


def tied_model() -> tf.keras.Model:
    """A tied-embedding language model: ReversibleEmbedding(20, 8) → LSTM(8) → the same table, reversed."""
    inputs = tf.keras.Input((STEPS,), dtype=tf.int32)
    embed = prism_tf.layers.ReversibleEmbedding(VOCAB, 8, name="tied")
    x = tf.keras.layers.LSTM(8, return_sequences=True, name="rnn")(embed(inputs))
    return tf.keras.Model(inputs, embed(x, reverse=True))


def text_batches(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids [8, T] and their next tokens [8, T] from a noisy cyclic text."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        start = rng.integers(0, VOCAB, (BATCH, 1))
        text = (start + np.arange(STEPS + 1)) % VOCAB
        text = np.where(rng.uniform(size=text.shape) < 0.2, rng.integers(0, VOCAB, text.shape), text)
        batches.append((text[:, :-1].astype(np.int32), text[:, 1:].astype(np.int32)))
    return batches


def sampled(model: tf.keras.Model, seed: int = 3, **factorize) -> tf.keras.Model:
    factorized = prism_tf.factorize(model, **factorize)
    return prism_tf.extract(factorized, prism_tf.sample(factorized, keep_ratio=0.5, seed=(0, 0, seed)))


def build(case: str) -> tuple[tf.keras.Model, list[tuple[np.ndarray, np.ndarray]]]:
    """A sub-model at keep 0.5 and six batches; a sequence model's trainable weights are redrawn (N(0, 0.5²)) so
    that the embeddings (initialized within ±0.05) do not leave every logit near zero."""
    tf.keras.utils.set_random_seed(0)
    if case in ("lstm", "gru", "tied"):
        sub = sampled(char_model(case) if case != "tied" else tied_model())
        for layer in sub.layers:
            randomize(layer)
        return sub, text_batches(6, seed=1 if case != "tied" else 2)
    full = vit(width=16, depth=2, heads=2, mlp_ratio=2.0, patch=8, num_classes=CLASSES, input_shape=SHAPE)
    return sampled(full, attention=True), synthetic_batches(6, seed=4)


PRINCIPAL = {"lstm": {"PrincipalEmbedding", "PrincipalLSTM"}, "gru": {"PrincipalEmbedding", "PrincipalGRU"},
             "tied": {"PrincipalReversibleEmbedding", "PrincipalLSTM"},
             "vit": {"PrincipalMultiHeadAttention", "PrincipalDense"}}
EXPECTED_OPS = {"lstm": {"UNPACK", "PACK", "LOGISTIC", "TANH", "SPLIT", "GATHER", "FULLY_CONNECTED"},
                "gru": {"UNPACK", "PACK", "LOGISTIC", "TANH", "SPLIT", "GATHER", "FULLY_CONNECTED"},
                "tied": {"UNPACK", "GATHER", "TRANSPOSE", "UNSORTED_SEGMENT_SUM"},
                "vit": {"BATCH_MATMUL", "SOFTMAX", "GELU"}}


@pytest.fixture(scope="module", params=["lstm", "gru", "vit", "tied"])
def exported(request):
    sub, batches = build(request.param)
    return request.param, Exported(sub, STEP), batches


def test_builtin_ops_only_and_sequence_labels(exported):
    case, model, _ = exported
    assert {type(layer).__name__ for layer in prism_tf.kinds.principal_layers(model.sub)} == PRINCIPAL[case]
    used = set(tt.model_ops(model.flatbuffer))
    assert used <= BUILTIN_OPS, f"non-builtin ops: {sorted(used - BUILTIN_OPS)}"
    assert EXPECTED_OPS[case] <= used, sorted(used)
    labels = model.module.label_signature.shape.as_list()
    assert labels == ([None] if case == "vit" else [None, STEPS])


def test_infer_matches_keras(exported):
    _, model, batches = exported
    x = batches[0][0]
    got = model.interpreter()["infer"](x=x)["logits"]
    want = model.sub(x, training=False).numpy()
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) < 2e-6 * max(1.0, float(np.max(np.abs(want))))


def test_one_and_five_train_steps_match_tensorflow(exported):
    _, model, batches = exported
    reference = Reference(model)
    runners = model.interpreter()
    x, y = batches[0]
    want_loss, _ = reference.train(x, y)
    assert float(runners["train"](x=x, y=y)["loss"]) == pytest.approx(float(want_loss), abs=1e-6)
    got = runners["get_weights"]()
    errors = max_errors(model.names, got, reference.weights())
    assert max(errors.values()) < 1e-6, errors
    moved = max_errors(model.names, got, model.weights)
    assert max(moved.values()) > 1e-4
    losses = [(float(runners["train"](x=x, y=y)["loss"]), float(reference.train(x, y)[0])) for x, y in batches[1:]]
    assert max(abs(got - want) for got, want in losses) < 1e-5, losses
    errors = max_errors(model.names, runners["get_weights"](), reference.weights())
    assert max(errors.values()) < 1e-5, errors
