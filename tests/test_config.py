"""prism_tf.federated.config: a run's options (`TrainConfig`, the one definition of their defaults), its method,
client budget and participants (docs/algorithm.md §5), and the options of a stored run."""

from __future__ import annotations

import dataclasses
import json

import pytest

import prism_tf
from prism_tf.federated.config import (
    LEGACY_DEFAULTS,
    TrainConfig,
    client_budget,
    parse_keep_mix,
    round_clients,
    stored_config,
)
from prism_tf.federated.methods import FedAvg, FedHM, FjORD, HeteroFL, PriSM, Small
from prism_tf.federated.rundir import FORMAT_VERSION, RunDir, RunError


def test_keep_mix_parsing():
    assert parse_keep_mix("0.2:0.6,0.4:0.4") == ((0.2, 0.6), (0.4, 0.4))
    assert parse_keep_mix(None) is None and parse_keep_mix("") is None
    with pytest.raises(ValueError, match="keep-mix"):
        parse_keep_mix("0.2-0.6")
    with pytest.raises(ValueError, match="keep-mix ratio"):
        parse_keep_mix("1.2:1")
    with pytest.raises(ValueError, match="keep-mix shares must be positive, got 0.0"):
        parse_keep_mix("0.2:0")


@pytest.mark.parametrize("options,words", [
    (dict(method="fedprox"), ("--method must be one of", "fedprox")),
    (dict(model="resnet50"), ("--model must be one of", "resnet50")),
    (dict(clients_per_round=30), ("--clients-per-round (30) exceeds --clients (20)",)),
    (dict(min_clients=6), ("--min-clients (6) exceeds --clients-per-round (5)",)),
    (dict(rounds=0), ("--rounds must be >= 1, got 0",)),
    (dict(examples_per_client=8), ("--examples-per-client (8) is below --batch-size (32)",)),
    (dict(client_lr=float("nan")), ("--client-lr must be a finite number >= 0",)),
    (dict(keep_ratio=1.5), ("--keep-ratio", "1.5")),
    (dict(match="exact"), ("--match must be one of", "exact")),
    (dict(calibration_examples=1), ("--calibration-examples must be >= 2, got 1",)),
    (dict(batch_size=33), ("batch size 33 is odd",)),
    (dict(attention="partly"), ("--attention must be whole or factorized", "partly")),
])
def test_validate_names_the_flag(options, words):
    with pytest.raises(ValueError) as raised:
        TrainConfig(**options).validate()
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_the_defaults_validate_and_build_prism():
    TrainConfig().validate()
    assert TrainConfig().method_spec() == PriSM(keep_ratio=0.2, strategy="prism")


def test_method_spec_builds_each_method_from_the_run_options():
    config = TrainConfig(keep_ratio=0.25, strategy="unbiased", gamma=3.0, output_keep=0.5, keep_mix="0.25:1")
    mix = ((0.25, 1.0),)
    assert dataclasses.replace(config, method="prism").method_spec() == PriSM(
        keep_ratio=0.25, strategy="unbiased", gamma=3.0, output_keep=0.5, keep_mix=mix)
    assert dataclasses.replace(config, method="fedhm").method_spec() == FedHM(
        keep_ratio=0.25, gamma=3.0, output_keep=0.5, keep_mix=mix)
    assert dataclasses.replace(config, method="fedavg").method_spec() == FedAvg(
        keep_ratio=0.25, output_keep=0.5, keep_mix=mix)
    assert dataclasses.replace(config, method="fjord").method_spec() == FjORD(
        keep_ratio=0.25, output_keep=0.5, keep_mix=mix)


def test_round_clients_is_a_seeded_draw_per_round_index():
    assert round_clients(TrainConfig(), 0) == [2, 8, 10, 13, 15]  # round 1 of a default run
    assert round_clients(TrainConfig(), 1) == [0, 4, 7, 14, 17]
    assert round_clients(TrainConfig(seed=3, clients=4, clients_per_round=2), 0) == [2, 3]
    rng = prism_tf.streams.rng((0, 5), "participants")
    assert round_clients(TrainConfig(), 5) == sorted(int(c) for c in rng.choice(20, 5, replace=False))


