"""On-device training export (export/tflite/; docs/export.md, "On-device training").

Real conversions and real interpreters: the builtins-only models run in ``ai_edge_litert`` (no Flex) and are compared
with a plain TensorFlow reference step — `tf.GradientTape` on the Keras sub-model, `prism_tf.local_step.step_gradients`,
TFF's SGD-with-momentum formula and Keras's own BatchNorm moving-statistics update. Each model is converted once per
module (a conversion takes seconds). TensorFlow only ever sees batches of 8: TF 2.14's oneDNN kernels corrupt memory
when the batch size varies or is odd (docs/pitfalls.md, "oneDNN and batch shapes"), so partial batches are exercised
in TFLite only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from tensorflow.lite.python import schema_py_generated as schema

import prism_tf
from export import tflite as tt
from prism_tf.local_step import StepOptions, step_gradients

BATCH = 8
CLASSES = 10
SHAPE = (32, 32, 3)
BUILTIN_OPS = {name for name in vars(schema.BuiltinOperator) if not name.startswith("_")} - {"CUSTOM"}
# Frobenius decay, weight decay and a clip that binds (the loss gradients' global norm is ~2-10 here).
OPTIONS = StepOptions(clip_norm=1.0, clip_lr_tau=10.0, frobenius_decay=1e-2, weight_decay=1e-2)
STEP = tt.TrainStep(learning_rate=0.05, momentum=0.9, options=OPTIONS)
# With the "unbiased" strategy ω is 2-7, so τ = 3 makes ClipLR bind too.
STEP_CLIP_LR = tt.TrainStep(learning_rate=0.05, momentum=0.9,
                            options=StepOptions(clip_norm=1.0, clip_lr_tau=3.0, frobenius_decay=1e-2,
                                                weight_decay=1e-2))
# Without normalization the loss gradients are small (global norm ~0.5): clip at 0.2.
STEP_SMALL_CLIP = tt.TrainStep(learning_rate=0.05, momentum=0.9,
                               options=StepOptions(clip_norm=0.2, clip_lr_tau=10.0, frobenius_decay=1e-2,
                                                   weight_decay=1e-2))


def make_submodel(name: str, norm: str, strategy: str = "prism", seed: int = 0) -> tf.keras.Model:
    """A width-4 client sub-model (keep ratio 0.2) with randomized normalization parameters and statistics."""
    tf.keras.utils.set_random_seed(seed)
    full = prism_tf.models.build_model(name, width=4, num_classes=CLASSES, input_shape=SHAPE, norm=norm)
    factorized = prism_tf.factorize(full)
    sub = prism_tf.extract(factorized, prism_tf.sample(factorized, keep_ratio=0.2, seed=(0, 0, 3), strategy=strategy))
    rng = np.random.default_rng(seed)
    for layer in prism_tf.kinds.walk_layers(sub):
        if isinstance(layer, tf.keras.layers.BatchNormalization | tf.keras.layers.GroupNormalization):
            layer.gamma.assign(rng.uniform(0.8, 1.2, layer.gamma.shape))
            layer.beta.assign(rng.normal(0.0, 0.1, layer.beta.shape))
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0.0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
    return sub


def synthetic_batches(count: int, seed: int = 1, batch: int = BATCH) -> list[tuple[np.ndarray, np.ndarray]]:
    """A learnable CIFAR-sized task: a fixed random pattern per class plus uniform noise, images in [0, 1]."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(1234).uniform(0, 1, (CLASSES, *SHAPE))
    batches = []
    for _ in range(count):
        y = rng.integers(0, CLASSES, batch).astype(np.int32)
        x = (0.5 * patterns[y] + 0.5 * rng.uniform(0, 1, (batch, *SHAPE))).astype(np.float32)
        batches.append((x, y))
    return batches


