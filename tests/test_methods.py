"""PriSM's peers as selection rules on the same harness (docs/algorithm.md §4): one class per method, a registry
by name, and the interface the process, replay, export and the driver ask (never a method's name)."""

import ast
import collections
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf import budget, sampling, streams
from prism_tf.federated import methods
from prism_tf.federated.methods import (
    METHODS,
    REGISTRY,
    FedAvg,
    FedDropout,
    FedHM,
    FedRolex,
    FjORD,
    HeteroFL,
    Method,
    PriSM,
    Small,
    deployed_models,
    equal_cost_method,
    register,
)
from prism_tf.federated.methods.whole import WholeModelMethod
from tff_pipelines.round import distributor
from tff_pipelines.round.process import build_prism_process


@pytest.fixture(scope="module")
def plain():
    return prism_tf.models.resnet18(width=8)


def test_width_methods_slice_every_free_channel_group(plain):
    plan = prism_tf.SubmodelPlan.of(plain)
    heterofl = Method("heterofl", keep_ratio=0.5).select(plan, {}, (0, 0, 0))
    dropout_a = Method("fed_dropout", keep_ratio=0.5).select(plan, {}, (0, 0, 0))
    dropout_b = Method("fed_dropout", keep_ratio=0.5).select(plan, {}, (0, 0, 1))
    assert set(heterofl.channels) == set(plan.free_channel_groups())
    for group, idx in heterofl.channels.items():
        np.testing.assert_array_equal(idx, np.arange(plan.groups[group].size // 2))  # nested: the first channels
    assert any(not np.array_equal(dropout_a.channels[g], dropout_b.channels[g]) for g in dropout_a.channels)
    sub = prism_tf.extract(plain, heterofl)
    assert prism_tf.cost(sub)["flops"] / prism_tf.cost(plain)["flops"] == pytest.approx(0.25, abs=0.03)


def test_fjord_draws_nested_widths_per_client(plain):
    plan = prism_tf.SubmodelPlan.of(plain)
    method = Method("fjord", keep_ratio=1.0)
    widths = set()
    for client in range(40):  # 4 widths, uniform: all four appear (a width is missed with probability 4e-5)
        keep = method.client_keep_ratio(0, client, round_index=0)
        assert keep == streams.rng((0, 0, client), "fjord_width").choice(method.fjord_widths)
        sel = method.select(plan, {}, (0, 0, client), keep_ratio=keep)
        stem = sel.channels["stage1_block2_2_conv:out"]
        np.testing.assert_array_equal(stem, np.arange(len(stem)))
        widths.add(len(stem))
    assert widths == {2, 4, 6, 8}
    # a new width every round (ordered dropout), not a fixed capacity
    assert len({method.client_keep_ratio(0, 3, round_index=t) for t in range(20)}) > 1


def test_spectral_methods_and_fedavg(plain):
    fm = prism_tf.factorize(plain)
    plan = prism_tf.SubmodelPlan.of(fm)
    s = {layer.name: layer.singular_values.numpy() for layer in prism_tf.kinds.principal_layers(fm)}
    fedhm = Method("fedhm", keep_ratio=0.25)
    assert fedhm.strategy == "top" and fedhm.spectral
    sel = fedhm.select(plan, s, (0, 1, 2))
    for name, layer_sel in sel.layers.items():
        np.testing.assert_array_equal(layer_sel.indices, np.sort(np.argsort(-s[name], kind="stable")[:layer_sel.size]))
    assert Method("fedavg").select(plan, s, (0, 0, 0)).indices() == {}
    assert Method("fedavg").sizes(plan) == {}
    assert set(METHODS) == {"prism", "fedavg", "small", "heterofl", "fjord", "fed_dropout", "fedhm", "fedrolex"}


# One method in the default suite; the others (and every method end to end: tests/test_golden.py) with `make test-all`.
@pytest.mark.parametrize("method", ["heterofl", *(pytest.param(m, marks=pytest.mark.slow)
                                                  for m in ("fed_dropout", "fedhm", "fedrolex"))])
def test_baselines_run_real_rounds(method):
    shape = (8, 8, 3)
    rng = np.random.default_rng(0)
    data = [tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
        x=rng.random((8, *shape), dtype=np.float32), y=rng.integers(0, 10, 8).astype(np.int32)))
        for _ in range(2)]
    process = build_prism_process(lambda: prism_tf.models.resnet18(width=4, input_shape=shape),
                                  method=Method.create(method, keep_ratio=0.5), batch_size=4,
                                  model_distributor=distributor.build_broadcast_distributor)
    state = process.initialize()
    with pytest.raises(ValueError, match="drop_remainder=True"):
        process.next(state, [ds.batch(4) for ds in data])
    before = process.flat_weights(state)
    batched = [ds.batch(4, drop_remainder=True) for ds in data]
    with pytest.raises(ValueError, match="3 client ids for 2"):
        process.next(state, batched, client_ids=[5, 2, 1])
    state, metrics = process.next(state, batched, client_ids=[5, 2])
    after = process.flat_weights(state)
    assert metrics["num_examples"] == 16 and np.isfinite(metrics["loss"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    assert metrics["client_flops_per_example"] < process.full_cost["flops"]


@pytest.mark.parametrize("strategy,output_keep", [
    ("unbiased", None), pytest.param("collective", 0.5, marks=pytest.mark.slow),
    pytest.param("uniform", 0.5, marks=pytest.mark.slow)])
def test_strategies_and_memory_efficient_variant_run_real_rounds(strategy, output_keep):
    shape = (8, 8, 1)
    rng = np.random.default_rng(1)
    data = [tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
        x=rng.random((8, *shape), dtype=np.float32), y=rng.integers(0, 10, 8).astype(np.int32)))
        .batch(4, drop_remainder=True) for _ in range(3)]
    process = build_prism_process(lambda: prism_tf.models.resnet18(width=4, input_shape=shape),
                                  method=PriSM(keep_ratio=0.5, strategy=strategy, output_keep=output_keep),
                                  batch_size=4)
    state = process.initialize()
    selections = process.selections(state, 3)
    if strategy != "uniform":
        assert any(np.any(sel.scale > 1) for s in selections for sel in s.layers.values())  # ω = 1/π or C/(1+...)
    if output_keep:
        assert all(s.channels for s in selections)
    state, metrics = process.next(state, data)
    assert metrics["num_examples"] == 24 and np.isfinite(metrics["loss"])
    fm = process.assign_to(state)
    for layer in prism_tf.kinds.principal_layers(fm):
        np.testing.assert_array_equal(layer.kernel_scale.numpy(), np.ones(layer.rank))  # ω is a client-side factor


