"""Stems, projections and heads (reference 2.2, 2.8)."""

import numpy as np

from nppnet_tf.layers.heads import Head, Projection, Stem
from tests.helpers import check_layer


def test_stem_contract(tmp_path):
    images = (
        np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    )
    stem = Stem(8)
    s0, s1 = check_layer(
        stem, [images], ((2, 8, 8, 16), (2, 8, 8, 16)), tmp_path
    )
    assert s0.min() >= 0  # ReLU after the second conv, none after the third
    assert s1.min() < 0


def test_projection_contract(tmp_path):
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 32)).astype("float32")
    check_layer(Projection(12), [x], (2, 8, 8, 12), tmp_path)


def test_head_contract_and_widths(tmp_path):
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 24)).astype("float32")
    head = Head(6, 2, 3, hidden_bias=False)
    check_layer(head, [x], (2, 8, 8, 2), tmp_path)
    # Edge head: 3x3 conv 24->6 without bias, BN (12), 1x1 conv 6->2 + bias.
    trainable = sum(int(np.prod(v.shape)) for v in head.trainable_weights)
    assert trainable == 9 * 24 * 6 + 12 + 6 * 2 + 2