class Exported:
    """A sub-model, its initial flat weights and its builtins-only flatbuffer."""

    def __init__(self, sub: tf.keras.Model, step: tt.TrainStep, **kwargs) -> None:
        self.sub, self.step = sub, step
        self.weights = [w.numpy() for w in prism_tf.submodel.flat_weights(sub)]
        self.names = tt.weight_names(sub)
        self.module = tt.build_training_module(sub, step, "builtins", **kwargs)
        self.flatbuffer = tt.convert(self.module, "builtins")

    def interpreter(self) -> dict:
        interpreter = Interpreter(model_content=self.flatbuffer)
        return {name: interpreter.get_signature_runner(name) for name in tt.SIGNATURES}


@pytest.fixture(scope="module")
def resnet_bn() -> Exported:
    return Exported(make_submodel("resnet18", "batch"), STEP)


@pytest.fixture(scope="module")
def cnn_gn() -> Exported:
    # A 300 KB patch budget (sized for batch 32) makes every conv's filter gradient a WHILE loop over batch chunks
    # (conv1: 110 KB of patches per example, chunks of 2 examples).
    return Exported(make_submodel("small_cnn", "group", strategy="unbiased"), STEP_CLIP_LR, max_patch_bytes=300_000)


class Reference:
    """The plain TensorFlow step on a clone of the sub-model: GradientTape + step_gradients + TFF's sgdm."""

    def __init__(self, exported: Exported) -> None:
        self.model = tf.keras.models.clone_model(exported.sub)
        prism_tf.submodel.set_flat_weights(self.model, exported.weights)
        trainable = {id(v) for v in self.model.trainable_weights}
        variables = [v for v in prism_tf.submodel.flat_weights(self.model) if id(v) in trainable]
        accumulators = [tf.Variable(tf.zeros_like(v)) for v in variables]
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        step, model = exported.step, self.model

        @tf.function
        def train(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))  # Keras updates the BatchNorm moving statistics
            loss_grads = tape.gradient(loss, variables)
            grads = step_gradients(model, variables, loss_grads, step.options)
            for variable, accumulator, grad in zip(variables, accumulators, grads, strict=True):
                accumulator.assign(step.momentum * accumulator + grad)
                variable.assign(variable - step.learning_rate * accumulator)
            return loss, tf.linalg.global_norm(loss_grads)

        self.train = train

    def weights(self) -> list[np.ndarray]:
        return [w.numpy() for w in prism_tf.submodel.flat_weights(self.model)]


def max_errors(names: list[str], got: dict, want: list[np.ndarray]) -> dict[str, float]:
    return {name: float(np.max(np.abs(got[name] - value))) for name, value in zip(names, want, strict=True)}


def test_weight_names_are_stable_valid_signature_names(cnn_gn):
    names = cnn_gn.names
    assert len(names) == len(prism_tf.submodel.flat_weights(cnn_gn.sub)) == len(set(names))
    assert names == sorted(names)  # get_weights outputs come back in flat order
    assert all(re.fullmatch(r"w\d{3}_[A-Za-z0-9_]+", name) for name in names)
    assert names[1] == "w001_conv1_norm_gamma"
    assert tt.weight_names(tf.keras.models.clone_model(cnn_gn.sub)) == names


# Runs a .tflite file in a fresh Python that imports ai_edge_litert and numpy only: no TensorFlow in the process, so
# no Flex delegate can be found (with TensorFlow loaded, ai_edge_litert picks up TF's Flex delegate).
LITERT_ONLY = """
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1])
train = interpreter.get_signature_runner("train")
rng = np.random.default_rng(0)
for n in (8, 5, 8):
    x = rng.uniform(0, 1, (n, 32, 32, 3)).astype(np.float32)
    print(float(train(x=x, y=(np.arange(n) % 10).astype(np.int32))["loss"]))
assert "tensorflow" not in sys.modules
"""


