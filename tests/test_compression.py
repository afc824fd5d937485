"""tensorflow-model-optimization on factorized models (`prism_tf.compression`): tfmot's magnitude pruning wraps the
principal layers and strips back to them with sparse factors; tfmot's quantization-aware training quantizes them
with our configs and the result converts to a full-integer TFLite model. Kept small: these run by default."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude

import prism_tf
from prism_tf import compression
from prism_tf.kinds import principal_layers
from prism_tf.layers import PrincipalConv2D, PrincipalDense, PrincipalEmbedding


def _factorized_cnn() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((12, 12, 3))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = tf.keras.layers.ReLU()(x)
    x = tf.keras.layers.Conv2D(16, 3, padding="same", name="conv")(x)
    x = tf.keras.layers.BatchNormalization(name="bn")(x)
    x = tf.keras.layers.ReLU()(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dense(16, activation="relu", name="hidden")(x)
    model = prism_tf.factorize(tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="classifier")(x)))
    assert [type(layer) for layer in principal_layers(model)] == [PrincipalConv2D, PrincipalDense]
    return model


def _batch(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.uniform(size=(n, 12, 12, 3)).astype(np.float32), (np.arange(n) % 3).astype(np.int32)


def test_principal_layers_are_tfmot_prunable_layers():
    from tensorflow_model_optimization.python.core.sparsity.keras.prunable_layer import PrunableLayer

    model = _factorized_cnn()
    for layer in principal_layers(model):
        assert isinstance(layer, PrunableLayer)
        assert layer.get_prunable_weights() == [layer.principal_kernels, layer.combination]
    embedding = PrincipalEmbedding(10, 4, rank=3)
    embedding.build(None)
    assert isinstance(embedding, PrunableLayer) and compression.prunable_weights(embedding) == [
        embedding.principal_kernels, embedding.combination]


def test_pruned_model_trains_and_strips_back_to_principal_layers_with_sparse_factors():
    model = _factorized_cnn()
    frozen = {layer.name: (layer.singular_values.numpy(), layer.kernel_scale.numpy())
              for layer in principal_layers(model)}
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    wrapped = [layer for layer in pruned.layers if isinstance(layer, PruneLowMagnitude)]
    assert {type(layer.layer) for layer in wrapped} >= {PrincipalConv2D, PrincipalDense}
    pruned.compile(tf.keras.optimizers.SGD(0.01), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _batch()
    history = pruned.fit(x, y, batch_size=8, epochs=1, verbose=0,
                         callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    assert np.isfinite(history.history["loss"][0])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    layers = principal_layers(stripped)
    assert [type(layer) for layer in layers] == [PrincipalConv2D, PrincipalDense]
    assert not any(isinstance(layer, PruneLowMagnitude) for layer in stripped.layers)
    for layer in layers:
        for factor in (layer.principal_kernels.numpy(), layer.combination.numpy()):
            assert np.mean(factor == 0) == pytest.approx(0.5, abs=0.02)
        np.testing.assert_array_equal(layer.singular_values.numpy(), frozen[layer.name][0])  # frozen: untouched
        np.testing.assert_array_equal(layer.kernel_scale.numpy(), frozen[layer.name][1])
    # the stripped model is an ordinary factorized model: it saves, loads and computes as before stripping
    np.testing.assert_allclose(stripped(x).numpy(), pruned(x).numpy(), atol=1e-5)
    assert prism_tf.unfactorize(stripped).count_params() < model.count_params() + 1


def test_quantized_model_trains_and_converts_to_full_integer_tflite():
    model = _factorized_cnn()
    with pytest.raises(RuntimeError, match="not supported"):  # tfmot alone refuses our layers
        tfmot.quantization.keras.quantize_model(model)
    annotated = compression.quantize_annotate(model)
    with compression.quantize_scope():  # tfmot's own quantize_model on the annotated model, in our scope
        quantized = tfmot.quantization.keras.quantize_model(annotated)
    wrapped = {layer.name: layer for layer in quantized.layers
               if isinstance(layer, tfmot.quantization.keras.QuantizeWrapperV2)}
    assert isinstance(wrapped["quant_conv"].layer, PrincipalConv2D)
    assert isinstance(wrapped["quant_conv"].quantize_config, compression.PrincipalQuantizeConfig)
    assert isinstance(wrapped["quant_hidden"].layer, PrincipalDense)
    x, y = _batch()
    quantized.compile(tf.keras.optimizers.SGD(0.01), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert np.isfinite(quantized.fit(x, y, batch_size=8, epochs=1, verbose=0).history["loss"][0])
    logits = quantized(x, training=False).numpy()
    assert logits.shape == (8, 3) and np.all(np.isfinite(logits))
    # the same through our one-call form
    assert [type(layer) for layer in compression.quantize_model(model).layers] == [type(layer) for layer in
                                                                                   quantized.layers]

    converter = tf.lite.TFLiteConverter.from_keras_model(quantized)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(len(x)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # every op int8, or fail
    flatbuffer = converter.convert()
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    tensors = interpreter.get_tensor_details()
    ops = interpreter._get_ops_details()
    products = [op for op in ops if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len([op for op in ops if op["op_name"] == "CONV_2D"]) == 2  # the stem and the principal kernels A
    assert len([op for op in ops if op["op_name"] == "FULLY_CONNECTED"]) == 4  # B of conv, A and B of hidden, head
    for op in products:
        assert [tensors[i]["dtype"] for i in op["inputs"][:2]] == [np.int8, np.int8]
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    lite = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert np.mean(np.argmax(lite, -1) == np.argmax(logits, -1)) >= 0.75


def test_layers_with_several_kernels_are_refused_by_name():
    inputs = tf.keras.Input((5,), dtype="int32")
    x = tf.keras.layers.Embedding(30, 8, name="embedding")(inputs)
    x = tf.keras.layers.LSTM(8, name="lstm")(x)
    model = prism_tf.factorize(tf.keras.Model(inputs, tf.keras.layers.Dense(2)(x)))
    with pytest.raises(ValueError, match=r"several kernels.*\['lstm'\]"):
        compression.quantize_annotate(model)


def test_only_the_compression_package_imports_tfmot():
    """tfmot stays out of the core's import time: no module but prism_tf.compression's imports it."""
    root = Path(prism_tf.__file__).resolve().parents[1]
    importers = set()
    for path in [*(root / "prism_tf").rglob("*.py"), *(root / "export").rglob("*.py"),
                 *(root / "tff_pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.startswith("tensorflow_model_optimization") for name in names):
                importers.add(path.relative_to(root).parent.as_posix())
    assert importers == {"prism_tf/compression"}


def _trained_batches(model: tf.keras.Model, n: int = 4) -> list[np.ndarray]:
    """Four unlabeled batches; the model's BatchNorm statistics set from them (a model as a run leaves it)."""
    rng = np.random.default_rng(2)
    batches = [rng.uniform(size=(16, 12, 12, 3)).astype(np.float32) for _ in range(n)]
    bn = model.get_layer("bn")
    bn.momentum = 0.0  # the moving statistics become the last batch's: non-trivial, as a trained model's are
    for batch in batches:
        model(batch, training=True)
    return batches