@pytest.mark.parametrize("strategy", ["prism", "collective"])
def test_library_sample_equals_method_select(plain, strategy):
    fm = prism_tf.factorize(plain)
    plan = prism_tf.SubmodelPlan.of(fm)
    s = {layer.name: layer.singular_values.numpy() for layer in prism_tf.kinds.principal_layers(fm)}
    s_reordered = dict(reversed(list(s.items())))  # the server's order need not be the model's
    seed = (3, 5, 17)
    lib = prism_tf.sample(fm, 0.25, seed=seed, strategy=strategy, clients_per_round=4, output_keep=0.5)
    sel = Method("prism", keep_ratio=0.25, strategy=strategy, output_keep=0.5).select(
        plan, s_reordered, seed, clients_per_round=4)
    assert lib.layers.keys() == sel.layers.keys() and lib.channels.keys() == sel.channels.keys()
    for name in lib.layers:
        np.testing.assert_array_equal(lib.layers[name].indices, sel.layers[name].indices)
        np.testing.assert_array_equal(lib.layers[name].scale, sel.layers[name].scale)
    for group in lib.channels:
        np.testing.assert_array_equal(lib.channels[group], sel.channels[group])


def test_capacity_is_a_fixed_function_of_seed_and_client():
    method = Method("prism", keep_ratio=0.2, keep_mix=((0.2, 0.6), (0.4, 0.4)))
    for client in range(50):
        ratios = {method.client_keep_ratio(1, client, round_index=t) for t in range(6)}
        assert len(ratios) == 1 and ratios <= {0.2, 0.4}
    n = 4000
    share = np.mean([method.capacity(1, c) == 0.2 for c in range(n)])
    assert abs(share - 0.6) <= 4 * np.sqrt(0.6 * 0.4 / n)  # Binomial(4000, 0.6)/4000, sd 0.0077
    u = streams.rng((1, 7), "capacity").random()
    assert method.capacity(1, 7) == (0.2 if u < 0.6 else 0.4)
    assert any(method.capacity(1, c) != method.capacity(2, c) for c in range(50))  # another run, other devices
    assert Method("prism", keep_ratio=0.3).capacity(1, 9) == 0.3


