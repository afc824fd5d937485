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