@pytest.mark.slow  # 15-30 s: `make test-all` (the default suite stays under 15 minutes)
def test_client_budget_gives_small_and_width_methods_prisms_client_flops():
    """The run's budget: `small` is the width closest to PriSM's flops, HeteroFL the matched channel fraction."""
    fm = prism_tf.factorize(prism_tf.models.resnet18(width=16))
    plan = prism_tf.SubmodelPlan.of(fm)
    sizes = plan.sizes_with(PriSM().sizes(plan))
    target = prism_tf.cost(prism_tf.submodel.submodel_architecture(fm, plan, sizes))
    small, width, info = client_budget(TrainConfig(method="small", width=16, keep_ratio=0.2), (32, 32, 3), 10)
    flops = {w: prism_tf.cost(prism_tf.models.resnet18(width=w))["flops"] for w in range(1, 17)}
    assert isinstance(small, Small) and width == min(flops, key=lambda w: abs(flops[w] - target["flops"]))
    assert info["small_width"] == width and info["prism_flops_ratio"] == pytest.approx(0.2646, abs=1e-4)
    assert small.model_width(info, 16) == width
    heterofl, width, info = client_budget(TrainConfig(method="heterofl", width=16, keep_ratio=0.2), (32, 32, 3), 10)
    assert heterofl == HeteroFL(keep_ratio=0.2, width_fraction=0.5) and width == 16
    assert abs(info["flops_ratio"] / info["prism_flops_ratio"] - 1) <= 0.05
    assert list(info)[:5] == ["metric", "keep_ratio", "output_keep", "target", "width_fraction"]
    nominal, _, info = client_budget(TrainConfig(method="heterofl", width=16, keep_ratio=0.2, match="nominal"),
                                     (32, 32, 3), 10)
    assert nominal == HeteroFL(keep_ratio=0.2) and nominal.channel_fraction() == 0.2
    assert info["metric"] == "nominal" and info["width_fraction"] is None
    assert info["flops_ratio"] == info["prism_flops_ratio"]  # the nominal record is PriSM's budget
    # `small` has no nominal size: it is matched by flops under --match nominal too
    _, width, info = client_budget(TrainConfig(method="small", width=16, match="nominal"), (32, 32, 3), 10)
    assert info["metric"] == "flops" and width == info["small_width"] < 16


def test_a_run_from_before_the_recipe_options_resumes_as_it_was_trained(tmp_path):
    current = dataclasses.asdict(TrainConfig())
    old = {k: v for k, v in current.items() if k not in LEGACY_DEFAULTS}
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = stored_config(RunDir(tmp_path))
    assert (config.augment, config.normalize, config.lr_schedule, config.match) == ("none", "none", "constant",
                                                                                    "nominal")
    assert config.frobenius_decay == 0.0 and config.weight_decay == 0.0
    (tmp_path / "config.json").write_text(json.dumps(current))  # a current run keeps what it stored
    assert stored_config(RunDir(tmp_path)) == TrainConfig()
    (tmp_path / "config.json").write_text(json.dumps({**current, "warp_drive": 1}))
    with pytest.raises(RunError, match="unknown options"):
        stored_config(RunDir(tmp_path))


def test_stored_config_round_trips_and_overrides(tmp_path):
    config = TrainConfig(method="fjord", rounds=7, keep_mix="0.2:0.5,0.4:0.5", clip_norm=None)
    RunDir(tmp_path).write_config(dataclasses.asdict(config), overwrite=False)
    assert json.loads((tmp_path / "config.json").read_text())["format_version"] == FORMAT_VERSION
    assert stored_config(RunDir(tmp_path)) == config
    assert stored_config(RunDir(tmp_path), rounds=9) == dataclasses.replace(config, rounds=9)
    (tmp_path / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "format_version": 2}))
    with pytest.raises(RunError, match="format version 2.*reads format version 1"):
        stored_config(RunDir(tmp_path))


def test_help_states_each_default_from_the_train_config_fields():
    """`TrainConfig` is the one definition of the defaults: ``train --help`` states them (item by item) and the
    parser's defaults are the fields'."""
    from tff_pipelines.program import cli

    parser = cli.build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    actions = {a.dest: a for a in train._actions}
    for field in dataclasses.fields(TrainConfig):
        action = actions[field.name]
        assert action.default == field.default
        if field.default is None:
            assert "(default: " in action.help, field.name
        else:
            shown = f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
            assert action.help.endswith(f"(default {shown})"), (field.name, action.help)
            assert action.help.count("default") == 1, action.help  # no second, hand-written default
    assert actions["client_lr"].help.endswith("(default 0.1)") and actions["final_lr"].help.endswith("(default 0.0001)")
    assert actions["clip_norm"].help.endswith("0 disables (default 5)")


def test_factorized_attention_changes_the_budget_small_is_matched_to():
    """``--attention factorized``: the server model's attention is factorized, so PriSM's sub-model (and with it the
    budget `small` is matched to) costs less than with attention whole (docs/algorithm.md §1)."""
    shape, classes = (32, 32, 3), 10
    assert TrainConfig().factorize_options() == {"attention": False}
    assert TrainConfig(attention="factorized").factorize_options() == {"attention": True}
    whole = client_budget(TrainConfig(method="small", model="vit", width=32), shape, classes)[2]
    factorized = client_budget(TrainConfig(method="small", model="vit", width=32, attention="factorized"), shape,
                               classes)[2]
    full = prism_tf.cost(prism_tf.models.build_model("vit", width=32, num_classes=classes, input_shape=shape))
    model = prism_tf.factorize(prism_tf.models.build_model("vit", width=32, num_classes=classes, input_shape=shape),
                               attention=True)
    plan = prism_tf.SubmodelPlan.of(model)
    sub = prism_tf.submodel.submodel_architecture(model, plan, plan.sizes_with(PriSM().sizes(plan)))
    assert factorized["prism_flops_ratio"] == pytest.approx(prism_tf.cost(sub)["flops"] / full["flops"])
    assert factorized["prism_flops_ratio"] < whole["prism_flops_ratio"] - 0.1
    assert factorized["small_width"] < whole["small_width"]