def run_without_tensorflow(flatbuffer: bytes, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "model.tflite"
    path.write_bytes(flatbuffer)
    return subprocess.run([sys.executable, "-c", LITERT_ONLY, str(path)], capture_output=True, text=True,
                          timeout=120)


def test_builtins_model_uses_builtin_ops_only_and_trains_without_flex(resnet_bn, tmp_path):
    ops = tt.model_ops(resnet_bn.flatbuffer)
    assert set(ops) <= BUILTIN_OPS, f"non-builtin ops: {sorted(set(ops) - BUILTIN_OPS)}"
    assert {"TRANSPOSE_CONV", "CONV_2D", "ASSIGN_VARIABLE", "CONCATENATION"} <= set(ops)
    signatures = Interpreter(model_content=resnet_bn.flatbuffer).get_signature_list()
    assert signatures["train"] == {"inputs": ["x", "y"], "outputs": ["loss"]}
    assert signatures["infer"] == {"inputs": ["x"], "outputs": ["logits"]}
    assert signatures["get_weights"] == {"inputs": [], "outputs": resnet_bn.names}
    assert signatures["set_weights"] == {"inputs": resnet_bn.names, "outputs": ["assigned"]}
    # ai_edge_litert without TensorFlow: batches of 8, then a partial batch of 5 (dynamic batch), then 8 again.
    result = run_without_tensorflow(resnet_bn.flatbuffer, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(line) for line in result.stdout.split()]
    assert len(losses) == 3 and all(np.isfinite(loss) and loss > 0 for loss in losses)


def test_chunked_filter_gradients_convert_to_a_while_loop(cnn_gn):
    ops = tt.model_ops(cnn_gn.flatbuffer)
    assert "WHILE" in ops and set(ops) <= BUILTIN_OPS


def test_flex_variant_needs_flex(tmp_path):
    sub = make_submodel("small_cnn", "batch")
    module = tt.build_training_module(sub, STEP, "flex")
    with pytest.raises(ValueError, match="SELECT_TF_OPS"):
        tt.convert(module, "builtins")
    flatbuffer = tt.convert(module, "flex")
    flex_ops = [op for op in tt.model_ops(flatbuffer) if op.startswith("Flex")]
    assert "FlexConv2DBackpropFilter" in flex_ops and "FlexReluGrad" in flex_ops
    result = run_without_tensorflow(flatbuffer, tmp_path)
    assert result.returncode != 0 and "Select TensorFlow op" in result.stderr
    with pytest.raises(ValueError, match="GroupNormalization layer 'conv1_norm'"):
        tt.build_training_module(make_submodel("small_cnn", "group"), STEP, "flex")


def test_partial_batch_loss_is_the_mean_over_its_examples(cnn_gn):
    # GroupNorm has no batch coupling, so train's loss on 5 examples is the cross-entropy of infer's logits on them.
    runners = cnn_gn.interpreter()
    (x, y), = synthetic_batches(1, seed=7)
    logits = runners["infer"](x=x[:5])["logits"].astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    want = -log_probs[np.arange(5), y[:5]].mean()
    assert float(runners["train"](x=x[:5], y=y[:5])["loss"]) == pytest.approx(want, abs=2e-6)


@pytest.mark.parametrize("fixture", ["resnet_bn", "cnn_gn"])
def test_infer_matches_keras(fixture, request):
    exported = request.getfixturevalue(fixture)
    (x, _), = synthetic_batches(1, seed=3)
    got = exported.interpreter()["infer"](x=x)["logits"]
    want = exported.sub(x, training=False).numpy()
    assert np.max(np.abs(got - want)) < 1e-4


def check_step(exported: Exported, reference: Reference, train: Callable, get_weights: Callable) -> None:
    """One step from the same weights and batch: loss and every weight (BatchNorm statistics included) agree."""
    (x, y), = synthetic_batches(1, seed=5)
    want_loss, grad_norm = reference.train(x, y)
    assert float(grad_norm) > 2 * exported.step.options.clip_norm  # the clip binds
    assert float(train(x=x, y=y)["loss"]) == pytest.approx(float(want_loss), abs=1e-5)
    got = get_weights()
    errors = max_errors(exported.names, got, reference.weights())
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: {errors[worst]:.2e}"
    changed = max_errors(exported.names, got, exported.weights)
    assert changed[exported.names[0]] > 1e-4  # the step moved the weights
    for name in exported.names:
        if "moving" in name:
            assert changed[name] > 1e-4, name  # and the BatchNorm statistics


@pytest.mark.parametrize("fixture", ["resnet_bn", "cnn_gn"])
def test_one_train_step_matches_the_tensorflow_reference(fixture, request):
    exported = request.getfixturevalue(fixture)
    runners = exported.interpreter()
    check_step(exported, Reference(exported), runners["train"], runners["get_weights"])


def test_norm_none_step_in_tensorflow_matches_the_reference():
    # The graph that `convert` would turn into TFLite, run in TensorFlow (no conversion: norm="none" and the plain
    # Dense/PrincipalDense+ReLU head are covered without another slow conversion).
    exported = Exported.__new__(Exported)
    exported.sub, exported.step = make_submodel("small_cnn", "none"), STEP_SMALL_CLIP
    exported.weights = [w.numpy() for w in prism_tf.submodel.flat_weights(exported.sub)]
    exported.names = tt.weight_names(exported.sub)
    reference = Reference(exported)
    module = tt.build_training_module(exported.sub, exported.step, "builtins")
    (x, _), = synthetic_batches(1, seed=3)
    logits = module.infer(x)["logits"].numpy()
    assert np.max(np.abs(logits - exported.sub(x, training=False).numpy())) < 1e-5
    check_step(exported, reference, module.train, lambda: {k: v.numpy() for k, v in module.get_weights().items()})


def omega_spread(sub: tf.keras.Model) -> float:
    """The largest ``|ω − 1|`` over the sub-model's principal layers (0 for the default prism strategy)."""
    return max(float(np.max(np.abs(layer.kernel_scale.numpy() - 1.0)))
               for layer in prism_tf.kinds.principal_layers(sub))


def test_principal_forward_forms_the_scaled_combination_as_keras_does():
    # ω != 1 (strategy "unbiased"): a principal layer's TFLite forward multiplies ω into the [rank, out]
    # combination before the product (`BuiltinOps.scale_rows`), in the order of `prism_tf.layers`'s `_combine`.
    # Without normalization every op of the compiled graph is the Keras layer's own, in the same order, so the two
    # forwards agree bit for bit in TensorFlow (scaling the response maps instead was 1e-6 off). Then one step.
    exported = Exported.__new__(Exported)
    exported.sub, exported.step = make_submodel("small_cnn", "none", strategy="unbiased"), STEP_SMALL_CLIP
    assert omega_spread(exported.sub) > 1.0
    exported.weights = [w.numpy() for w in prism_tf.submodel.flat_weights(exported.sub)]
    exported.names = tt.weight_names(exported.sub)
    reference = Reference(exported)
    module = tt.build_training_module(exported.sub, exported.step, "builtins")
    (x, _), = synthetic_batches(1, seed=3)
    logits = module.infer(x)["logits"].numpy()
    assert np.array_equal(logits, exported.sub(x, training=False).numpy())
    check_step(exported, reference, module.train, lambda: {k: v.numpy() for k, v in module.get_weights().items()})


def test_litert_forward_with_omega_not_one_matches_keras_to_round_off(cnn_gn):
    # The converted model (LiteRT's kernels, not TensorFlow's) on a sub-model with ω of 2-7: infer's logits and
    # train's loss are Keras's to float32 round-off (measured 4e-7 on logits of size 1.2). The step's weights are
    # the reference's: test_one_train_step_matches_the_tensorflow_reference[cnn_gn] (this model) checks them.
    assert omega_spread(cnn_gn.sub) > 1.0
    runners = cnn_gn.interpreter()
    (x, y), = synthetic_batches(1, seed=3)
    want = cnn_gn.sub(x, training=False).numpy()
    got = runners["infer"](x=x)["logits"]
    assert np.max(np.abs(got - want)) < 2e-6 * max(1.0, float(np.max(np.abs(want))))
    # GroupNorm has no batch statistics: the training forward is the inference one, so train's loss (taken before
    # its step) is the cross-entropy of Keras's logits.
    keras_loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, want)
    assert float(runners["train"](x=x, y=y)["loss"]) == pytest.approx(float(keras_loss), abs=2e-6)


