"""The levers of issue 25: mixed bfloat16 client training, flops-aware rank allocation, warm-up, FedAdam.

Exact numbers where the math is exact (flops, selections, optimizer hparams), measured tolerances where bfloat16
rounds (its 8-bit mantissa: about 0.4% per rounding).
"""

import collections
import dataclasses
import json

import numpy as np
import pytest
import round_models
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from prism_tf import budget, local_step, precision
from prism_tf.federated.config import TrainConfig, client_budget
from prism_tf.federated.methods import Method
from tff_pipelines.round import client_work, finalizer
from tff_pipelines.round.layout import ClientAssignment, ClientStart, Received, RoundLayout


# --- flops-aware rank allocation ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet8():
    fm = prism_tf.factorize(prism_tf.models.resnet18(width=8))
    return fm, prism_tf.SubmodelPlan.of(fm)


def test_rank_unit_flops_are_the_layer_formula(resnet8):
    """One more kernel of a 3×3 conv with Cin = Cout = C at H×W pixels costs H·W·(9·C + C) multiply-adds."""
    fm, plan = resnet8
    unit = budget.rank_unit_flops(fm, plan, budget.spectral_sizes(plan, 0.2))
    assert unit["stage1_block1_1_conv"] == 32 * 32 * (9 * 8 + 8)
    assert unit["stage4_block2_2_conv"] == 4 * 4 * (9 * 64 + 64)
    assert unit["stage2_block1_1_conv"] == 16 * 16 * (9 * 8 + 16)  # stride 2: reads 8 channels, writes 16


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_flops_allocation_spends_the_uniform_budget(resnet8, alpha):
    fm, plan = resnet8
    uniform = budget.spectral_sizes(plan, 0.2)
    kernels = budget.flops_aware_kernels(fm, plan, 0.2, alpha=alpha)
    assert set(kernels) == set(plan.kernel_groups())
    assert all(1 <= kernels[g] <= plan.groups[g].size for g in kernels)
    want = budget.submodel_cost(fm, plan, uniform)["flops"]
    sizes = budget.spectral_sizes(plan, 0.2, kernels=kernels)
    got = budget.submodel_cost(fm, plan, sizes)["flops"]
    assert 0.95 * want <= got <= want
    # the same flops counted on the real extracted sub-model (an independent path through prism_tf.cost)
    selection = prism_tf.sample(fm, 0.2, seed=3)
    selection = prism_tf.Selection({g: prism_tf.LayerSelection(np.arange(kernels[g], dtype=np.int32),
                                                               np.ones(kernels[g], np.float32), s.rank)
                                    for g, s in selection.layers.items()}, 0.2, "top")
    assert prism_tf.cost(prism_tf.extract(fm, selection))["flops"] == got
    # more kernels where a kernel is cheap: the 4×4 stage keeps a larger share than the 32×32 stage
    share = {g: kernels[g] / plan.groups[g].size for g in kernels}
    assert share["stage4_block2_2_conv"] > 0.2 > share["stage1_block1_1_conv"]


def test_flops_allocation_is_proportional_to_rank_over_unit_cost(resnet8):
    """α = 1: k_g ≈ λ·r_g/c_g; layers of one stage (same r, same c) get the same count, and the 4×4 stage's count
    is (r4/c4)/(r3/c3) = 2·2 = 4x the 8×8 stage's, up to rounding."""
    fm, plan = resnet8
    k = budget.flops_aware_kernels(fm, plan, 0.2)
    assert abs(k["stage3_block2_1_conv"] - k["stage3_block2_2_conv"]) <= 1
    assert k["stage4_block2_2_conv"] / k["stage3_block2_2_conv"] == pytest.approx(4.0, rel=0.2)


def test_rank_allocation_text():
    assert budget.parse_rank_allocation("uniform") is None
    assert budget.parse_rank_allocation("flops") == 1.0
    assert budget.parse_rank_allocation("flops:0.5") == 0.5
    for bad in ("flop", "flops:x", "flops:0", "flops:9"):
        with pytest.raises(ValueError, match="--rank-allocation must be uniform, flops or flops:ALPHA"):
            budget.parse_rank_allocation(bad)