@pytest.fixture(scope="module")
def mixed_collective():
    return build_prism_process(lambda: prism_tf.models.resnet18(width=4, input_shape=(8, 8, 1)), batch_size=4,
                               method=PriSM(keep_ratio=0.25, strategy="collective", keep_mix=((0.25, 0.5), (0.5, 0.5))))


def test_process_capacity_is_fixed_across_rounds_and_seeds_by_client_id(mixed_collective):
    process = mixed_collective
    state = process.initialize()
    ids = [4, 11, 30, 2, 7, 19]
    rounds = [process.selections(dict(state, round_num=np.int64(t)), ids) for t in range(3)]
    for i, client in enumerate(ids):
        assert len({r[i].keep_ratio for r in rounds}) == 1
        assert rounds[0][i].keep_ratio == process.method.capacity(process.seed, client)
        assert any(not np.array_equal(rounds[0][i].layers[n].indices, rounds[1][i].layers[n].indices)
                   for n in rounds[0][i].layers)  # fresh kernels every round
    # the same client gets the same draw whatever its position in the round
    backwards = process.selections(state, ids[::-1])[::-1]
    for a, b in zip(rounds[0], backwards, strict=True):
        assert all(np.array_equal(a.layers[n].indices, b.layers[n].indices) for n in a.layers)
    # alone in its round, a client's collective C is 1: the top-k kernels, ω = 1
    alone = process.selections(state, [ids[2]])[0]
    s = process.singular_values(state)
    for name, layer in alone.layers.items():
        np.testing.assert_array_equal(layer.indices, np.sort(np.argsort(-s[name], kind="stable")[:layer.size]))
        np.testing.assert_array_equal(layer.scale, np.ones(layer.size))
    assert [s.keep_ratio for s in process.selections(state, 3)] == [
        s.keep_ratio for s in process.selections(state, [0, 1, 2])]  # an int n means clients 0..n-1


def test_collective_C_is_the_clients_sharing_a_keep_ratio(mixed_collective):
    process = mixed_collective
    state = process.initialize()
    ids = list(range(9))
    keeps = [process.method.capacity(process.seed, c) for c in ids]
    groups = {k: keeps.count(k) for k in set(keeps)}
    assert len(groups) == 2 and all(n < len(ids) for n in groups.values())  # both groups are proper subsets
    s = process.singular_values(state)

    def check(selections, c_of):
        for selection, keep in zip(selections, keeps, strict=True):
            c = c_of(keep)
            for name, layer in selection.layers.items():
                pi = sampling.collective_inclusion(s[name].astype(np.float64), layer.size, c)
                np.testing.assert_allclose(layer.scale, c / (1 + (c - 1) * pi[layer.indices]), rtol=1e-6)

    check(process.selections(state, ids), groups.__getitem__)
    process.collective_clients = 3
    try:
        check(process.selections(state, ids), lambda keep: 3)
    finally:
        process.collective_clients = None