def test_twenty_steps_lower_the_loss_and_track_the_reference(cnn_gn):
    # small_cnn/GroupNorm: its trajectory is stable (a 1e-6 relative perturbation of the initial weights moves the
    # 20-step losses by ~3e-4). The width-4 ResNet-18/BatchNorm sub-model is chaotic at batch 8 (the same
    # perturbation moves its losses by ~0.2 within 20 steps, Keras against Keras), so it is checked per step only.
    reference = Reference(cnn_gn)
    runners = cnn_gn.interpreter()
    batches = synthetic_batches(5, seed=11) * 4  # 5 batches, 4 epochs
    got = np.array([float(runners["train"](x=x, y=y)["loss"]) for x, y in batches])
    want = np.array([float(reference.train(x, y)[0]) for x, y in batches])
    assert np.max(np.abs(got - want)) < 1e-4  # measured 4e-7
    assert got[-5:].mean() < got[:5].mean() - 0.1
    errors = max_errors(cnn_gn.names, runners["get_weights"](), reference.weights())
    assert max(errors.values()) < 1e-4  # measured 5e-7


def test_weights_round_trip_through_npz(resnet_bn, tmp_path):
    first = resnet_bn.interpreter()
    batches = synthetic_batches(3, seed=13)
    for x, y in batches[:2]:
        first["train"](x=x, y=y)
    path = tmp_path / "client.npz"
    np.savez(path, **first["get_weights"]())
    with np.load(path) as saved:
        values = {name: saved[name] for name in saved.files}
    assert sorted(values) == resnet_bn.names
    second = resnet_bn.interpreter()
    second["set_weights"](**values)
    first["set_weights"](**values)  # also zeroes the first interpreter's momentum: a fresh round in both
    x, y = batches[2]
    assert np.array_equal(first["infer"](x=x)["logits"], second["infer"](x=x)["logits"])
    for name, value in second["get_weights"]().items():
        assert np.array_equal(value, values[name]), name
    assert first["train"](x=x, y=y)["loss"] == second["train"](x=x, y=y)["loss"]
    after_first, after_second = first["get_weights"](), second["get_weights"]()
    for name in resnet_bn.names:
        assert np.array_equal(after_first[name], after_second[name]), name