def test_a_run_with_flops_allocation_records_and_uses_its_kernels():
    config = TrainConfig(model="resnet18", width=8, rank_allocation="flops")
    config.validate()
    method, _, info = client_budget(config, (32, 32, 3), 10)
    plan = prism_tf.SubmodelPlan.of(prism_tf.factorize(prism_tf.models.resnet18(width=8)))
    assert info["rank_allocation"] == "flops" and set(info["kernels"]) == set(plan.kernel_groups())
    assert info["flops_ratio"] <= info["prism_flops_ratio"] and info["flops_ratio"] >= 0.95 * info["prism_flops_ratio"]
    sizes = method.sizes(plan)
    assert {g: sizes[g] for g in plan.kernel_groups()} == info["kernels"]
    # the budget record restores it (resume, replay, export): the stored JSON gives the same method
    again = config.method_spec().with_budget(json.loads(json.dumps(info)))
    assert again.sizes(plan) == sizes
    singular_values = {g: np.linspace(2, 1, plan.groups[g].size) for g in plan.kernel_groups()}
    selection = again.select(plan, singular_values, (0, 0, 1))
    assert {g: s.size for g, s in selection.layers.items()} == info["kernels"]


# --- warm-up ----------------------------------------------------------------------------------------------------
def test_warmup_rounds_select_the_top_kernels_then_sample():
    plan = prism_tf.SubmodelPlan.of(prism_tf.factorize(prism_tf.models.resnet18(width=8)))
    rng = np.random.default_rng(0)
    singular_values = {g: np.sort(rng.uniform(0.1, 2.0, plan.groups[g].size))[::-1] for g in plan.kernel_groups()}
    method = Method.create("prism", keep_ratio=0.2, warmup_rounds=2)
    top = Method.create("prism", keep_ratio=0.2, strategy="top")
    for round_index in (0, 1):
        for client in (0, 5):
            got = method.select(plan, singular_values, (0, round_index, client), round_index=round_index)
            want = top.select(plan, singular_values, (0, round_index, client), round_index=round_index)
            for g in got.layers:
                np.testing.assert_array_equal(got.layers[g].indices, want.layers[g].indices)
    plain = Method.create("prism", keep_ratio=0.2)
    for client in (0, 5):  # after warm-up: PriSM's own draw, which is not the top-k
        got = method.select(plan, singular_values, (0, 2, client), round_index=2)
        want = plain.select(plan, singular_values, (0, 2, client), round_index=2)
        assert all(np.array_equal(got.layers[g].indices, want.layers[g].indices) for g in got.layers)
    assert any(not np.array_equal(plain.select(plan, singular_values, (0, 2, 0)).layers[g].indices,
                                  np.arange(len(top.select(plan, singular_values, (0, 2, 0)).layers[g].indices)))
               for g in plan.kernel_groups())


# --- options refused with their flag --------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(method="fedavg", warmup_rounds=2), "--warmup-rounds applies to spectral methods"),
    (dict(warmup_rounds=-1), "--warmup-rounds must be >= 0"),
    (dict(method="small", rank_allocation="flops"), "--rank-allocation flops applies to spectral methods"),
    (dict(rank_allocation="flops", match="nominal"), "it needs --match flops"),
    (dict(rank_allocation="flops", keep_mix="0.2:1"), "cannot be combined with --keep-mix"),
    (dict(server_optimizer="adam"), "--server-optimizer adam needs --server-lr"),
    (dict(server_optimizer="yogi", server_lr=0.1), "--server-optimizer must be one of sgd, adam"),
    (dict(precision="float16"), "--precision must be one of float32, mixed_bfloat16, auto"),
])
def test_bad_lever_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        config = TrainConfig(**options)
        config.validate()
        config.method_spec()


def test_fedadam_server_optimizer_of_a_config():
    optimizer = finalizer.server_optimizer_of(TrainConfig(server_lr=0.01, server_optimizer="adam"))
    hparams = optimizer.get_hparams(optimizer.initialize((tf.TensorSpec([1], tf.float32),)))
    assert {k: float(v) for k, v in hparams.items()} == pytest.approx(
        dict(learning_rate=0.01, beta_1=0.9, beta_2=0.99, epsilon=1e-3))
    # Adam's first step, TFF's bias correction on the rate: lr·(√(1−β₂)/(1−β₁))·m/(√v + ε), m = 0.1g, v = 0.01g²
    state = optimizer.initialize((tf.TensorSpec([3], tf.float32),))
    g = np.array([0.5, -2.0, 1.0])
    _, new = optimizer.next(state, (tf.constant([1.0, 2.0, 3.0]),), (tf.constant(g, tf.float32),))
    step = 0.01 * (np.sqrt(0.01) / 0.1) * (0.1 * g) / (np.sqrt(0.01 * g ** 2) + 1e-3)
    np.testing.assert_allclose(new[0], np.array([1.0, 2.0, 3.0]) - step, rtol=1e-6)