def test_fedrolex_window_rolls_with_the_round(plain):
    plan = prism_tf.SubmodelPlan.of(plain)
    method = Method("fedrolex", keep_ratio=0.5)
    sel = {t: method.select(plan, {}, (0, t, 1), round_index=t) for t in (0, 1, 8, 64)}
    group = "stage1_block2_2_conv:out"  # 8 channels: windows of 4
    np.testing.assert_array_equal(sel[0].channels[group], [0, 1, 2, 3])
    np.testing.assert_array_equal(sel[1].channels[group], [1, 2, 3, 4])
    np.testing.assert_array_equal(sel[8].channels[group], [0, 1, 2, 3])  # round C = round 0
    for g in plan.free_channel_groups():
        size = plan.groups[g].size
        seen = np.zeros(size, int)
        for t in range(size):
            seen[method.select(plan, {}, (0, t, 0), round_index=t).channels[g]] += 1
        np.testing.assert_array_equal(seen, np.full(size, size // 2))  # every channel trained in turn
    # clients of a round share the window; it is the server's round, not the seed, that moves it
    assert all(np.array_equal(method.select(plan, {}, (9, 3, c), round_index=3).channels[group],
                              [3, 4, 5, 6]) for c in range(3))
    with pytest.raises(ValueError, match="round_index"):
        method.select(plan, {}, (0, 0, 0))


def test_width_fraction_replaces_the_nominal_keep_ratio(plain):
    plan = prism_tf.SubmodelPlan.of(plain)
    method = Method("heterofl", keep_ratio=0.2, width_fraction=0.5)
    assert method.sizes(plan) == budget.width_sizes(plan, 0.5)
    sel = method.select(plan, {}, (0, 0, 0))
    for group, idx in sel.channels.items():
        np.testing.assert_array_equal(idx, np.arange(plan.groups[group].size // 2))
    fjord = Method("fjord", keep_ratio=0.2, width_fraction=0.5)
    widest = fjord.sizes(plan, keep_ratio=fjord.keep_ratio * max(fjord.fjord_widths))
    assert widest == budget.width_sizes(plan, 0.5)
    assert fjord.sizes(plan, keep_ratio=0.2 * 0.25) == budget.width_sizes(plan, 0.125)  # grid multiplies it
    assert Method("heterofl", keep_ratio=0.2).sizes(plan) == budget.width_sizes(plan, 0.2)  # nominal default
    with pytest.raises(ValueError, match="width_fraction"):
        Method("heterofl", width_fraction=1.5)


@pytest.mark.slow  # 15-30 s: `make test-all` (the default suite stays under 15 minutes)
def test_equal_cost_method_matches_prism_flops():
    server = prism_tf.models.resnet18(width=16)
    method, info = equal_cost_method(Method("heterofl", keep_ratio=0.2), server)
    assert method.width_fraction == 0.5 and info["width_fraction"] == 0.5  # measured: 0.957 of PriSM's flops
    assert info["prism_flops_ratio"] == pytest.approx(0.2646, abs=1e-3)
    assert abs(info["flops_ratio"] / info["prism_flops_ratio"] - 1) <= 0.05
    plan = prism_tf.SubmodelPlan.of(server)
    real = prism_tf.cost(prism_tf.extract(server, method.select(plan, {}, (0, 0, 0))))
    assert real["flops"] / prism_tf.cost(server)["flops"] == pytest.approx(info["flops_ratio"], rel=1e-12)
    assert info["target"] == pytest.approx(info["prism_flops_ratio"] * prism_tf.cost(server)["flops"])
    fjord, fjord_info = equal_cost_method(Method("fjord", keep_ratio=0.2, fjord_widths=(0.4, 0.8)), server)
    assert fjord.width_fraction == pytest.approx(0.5 / 0.8)  # its widest width, 0.8·w, is the matched 0.5
    assert fjord_info["flops_ratio"] == info["flops_ratio"]
    prism, prism_info = equal_cost_method(Method("prism", keep_ratio=0.2), server)
    assert prism == PriSM(keep_ratio=0.2) and prism_info["width_fraction"] is None
    assert prism_info["flops_ratio"] == prism_info["prism_flops_ratio"]
    _, small = equal_cost_method(Method("small", keep_ratio=0.2), server,
                                 build_model=lambda w: prism_tf.models.resnet18(width=w), max_width=16)
    assert small["small_width"] == budget.match_small_width(
        lambda w: prism_tf.models.resnet18(width=w), small["target"], 16)[0]
    with pytest.raises(ValueError, match="keep_mix"):
        equal_cost_method(Method("heterofl", keep_mix=((0.2, 0.5), (0.4, 0.5))), server)


# --------------------------------------------------------------------------------------------- the registry


def test_registry_holds_one_class_per_method_in_the_cli_order():
    assert METHODS == ("prism", "fedavg", "small", "heterofl", "fjord", "fed_dropout", "fedhm", "fedrolex")
    assert set(REGISTRY) == set(METHODS)
    classes = {"prism": PriSM, "fedavg": FedAvg, "small": Small, "heterofl": HeteroFL, "fjord": FjORD,
               "fed_dropout": FedDropout, "fedhm": FedHM, "fedrolex": FedRolex}
    for name in METHODS:
        method = Method.create(name, keep_ratio=0.3)
        assert type(method) is REGISTRY[name] is classes[name] and method.name == name
        assert isinstance(method, Method) and method.keep_ratio == 0.3
        assert Method(name, keep_ratio=0.3) == method  # calling the base class by name is `create`
    assert {n for n in METHODS if REGISTRY[n].spectral} == {"prism", "fedhm"}
    assert {n for n in METHODS if REGISTRY[n].width} == {"heterofl", "fjord", "fed_dropout", "fedrolex"}
    assert {n for n in METHODS if REGISTRY[n].always_matched} == {"small"}


def test_create_takes_every_run_option_and_keeps_only_its_own():
    """A run's options build any method (the driver passes them all); each class keeps the options it has."""
    run_options = dict(keep_ratio=0.25, strategy="unbiased", gamma=3.0, output_keep=0.5, keep_mix=None)
    assert Method.create("fedavg", **run_options) == FedAvg(keep_ratio=0.25, output_keep=0.5)
    assert Method.create("heterofl", **run_options, fjord_widths=(0.5, 1.0)) == HeteroFL(keep_ratio=0.25,
                                                                                         output_keep=0.5)
    assert Method.create("prism", **run_options) == PriSM(keep_ratio=0.25, strategy="unbiased", gamma=3.0,
                                                         output_keep=0.5)
    fedhm = Method.create("fedhm", **run_options)
    assert fedhm.strategy == "top" and fedhm.gamma == 3.0  # FedHM's rule is the top-k kernels, whatever is asked
    assert Method.create("fjord", fjord_widths=(0.5, 1.0)).fjord_widths == (0.5, 1.0)
    levers = ("warmup_rounds", "rank_allocation", "kernels")
    assert PriSM.options() == ("keep_ratio", "output_keep", "keep_mix", "strategy", "gamma", "output_rule", *levers)
    assert FedHM.options() == ("keep_ratio", "output_keep", "keep_mix", "gamma", "output_rule", *levers)


@pytest.mark.parametrize("call,error,words", [
    (lambda: Method.create("fedprox"), ValueError, ("unknown method 'fedprox'", "prism, fedavg, small")),
    (lambda: Method.create("prism", warp=1), TypeError, ("unknown option(s) warp", "keep_ratio")),
    (lambda: Method.create("prism", keep_ratio=0), ValueError, ("keep_ratio must be in (0, 1], got 0",)),
    (lambda: Method.create("prism", strategy="best"), ValueError, ("unknown strategy 'best'",)),
    (lambda: Method.create("fedavg", keep_mix=((0.2, 0.0),)), ValueError, ("keep_mix shares must be positive",)),
    (lambda: Method.create("fedavg", keep_mix=((1.5, 1.0),)), ValueError, ("keep_mix ratio",)),
    (lambda: HeteroFL(width_fraction=0), ValueError, ("width_fraction",)),
    (lambda: FedHM(strategy="prism"), TypeError, ("strategy",)),
])
def test_bad_options_are_one_line_errors(call, error, words):
    with pytest.raises(error) as raised:
        call()
    assert "\n" not in str(raised.value)
    for word in words:
        assert word in str(raised.value)


def test_small_is_trained_whole_as_fedavg_and_sized_by_its_budget(plain):
    small = Small(keep_ratio=0.3, keep_mix=((0.3, 1.0),))
    assert small.trained_method() == FedAvg(keep_ratio=0.3, keep_mix=((0.3, 1.0),))
    plan = prism_tf.SubmodelPlan.of(plain)
    assert small.trained_method().select(plan, {}, (0, 0, 0)).strategy == "fedavg"
    assert small.model_width({"small_width": 7}, 16) == 7 and small.model_width({}, 16) == 16
    for name in METHODS:
        method = Method.create(name)
        if not isinstance(method, Small):
            assert method.trained_method() is method and method.model_width({"small_width": 7}, 16) == 16


def test_with_budget_restores_a_matched_width_fraction():
    assert HeteroFL().with_budget({"width_fraction": 0.5}) == HeteroFL(width_fraction=0.5)
    assert FjORD().with_budget({"width_fraction": 0.625}).width_fraction == 0.625
    assert HeteroFL().with_budget({"width_fraction": None}) == HeteroFL()  # --match nominal
    for method in (PriSM(), FedAvg(), Small(), FedHM()):
        assert method.with_budget({"width_fraction": 0.5}) is method


def test_nested_width_methods_deploy_their_widest_slice(plain):
    plan = prism_tf.SubmodelPlan.of(plain)
    for method, fraction in ((HeteroFL(keep_ratio=0.5), 0.5), (FjORD(keep_ratio=0.5, fjord_widths=(0.5, 1.0)), 0.5),
                             (FjORD(keep_ratio=1.0, fjord_widths=(0.25, 0.5)), 0.5),
                             (HeteroFL(keep_ratio=0.2, width_fraction=0.5), 0.5)):
        models = deployed_models(method, plain)
        assert set(models) == {"deployed", "server"} and models["server"] is plain
        widest = prism_tf.extract(plain, method.select(plan, {}, (0, 0, 0), keep_ratio=method.keep_ratio
                                                       * method.widest))
        assert [w.shape for w in models["deployed"].weights] == [w.shape for w in widest.weights]
        assert prism_tf.cost(models["deployed"])["params"] == prism_tf.cost(widest)["params"]
        stem = "stage1_block2_2_conv:out"
        assert models["deployed"].get_layer("stage1_block2_2_conv").filters == plan.groups[stem].size * fraction
    for method in (PriSM(), FedHM(), FedAvg(), Small(), FedDropout(), FedRolex()):
        assert method.deployed_models(plain) == {"deployed": plain}


@pytest.fixture
def scratch_method():
    """A method registered by one class, as a new module would; unregistered afterwards."""

    @register
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class EveryOther(WholeModelMethod):
        """Test method: clients train the whole model, the server deploys it (a renamed FedAvg)."""

        name = "every_other"

    yield EveryOther
    del REGISTRY["every_other"]


def test_a_new_method_is_one_registered_class(scratch_method, plain):
    method = Method.create("every_other", keep_ratio=0.5, strategy="top")
    assert type(method) is scratch_method and isinstance(method, Method)
    plan = prism_tf.SubmodelPlan.of(plain)
    selections = methods.round_selections(method, plan, {}, 0, 3, [2, 1])
    assert [s.strategy for s in selections] == ["every_other"] * 2 and method.sizes(plan) == {}
    with pytest.raises(ValueError, match="'every_other' is .*EveryOther already"):
        register(dataclasses.make_dataclass("Clash", [], bases=(scratch_method,), namespace={"name": "every_other"},
                                            frozen=True))
    with pytest.raises(TypeError, match="needs a class attribute `name`"):
        register(dataclasses.make_dataclass("Nameless", [], bases=(WholeModelMethod,), frozen=True))
    with pytest.raises(TypeError, match="abstract"):
        register(dataclasses.make_dataclass("Abstract", [], bases=(Method,), namespace={"name": "abstract"},
                                            frozen=True))


def _compared_to_method_names(tree: ast.AST) -> list[int]:
    """Lines comparing something's ``.name`` / ``.method`` / ``["method"]`` with method names."""

    def names(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in METHODS
        return isinstance(node, ast.Tuple | ast.List | ast.Set) and any(names(e) for e in node.elts)

    def subject(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr in ("name", "method")) or (
            isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "method")

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(names(o) for o in operands) and any(subject(o) for o in operands):
                lines.append(node.lineno)
    return lines


def test_no_code_tests_a_method_by_its_name():
    root = Path(__file__).resolve().parents[1]
    offenders = [f"{path.relative_to(root)}:{line}"
                 for package in ("prism_tf", "tff_pipelines", "export", "bench")
                 for path in sorted((root / package).rglob("*.py"))
                 for line in _compared_to_method_names(ast.parse(path.read_text()))]
    assert not offenders, offenders
    assert _compared_to_method_names(ast.parse("if method.name == 'small': pass\nx = cfg['method'] in ('fjord',)"))
