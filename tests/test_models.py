"""`prism_tf.models`: the zoo's Transformer (ViT) factorizes exactly, and its costs are the analytic counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf.models.zoo import VIT_PRESETS, vit


def test_vit_mlps_factorize_exactly_and_cost_their_analytic_floor():
    model = vit(preset="tiny", num_classes=10)  # dim 64, 4 blocks, 2 heads, MLP 128
    fm = prism_tf.factorize(model)
    mlps = [f"block{b}_mlp{i}" for b in range(1, 5) for i in (1, 2)]
    assert [f.name for f in fm.prism_report.factorized] == mlps  # attention, patch conv, classifier: whole
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    ref = model(x).numpy()
    assert np.linalg.norm(fm(x).numpy() - ref) / np.linalg.norm(ref) < 1e-5
    sub = prism_tf.extract(fm, prism_tf.sample(fm, keep_ratio=0.2, seed=1))
    full_cost, sub_cost = prism_tf.cost(model), prism_tf.cost(sub)
    k = math.ceil(0.2 * 64)  # both MLP matrices have rank 64
    floor = k * (64 + 128) / (64 * 128)
    ratio = sum(sub_cost["layers"][n] for n in mlps) / sum(full_cost["layers"][n] for n in mlps)
    assert ratio == pytest.approx(floor, rel=0.02)
    # Attention, per block: q, k, v, output projections (4·T·d·d) and scores + weighted sum (2·T²·d), T = 64 tokens.
    assert full_cost["layers"]["block1_attention"] == 4 * 64 * 64 * 64 + 2 * 64 * 64 * 64
    assert sub_cost["layers"]["block1_attention"] == full_cost["layers"]["block1_attention"]


def test_vit_presets_and_bad_shapes():
    assert VIT_PRESETS["deit_tiny"] == (192, 12, 3, 4.0)
    model = vit(preset="micro", num_classes=3, input_shape=(28, 28, 1))
    assert model.output_shape == (None, 3) and model.get_layer("tokens").output_shape == (None, 49, 32)
    restored = tf.keras.models.clone_model(model)  # the position table layer has get_config
    assert [w.shape for w in restored.weights] == [w.shape for w in model.weights]
    with pytest.raises(ValueError, match="patches"):
        vit(width=32, input_shape=(30, 30, 3))
    with pytest.raises(ValueError, match="LayerNorm"):
        vit(width=32, norm="batch")
    with pytest.raises(ValueError, match="preset"):
        vit(preset="huge")


def test_lstm_is_the_authors_imdb_classifier():
    from prism_tf.models import build_model

    model = build_model("lstm", width=256, num_classes=2, input_shape=(200,), norm=None)  # CLI: --norm unset
    params = {layer.name: layer.count_params() for layer in model.layers}
    assert params == {"tokens": 0, "embedding": 10000 * 64, "lstm1": 4 * 256 * (64 + 256 + 1),
                      "lstm2": 4 * 256 * (256 + 256 + 1), "classifier": 256 * 2 + 2}
    assert model.count_params() == 1_494_530
    assert model.input.dtype == tf.int32 and model.output_shape == (None, 2)
    lstms = [model.get_layer(n) for n in ("lstm1", "lstm2")]
    assert [type(layer) for layer in lstms] == [tf.keras.layers.LSTM] * 2  # plain Keras: factorize can convert them
    assert [layer.unroll for layer in lstms] == [False, False] and lstms[0].return_sequences
    small = build_model("lstm", width=8, num_classes=3, input_shape=(12,), vocabulary_size=50, embedding_dim=4)
    assert small.get_layer("embedding").count_params() == 50 * 4
    assert small.get_layer("lstm2").count_params() == 4 * 8 * (8 + 8 + 1)
    tokens = np.random.default_rng(0).integers(0, 50, (2, 12)).astype(np.int32)
    assert small(tokens).shape == (2, 3)
    with pytest.raises(ValueError, match="norm 'none'"):
        build_model("lstm", width=8, norm="batch")


def test_charlstm_predicts_every_step_and_kws_convolves_frames():
    from prism_tf.models import build_model, model_spec

    char = build_model("charlstm", width=16, num_classes=30, input_shape=(20,), norm=None)
    assert char.input.dtype == tf.int32 and char.output_shape == (None, 20, 30)
    assert char.get_layer("embedding").count_params() == 30 * 8  # vocabulary = classes; 8-dim (McMahan et al.)
    assert char.get_layer("lstm1").count_params() == 4 * 16 * (8 + 16 + 1)
    assert char.get_layer("lstm2").count_params() == 4 * 16 * (16 + 16 + 1)
    assert model_spec("charlstm").task == "next_token" and model_spec("lstm").task == "classification"

    kws = build_model("kws", width=8, num_classes=12, input_shape=(49, 40), norm=None)  # default norm: batch
    assert kws.output_shape == (None, 12)
    convs = [kws.get_layer(f"conv{i}_conv") for i in range(1, 5)]
    assert [c.filters for c in convs] == [8, 16, 16, 32] and [c.kernel_size for c in convs] == [(5,), (3,), (3,), (3,)]
    assert kws.get_layer("conv4_conv").output_shape == (None, 13, 32)  # 49 frames, pooled twice
    assert isinstance(kws.get_layer("conv1_norm"), tf.keras.layers.BatchNormalization)
    fm = prism_tf.factorize(kws)
    assert [f.name for f in fm.prism_report.factorized] == ["conv2_conv", "conv3_conv", "conv4_conv"]
    assert build_model("kws", width=4, input_shape=(10, 3), norm="group").get_layer("conv1_norm").groups == 1

    vit_model = build_model("vit", width=16, num_classes=3, input_shape=(28, 28, 1), norm=None)
    assert isinstance(vit_model.get_layer("final_norm"), tf.keras.layers.LayerNormalization)  # vit's default
    assert vit_model.get_layer("tokens").output_shape == (None, 49, 16)
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("kws", width=4, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gpt")