# --- mixed bfloat16 ---------------------------------------------------------------------------------------------
def test_cpu_flags(tmp_path):
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert precision.cpu_has_bf16(str(amx)) and not precision.cpu_has_bf16(str(plain))
    assert not precision.cpu_has_bf16(str(tmp_path / "missing"))
    assert precision.resolve("auto") == ("mixed_bfloat16" if precision.cpu_has_bf16() else "float32")


@pytest.mark.parametrize("norm, kept", [("batch", {"InputLayer"}), ("group", {"InputLayer", "GroupNormalization"})])
def test_policy_is_set_on_every_layer_but_inputs_and_groupnorm(norm, kept):
    model = prism_tf.models.resnet18(width=8, norm=norm)
    assert precision.with_policy(model.to_json(), "float32") == model.to_json()
    layers = json.loads(precision.with_policy(model.to_json(), "mixed_bfloat16"))["config"]["layers"]
    assert {layer["class_name"] for layer in layers if layer["config"].get("dtype") == "float32"} == kept
    assert sum(layer["config"].get("dtype") == "mixed_bfloat16" for layer in layers) > 20
    # Keras's BatchNorm computes its statistics in float32 from bfloat16 inputs: its output matches float32's
    mixed = precision.with_precision(model, "mixed_bfloat16")
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    want, got = model(x, training=True).numpy(), precision.float32_logits(mixed(x, training=True)).numpy()
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()


@pytest.mark.parametrize("name, shape, options", [
    ("resnet18", (32, 32, 3), dict(width=8)),
    ("vit", (32, 32, 3), dict(width=32)),
    ("framelstm", (32, 96), dict(width=32)),
])
def test_bf16_submodels_compute_in_bf16_with_float32_masters(name, shape, options):
    """The factorized sub-model of each family at mixed_bfloat16: logits within 3% of float32's (bf16 rounding),
    not equal to them (bf16 ran), float32 gradients for the float32 variables."""
    tf.keras.utils.set_random_seed(0)
    model = prism_tf.models.build_model(name, num_classes=10, input_shape=shape, **options)
    fm = prism_tf.factorize(model, attention=(name == "vit"))
    sub = prism_tf.extract(fm, prism_tf.sample(fm, 0.2, seed=1))
    mixed = precision.with_precision(sub, "mixed_bfloat16")
    x = np.random.default_rng(0).normal(size=(8, *shape)).astype(np.float32)
    want, got = sub(x).numpy(), precision.float32_logits(mixed(x)).numpy()
    assert 0 < np.abs(got - want).max() < 0.03 * np.abs(want).max()
    assert {v.dtype for v in mixed.trainable_variables} == {tf.float32}
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(precision.float32_logits(mixed(x, training=True)) ** 2)
    grads = tape.gradient(loss, mixed.trainable_variables)
    assert all(g is not None and g.dtype == tf.float32 for g in grads)


def test_a_tff_client_trains_in_bf16_and_uploads_float32():
    """One client of the real TFF client work, two plain SGD steps at lr 0.5 with BatchNorm: the bf16 upload's change
    from the server weights points where float32's does (cosine > 0.995) and differs by less than 10% of its norm
    (bf16 rounding of activations and gradients, compounded over two steps), not by 0; every upload is float32."""
    from tff_pipelines.round.process import batch_spec

    fm = prism_tf.factorize(round_models.conv_model(), min_rank=1)
    layout = RoundLayout.build(fm, {"conv": 3})
    server = [w.numpy() for w in prism_tf.submodel.flat_weights(fm)]
    received = Received([], [server[p] for p in layout.travelling()])
    start = ClientStart(received, ClientAssignment([np.array([0, 2, 4], np.int32)], [np.ones(3, np.float32)]))
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
        x=rng.normal(size=(8, 6, 6, 2)).astype(np.float32), y=rng.integers(0, 3, 8).astype(np.int32))).batch(
        4, drop_remainder=True)
    uploads = {}
    for mode in ("float32", "mixed_bfloat16"):
        training = client_work.ClientTraining(optimizer=tff.learning.optimizers.build_sgdm(0.5), clip_norm=None,
                                              frobenius_decay=0.0, weight_decay=0.0, precision=mode)
        work = client_work.build_client_work(layout, batch_spec((6, 6, 2), 4), training)
        out = work.next(work.initialize(), [start], [data])
        uploads[mode] = [np.asarray(u) for u in out.result[0].update.uploads]
    assert all(u.dtype == np.float32 for u in uploads["mixed_bfloat16"])
    before = [received.whole[i] for i in range(len(uploads["float32"]))]
    moved = [(f - b, m - b) for f, m, b in zip(uploads["float32"], uploads["mixed_bfloat16"],
                                                 _sliced(layout, before, [0, 2, 4]), strict=True)]
    total = np.sqrt(sum(float(np.sum(f ** 2)) for f, _ in moved))
    diff = np.sqrt(sum(float(np.sum((f - m) ** 2)) for f, m in moved))
    cosine = sum(float(np.sum(f * m)) for f, m in moved) / (
        total * np.sqrt(sum(float(np.sum(m ** 2)) for _, m in moved)))
    assert total > 0.05 and 0 < diff < 0.1 * total and cosine > 0.995  # measured: 6.0% and 0.998


