"""`NPPNet`, the derived network (reference NPPNET.md 2)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.layers.operations import PooledConv, SEConnect
from nppnet_tf.models.network import OUTPUT_KEYS
from nppnet_tf.models.nppnet import NPPNet
from nppnet_tf.search.genotype import Genotype, GenotypeError
from tests.helpers import check_layer

GENOTYPE = Genotype.load("configs/genotypes/nppnet_lip.json")
CHANNELS = {"pose": 16, "pose_aux": 16, "parsing": 20, "edge": 2}


def _shapes(batch, height, width):
    return {
        key: (
            batch,
            height // 4,
            width // 4,
            CHANNELS[key.replace("_stage1", "")],
        )
        for key in OUTPUT_KEYS
    }


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return NPPNet(GENOTYPE, init_channels=8, num_cells=4)


def test_contract(model, tmp_path):
    images = (
        np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    )
    outputs = check_layer(model, [images], _shapes(2, 64, 64), tmp_path)
    assert set(outputs) == set(OUTPUT_KEYS)
    assert not np.allclose(outputs["parsing"], outputs["parsing_stage1"])


def test_odd_multiples_of_32_keep_quarter_resolution(model):
    # 96 / 32 = 3 and 160 / 32 = 5: odd sizes at the 1/32 stage.
    images = np.zeros((1, 96, 160, 3), "float32")
    outputs = model(images, training=False)
    shapes = {key: tuple(value.shape) for key, value in outputs.items()}
    assert shapes == _shapes(1, 96, 160)


def test_every_network_variable_gets_a_gradient(model):
    images = (
        np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype("float32")
    )
    with tf.GradientTape() as tape:
        outputs = model(images, training=True)
        loss = sum(tf.reduce_mean(tf.square(v)) for v in outputs.values())
    grads = tape.gradient(loss, model.trainable_variables)
    missing = [
        v.path for v, g in zip(model.trainable_variables, grads) if g is None
    ]
    assert not missing
    assert model.architecture_variables() == []
    assert len(model.network_variables()) == len(model.trainable_variables)


def test_config_stores_the_genotype(model):
    config = model.get_config()
    assert config["genotype"] == GENOTYPE.to_dict()
    assert (config["init_channels"], config["num_cells"]) == (8, 4)
    clone = NPPNet.from_config(config)
    assert clone.genotype == GENOTYPE


def test_structure_of_the_authors_network_at_small_width():
    # Op counts of reference 9 do not depend on the width: 16 cells at C = 8.
    network = NPPNet(GENOTYPE, init_channels=8, num_cells=16)
    network.build((None, 64, 64, 3))
    layers = list(network._flatten_layers())
    se_strides = [
        layer.stride for layer in layers if isinstance(layer, SEConnect)
    ]
    assert (se_strides.count(1), se_strides.count(2)) == (58, 12)
    assert sum(isinstance(layer, PooledConv) for layer in layers) == 4
    assert len(network.pose_encoder) == len(network.parsing_encoder) == 16
    reductions = [cell.reduction for cell in network.pose_encoder]
    assert [i for i, r in enumerate(reductions) if r] == [4, 8, 12]
    assert network.stage_channels == (16, 32, 64, 128)
    assert network.decoder_channels == (64, 32, 16)
    assert len(network.pose_fusion) == len(network.parsing_fusion) == 3
    assert [len(network.pose_head), len(network.edge_head)] == [2, 2]


def test_incomplete_genotype_is_rejected():
    with pytest.raises(GenotypeError, match="missing encoder_parsing_to_pose"):
        NPPNet(GENOTYPE.cells_only(), init_channels=8, num_cells=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init_channels": 7}, "init_channels"),
        ({"num_cells": 6}, "multiple of 4"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_sizes_fail_early(kwargs, message):
    sizes = {"init_channels": 8, "num_cells": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        NPPNet(GENOTYPE, **sizes)


@pytest.mark.slow
def test_sync_batchnorm_under_mirrored_strategy(make_mirrored_strategy):
    # Fresh collective keys: an earlier strategy of this process (e.g.
    # test_blocks' SyncBatchNorm test) would collide on instance 100.
    strategy = make_mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        network = NPPNet(
            GENOTYPE, init_channels=8, num_cells=4, sync_batchnorm=True
        )
        network.build((None, 64, 64, 3))
    images = (
        np.random.default_rng(2).normal(size=(4, 64, 64, 3)).astype("float32")
    )
    dataset = tf.data.Dataset.from_tensors(images)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    outputs = strategy.run(
        tf.function(lambda x: network(x, training=True)), args=(batch,)
    )
    local = strategy.experimental_local_results(outputs["parsing"])
    assert [tuple(t.shape) for t in local] == [(2, 16, 16, 20)] * 2
