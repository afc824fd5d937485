"""factorize on models nobody here wrote, rules, report, refactorize, errors (docs/algorithm.md §1)."""

import numpy as np
import pytest
import tensorflow as tf

import prism_tf


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize(
    "build,options",
    [
        (lambda: tf.keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10), {}),
        # MobileNetV2 has only 1x1 and depthwise convs: factorize its pointwise convs on request
        (lambda: tf.keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10),
         {"skip_pointwise": False}),
        (lambda: tf.keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=10), {}),
        # VGG16's 4096x4096 head takes ~50 s to factorize on 2 cores
        pytest.param(lambda: tf.keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=10), {},
                     marks=pytest.mark.slow),
        (lambda: prism_tf.models.resnet18(width=16), {}),
        (lambda: prism_tf.models.vgg11(width=8, norm="group"), {}),
    ],
    ids=["resnet50", "mobilenetv2", "densenet121", "vgg16", "resnet18", "vgg11-group"],
)
def test_full_rank_equivalence_on_foreign_and_zoo_models(build, options):
    model = build()
    fm = prism_tf.factorize(model, **options)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    assert _rel_err(model(x, training=False).numpy(), fm(x, training=False).numpy()) < 1e-4
    report = fm.prism_report
    assert report.factorized and report.kept
    assert any(k.reason.startswith("classifier") for k in report.kept)
    assert len(prism_tf.kinds.principal_layers(fm)) == len(report.factorized)


def test_mobilenet_keeps_depthwise_and_pointwise():
    model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    with pytest.raises(ValueError, match="no factorizable layer"):
        prism_tf.factorize(model)
    report = prism_tf.plan_factorization(model)
    assert not report.factorized
    reasons = {k.name: k.reason for k in report.kept}
    assert any("DepthwiseConv2D" == k.kind for k in report.kept)
    assert reasons["Conv1"].startswith("first conv")
    assert reasons["predictions"].startswith("classifier")
    assert reasons["block_1_project"] == "1x1 conv"


def test_default_rules_on_resnet18():
    model = prism_tf.models.resnet18(width=8)
    report = prism_tf.plan_factorization(model)
    names = {f.name for f in report.factorized}
    assert len(names) == 16 and "stem_conv" not in names and "classifier" not in names
    assert not any("shortcut" in n for n in names)
    # the rules are configurable
    everything = prism_tf.plan_factorization(
        model, skip_first_conv=False, skip_pointwise=False, skip_classifier=False, min_rank=1)
    assert {"stem_conv", "classifier", "stage2_block1_shortcut_conv"} <= {f.name for f in everything.factorized}
    assert {f.name for f in prism_tf.plan_factorization(model, only=["stage1_block1_1_conv"]).factorized} == {
        "stage1_block1_1_conv"}


def test_sequential_and_hidden_dense_and_min_rank():
    model = tf.keras.Sequential([
        tf.keras.Input((12,)),
        tf.keras.layers.Dense(16, activation="relu", name="hidden"),
        tf.keras.layers.Dense(3, name="tiny"),
        tf.keras.layers.Dense(4, activation="softmax", name="out"),
    ])
    fm = prism_tf.factorize(model, min_rank=4)
    assert [f.name for f in fm.prism_report.factorized] == ["hidden"]
    assert "below min_rank" in {k.name: k.reason for k in fm.prism_report.kept}["tiny"]
    x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    assert _rel_err(model(x).numpy(), fm(x).numpy()) < 1e-4


def test_nested_model_is_descended_into():
    inner = prism_tf.models.small_cnn(width=8)
    inputs = tf.keras.Input((32, 32, 3))
    outer = tf.keras.Model(inputs, tf.keras.layers.Softmax()(inner(inputs)))
    fm = prism_tf.factorize(outer)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    assert _rel_err(outer(x).numpy(), fm(x).numpy()) < 1e-4
    assert {"conv2_conv", "fc1"} <= {f.name for f in fm.prism_report.factorized}


def test_refactorize_keeps_function_and_orthogonality():
    fm = prism_tf.factorize(prism_tf.models.small_cnn(width=8))
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    rng = np.random.default_rng(1)
    for layer in prism_tf.kinds.principal_layers(fm):
        layer.principal_kernels.assign_add(0.05 * rng.normal(size=layer.principal_kernels.shape))
    before = fm(x).numpy()
    prism_tf.refactorize(fm)
    assert _rel_err(before, fm(x).numpy()) < 1e-4
    for layer in prism_tf.kinds.principal_layers(fm):
        a = prism_tf.spectral.kernel_to_matrix(layer.principal_kernels).numpy()
        gram = a.T @ a
        np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-4 * gram.max())
        np.testing.assert_allclose(np.diag(gram), layer.singular_values.numpy(), rtol=1e-4)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="no factorizable layer"):
        prism_tf.factorize(tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)]))

    class Sub(tf.keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="functional or Sequential"):
        prism_tf.factorize(Sub())
    with pytest.raises(ValueError, match="no layer named"):
        prism_tf.factorize(prism_tf.models.small_cnn(width=4), only=["nope"])
    with pytest.raises(ValueError, match="no principal-kernel layer"):
        prism_tf.refactorize(prism_tf.models.small_cnn(width=4))


def test_unfactorize_gives_plain_keras_layers_with_the_same_function():
    model = prism_tf.models.resnet18(width=4, input_shape=(8, 8, 3))
    fm = prism_tf.factorize(model)
    for layer in prism_tf.kinds.principal_layers(fm):  # ω != 1 must be folded in too
        layer.kernel_scale.assign(np.linspace(0.5, 2.0, layer.rank).astype(np.float32))
    plain = prism_tf.unfactorize(fm)
    assert not any(prism_tf.kinds.is_principal(layer) for layer in prism_tf.kinds.walk_layers(plain))
    assert plain.count_params() == model.count_params()
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(plain(x).numpy(), fm(x).numpy(), rtol=1e-4, atol=1e-5)
    reloaded = tf.keras.models.model_from_json(plain.to_json())  # no custom objects needed
    assert reloaded.count_params() == plain.count_params()


def test_a_pointwise_only_model_is_told_how_to_factorize_its_1x1_convs():
    inputs = tf.keras.Input((16, 16, 3))
    x = tf.keras.layers.Conv2D(8, 3, name="stem")(inputs)
    x = tf.keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = tf.keras.layers.Conv2D(32, 1, name="pw")(x)
    outputs = tf.keras.layers.Dense(10, name="classifier")(tf.keras.layers.GlobalAveragePooling2D()(x))
    model = tf.keras.Model(inputs, outputs, name="mobile")
    with pytest.raises(ValueError, match="skip_pointwise=False"):
        prism_tf.factorize(model)
    factorized = prism_tf.factorize(model, skip_pointwise=False)
    assert [layer.name for layer in prism_tf.kinds.principal_layers(factorized)] == ["pw"]
