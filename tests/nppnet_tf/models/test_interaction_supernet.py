"""`InteractionSupernet`: the authors' search supernet (reference 2.11, 3)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.models.interaction_supernet import InteractionSupernet
from nppnet_tf.models.network import OUTPUT_KEYS
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.search.primitives import PRIMITIVES_INTER
from tests.helpers import check_layer

GENOTYPE = Genotype.load("configs/genotypes/nppnet_lip.json")
# Reference 3.1: rows of every space (columns: PRIMITIVES_INTER).
ROWS = {
    "encoder_parsing_to_pose": 10,
    "encoder_pose_to_parsing": 10,
    "decoder_parsing_to_pose": 18,
    "decoder_pose_to_parsing": 18,
    "pose_fusion": 18,
    "parsing_fusion": 18,
}
# The contract does not depend on the candidates; two keep it fast.
CANDIDATES = ("std_conv_1x1", "max_pool_3x3")


@pytest.fixture(scope="module")
def supernet():
    keras.utils.set_random_seed(0)
    model = InteractionSupernet(
        GENOTYPE.cells_only(),
        init_channels=8,
        num_cells=4,
        primitives=CANDIDATES,
    )
    model.build((None, 64, 64, 3))
    return model


def _images(seed=0):
    return (
        np.random.default_rng(seed)
        .normal(size=(2, 64, 64, 3))
        .astype("float32")
    )


def test_contract(supernet, tmp_path):
    outputs = check_layer(supernet, [_images()], tmp_path=tmp_path)
    assert set(outputs) == set(OUTPUT_KEYS)
    assert outputs["parsing"].shape == (2, 16, 16, 20)
    assert outputs["edge_stage1"].shape == (2, 16, 16, 2)


def test_search_spaces_have_the_authors_layout():
    # Architecture variables exist from construction (no build needed).
    model = InteractionSupernet(GENOTYPE, init_channels=8, num_cells=4)
    arrays = model.architecture_arrays()
    for space, rows in ROWS.items():
        assert arrays[f"{space}/alphas"].shape == (rows, 7)
        assert arrays[f"{space}/betas"].shape == (rows,)
        assert tuple(arrays[f"{space}/ops"]) == PRIMITIVES_INTER
        np.testing.assert_allclose(arrays[f"{space}/alphas"], 1e-3)
    total = sum(int(np.prod(v.shape)) for v in model.architecture_variables())
    assert total == 736
    assert model.architecture["pose_fusion"].node_sizes == (3, 4, 5, 6)
    assert model.architecture["decoder_pose_to_parsing"].node_sizes == (5, 6, 7)


def test_architecture_and_network_variables_split_the_trainables(supernet):
    architecture = {id(v) for v in supernet.architecture_variables()}
    network = {id(v) for v in supernet.network_variables()}
    assert len(architecture) == 12 and not architecture & network
    assert architecture | network == {
        id(v) for v in supernet.trainable_variables
    }


def test_assign_architecture_round_trip(supernet):
    before = supernet.architecture_arrays()
    rng = np.random.default_rng(3)
    new = {
        key: (
            rng.normal(size=value.shape).astype("float32")
            if key[-4:] != "/ops"
            else value
        )
        for key, value in before.items()
    }
    supernet.assign_architecture(new)
    after = supernet.architecture_arrays()
    for key in new:
        np.testing.assert_array_equal(after[key], new[key])
    supernet.assign_architecture(before)
    bad = dict(before, **{"pose_fusion/alphas": np.zeros((17, 2), "float32")})
    with pytest.raises(ValueError, match="pose_fusion/alphas has shape"):
        supernet.assign_architecture(bad)
    wrong_ops = dict(before, **{"pose_fusion/ops": np.array(["a", "b"])})
    with pytest.raises(ValueError, match="pose_fusion/ops"):
        supernet.assign_architecture(wrong_ops)


def test_gradients_reach_every_alpha_and_beta(supernet):
    with tf.GradientTape() as tape:
        outputs = supernet(_images(1), training=True)
        loss = sum(tf.reduce_mean(tf.square(v)) for v in outputs.values())
    variables = supernet.architecture_variables()
    grads = tape.gradient(loss, variables)
    for variable, grad in zip(variables, grads):
        grad = np.asarray(grad)
        if variable.path.endswith("betas"):
            # Single-edge nodes (encoder stage 0) have a constant weight 1.
            grad = grad[1:] if "encoder_" in variable.path else grad
        assert np.all(grad != 0), variable.path


def test_only_the_cells_of_the_genotype_are_used(supernet):
    assert not supernet.genotype.is_complete
    assert supernet.get_config()["genotype"] == GENOTYPE.cells_only().to_dict()
    assert supernet.get_config()["partial_channels"] == 2