def _sliced(layout, whole, kernels):
    """The server's travelling tensors cut to the client's kernels (the conv's factors hold 3 of 5)."""
    out = []
    for position, tensor in zip(layout.travelling(), whole, strict=True):
        t = layout.tensors[position]
        if t.layer == "conv" and t.weight == "principal_kernels":
            tensor = tensor[..., kernels]
        elif t.layer == "conv" and t.weight == "combination":
            tensor = tensor[kernels]
        out.append(tensor)
    return out


def test_client_training_resolves_auto():
    training = client_work.ClientTraining(precision="auto")
    assert training.precision == precision.resolve("auto")
    assert dataclasses.replace(training, precision="float32").precision == "float32"


# --- balanced kernel learning rates -------------------------------------------------------------------------------
def test_kernel_lr_factors_are_mean_s_over_s_clipped():
    fm = prism_tf.factorize(round_models.dense_model(), min_rank=1)
    layer = fm.get_layer("hidden")
    a, b = layer.principal_kernels.numpy(), layer.combination.numpy()
    s = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(s, layer.singular_values.numpy(), rtol=1e-5)  # A = U√s, B = √sVᵀ right after SVD
    variables = [layer.principal_kernels, layer.combination, layer.bias]
    for cap in (1.5, 100.0):
        factors = local_step.kernel_lr_factors(fm, variables, cap)
        want = np.clip(s.mean() / s, 1 / cap, cap)
        np.testing.assert_allclose(factors[0].numpy().reshape(-1), want, rtol=1e-5)
        np.testing.assert_allclose(factors[1].numpy().reshape(-1), want, rtol=1e-5)
        assert factors[0].shape == (1, 4) and factors[1].shape == (4, 1) and factors[2] is None
    assert local_step.kernel_lr_factors(fm, variables, None) == [None] * 3
    # in a step: the factors' gradients are multiplied column/row-wise by exactly these, nothing else changes
    grads = [tf.ones_like(v) for v in variables]
    plain = local_step.step_gradients(fm, variables, grads, local_step.StepOptions(clip_norm=None, clip_lr_tau=None))
    balanced = local_step.step_gradients(fm, variables, grads, local_step.StepOptions(
        clip_norm=None, clip_lr_tau=None, kernel_lr_cap=100.0))
    np.testing.assert_allclose(balanced[0].numpy(), plain[0].numpy() * (s.mean() / s)[None, :], rtol=1e-5)
    np.testing.assert_allclose(balanced[1].numpy(), plain[1].numpy() * (s.mean() / s)[:, None], rtol=1e-5)
    np.testing.assert_array_equal(balanced[2].numpy(), plain[2].numpy())


def test_kernel_lr_balance_reaches_clients_and_devices():
    config = TrainConfig(kernel_lr_balance=10.0)
    config.validate()
    assert client_work.ClientTraining.of(config).step_options.kernel_lr_cap == 10.0
    assert config.step_options().kernel_lr_cap == 10.0  # export/client.py's device step reads the same options
    for bad, message in ((dict(method="fedavg", kernel_lr_balance=10.0), "applies to spectral methods"),
                         (dict(kernel_lr_balance=0.5), "must be a cap >= 1")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).validate()