def _litert(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_quantization_aware_finetuning_calibrates_ranges_then_changes_weights_not_batchnorm():
    from prism_tf.compression.qat import quantization_aware_finetune

    model = _factorized_cnn()
    batches = _trained_batches(model)
    before = [w.copy() for w in model.get_weights()]
    lines = []
    assert compression.quantization_aware_finetune is quantization_aware_finetune
    tuned = quantization_aware_finetune(model, batches, 6, learning_rate=1e-3, log=lines.append)
    assert len(tuned.losses) == 6 and all(np.isfinite(tuned.losses)) and tuned.losses[0] < 1e-3
    assert len(lines) == 6 and lines[-1].startswith("quantization-aware fine-tuning: step 6/6")
    for a, b in zip(model.get_weights(), before, strict=True):  # the float model is not changed
        np.testing.assert_array_equal(a, b)
    wrapped = {layer.name: layer for layer in tuned.model.layers}
    source = model.get_layer("conv")
    for factor in ("principal_kernels", "combination"):  # the wrapper's variables (its layer holds quantized copies)
        tuned_factor = next(v for v in wrapped["quant_conv"].weights if v.name.split("/")[-1].startswith(factor))
        assert float(np.max(np.abs(tuned_factor.numpy() - getattr(source, factor).numpy()))) > 1e-4
    bn = wrapped["quant_bn"].layer  # frozen: normalizes with the run's statistics and keeps them
    np.testing.assert_array_equal(bn.moving_mean.numpy(), model.get_layer("bn").moving_mean.numpy())
    np.testing.assert_array_equal(bn.moving_variance.numpy(), model.get_layer("bn").moving_variance.numpy())
    # The logits' quantization range: the mean of the batches' ranges after calibration (tfmot's start is ±6),
    # then 6 steps of tfmot's 0.999 moving average: within 1% of the float logits' mean batch range.
    ranges = {v.name.split("/")[-1].split(":")[0]: float(v.numpy()) for v in wrapped["quant_classifier"].weights
              if "post_activation" in v.name}
    logits = [model(batch, training=False).numpy() for batch in batches]
    expected_max = np.mean([max(0.0, float(batch.max())) for batch in logits])
    expected_min = np.mean([min(0.0, float(batch.min())) for batch in logits])
    span = expected_max - expected_min
    assert ranges["post_activation_max"] == pytest.approx(expected_max, abs=0.01 * span)
    assert ranges["post_activation_min"] == pytest.approx(expected_min, abs=0.01 * span)
    assert span < 1.0  # far from tfmot's initial [-6, 6]


def test_quantization_aware_model_runs_full_integer_in_litert_and_tracks_the_float_model():
    """The fine-tuned model converts with every op int8 and, in LiteRT, gives the fake-quantized Keras model's
    logits to within 1 step of the int8 logits' scale in the median and 6 at most (the fake quantization models
    each int8 rounding but those of the rank-wide responses between A and B, which the converter calibrates, and
    LiteRT's int32 bias and requantization roundings; measured: median 1, max 5), and the float model's to within
    5% of the logits' range (8 bits over that range is 0.4% a step; a few layers' roundings add up), with the
    same top class for at least 60 of 64 inputs."""
    from export.model import to_tflite
    from prism_tf.compression.qat import quantization_aware_finetune

    model = _factorized_cnn()
    batches = _trained_batches(model)
    tuned = quantization_aware_finetune(model, batches, 4, learning_rate=1e-4)
    flatbuffer = to_tflite(tuned.model, int8=True, representative=np.concatenate(batches))
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    tensors = interpreter.get_tensor_details()
    products = [op for op in interpreter._get_ops_details() if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len(products) == 6 and all(tensors[i]["dtype"] == np.int8 for op in products for i in op["inputs"][:2])
    output_scale = [t["quantization"][0] for t in tensors if t["index"] == products[-1]["outputs"][0]][0]
    x = np.random.default_rng(3).uniform(size=(64, 12, 12, 3)).astype(np.float32)
    lite = _litert(flatbuffer, x)
    fake = tuned.model(x, training=False).numpy()
    float_logits = model(x, training=False).numpy()
    assert np.median(np.abs(lite - fake)) <= 1.01 * output_scale
    assert np.max(np.abs(lite - fake)) <= 6.01 * output_scale
    span = float(float_logits.max() - float_logits.min())
    assert np.max(np.abs(lite - float_logits)) <= 0.05 * span
    assert np.sum(np.argmax(lite, -1) == np.argmax(float_logits, -1)) >= 60


def test_quantization_aware_finetuning_refuses_bad_input_in_one_line():
    from prism_tf.compression.qat import quantization_aware_finetune

    model = _factorized_cnn()
    batches = _trained_batches(model, 1)
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"at least 1 step, got"):
            quantization_aware_finetune(model, batches, steps)
    with pytest.raises(ValueError, match="at least one batch"):
        quantization_aware_finetune(model, [], 3)
    inputs = tf.keras.Input((12, 12, 3))
    x = tf.keras.layers.Conv2D(8, 3, name="stem")(inputs)
    x = tf.keras.layers.Conv2D(16, 3, name="conv")(x)
    x = tf.keras.layers.GroupNormalization(groups=2, name="gn")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    grouped = prism_tf.factorize(tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x)))
    with pytest.raises(ValueError) as error:
        quantization_aware_finetune(grouped, batches, 3)
    assert str(error.value) == ("quantize: tfmot cannot quantize layer 'gn' (GroupNormalization): neither tfmot's "
                                "8-bit registry nor prism_tf.compression has a QuantizeConfig for it")
    outer = tf.keras.Model(inputs, model(inputs))
    with pytest.raises(ValueError, match=r"^quantize: tfmot cannot quantize a model nested in a model: layer "
                                         r"'model(_\d+)?' \(Functional\); quantize the inner model$"):
        compression.quantize_model(outer)