def test_unsupported_layers_raise_naming_the_layer():
    vgg = prism_tf.models.build_model("vgg11", width=1, num_classes=CLASSES, input_shape=SHAPE, norm="batch")
    with pytest.raises(ValueError, match=r"'pool1' of type MaxPooling2D"):
        tt.build_training_module(vgg, STEP)
    inputs = tf.keras.Input((8, 8, 3))
    hidden = tf.keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = tf.keras.layers.Dense(CLASSES, activation="elu", name="head")(hidden)
    with pytest.raises(ValueError, match=r"'head' of type Dense.*elu"):
        tt.build_training_module(tf.keras.Model(inputs, outputs), STEP)
    with pytest.raises(ValueError, match="runtime"):
        tt.build_training_module(tf.keras.Model(inputs, outputs), STEP, runtime="gpu")
    with pytest.raises(ValueError, match="learning_rate"):
        tt.TrainStep(learning_rate=0.0)


def test_twenty_steps_on_real_cifar10_lower_the_loss_and_track_the_reference(cnn_gn):
    """The same check on real CIFAR-10 images (the run's channel normalization), as a phone's data would be."""
    from prism_tf.federated import recipe
    from prism_tf.federated.data import load_dataset

    dataset = load_dataset("cifar10", progress=False)  # decoded once per machine, then cached
    order = np.random.default_rng(5).permutation(len(dataset.x_train))[:5 * BATCH]
    mean, std = recipe.channel_stats(dataset.x_train[:5000])
    x = recipe.preprocess(dataset.x_train[order], mean, std)
    y = dataset.y_train[order].astype(np.int32)
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)] * 4  # 5 batches, 4 epochs
    reference = Reference(cnn_gn)
    runners = cnn_gn.interpreter()
    got = np.array([float(runners["train"](x=bx, y=by)["loss"]) for bx, by in batches])
    want = np.array([float(reference.train(bx, by)[0]) for bx, by in batches])
    assert np.max(np.abs(got - want)) < 1e-4
    assert got[-5:].mean() < got[:5].mean()
    errors = max_errors(cnn_gn.names, runners["get_weights"](), reference.weights())
    assert max(errors.values()) < 1e-4