@pytest.mark.parametrize("kind", ["lstm", "gru", "attention"])
def test_layers_with_several_kernels_prune_every_pair(kind):
    """tfmot's magnitude pruning wraps a PrincipalLSTM/GRU/MultiHeadAttention and masks every pair's A and B."""
    from prism_tf.layers import PrincipalGRU, PrincipalLSTM, PrincipalMultiHeadAttention

    tf.keras.utils.set_random_seed(0)
    if kind == "attention":
        inputs = tf.keras.Input((6, 16))
        x = tf.keras.layers.MultiHeadAttention(2, 8, name="mix")(inputs, inputs)
        x = tf.keras.layers.GlobalAveragePooling1D()(x)
        model = prism_tf.factorize(tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x)), attention=True)
        expected, pairs = PrincipalMultiHeadAttention, 4
    else:
        inputs = tf.keras.Input((6, 16))
        x = (tf.keras.layers.LSTM if kind == "lstm" else tf.keras.layers.GRU)(16, name="mix")(inputs)
        model = prism_tf.factorize(tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x)))
        expected, pairs = (PrincipalLSTM if kind == "lstm" else PrincipalGRU), 2
    layer = model.get_layer("mix")
    assert isinstance(layer, expected) and len(layer.get_prunable_weights()) == 2 * pairs
    assert compression.prunable_weights(layer) == [v for p in layer.pairs for v in layer.factors(p)[:2]]
    frozen = [layer.factors(p).singular_values.numpy() for p in layer.pairs]
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    assert isinstance(pruned.get_layer("prune_low_magnitude_mix"), PruneLowMagnitude)
    pruned.compile(tf.keras.optimizers.SGD(0.01), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 6, 16)).astype(np.float32), (np.arange(8) % 3).astype(np.int32)
    history = pruned.fit(x, y, batch_size=8, epochs=1, verbose=0,
                         callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    assert np.isfinite(history.history["loss"][0])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned).get_layer("mix")
    assert isinstance(stripped, expected)
    for pair, s in zip(stripped.pairs, frozen, strict=True):
        factors = stripped.factors(pair)
        for factor in factors[:2]:
            assert np.mean(factor.numpy() == 0) == pytest.approx(0.5, abs=0.03), (pair, factor.name)
        np.testing.assert_array_equal(factors.singular_values.numpy(), s)
