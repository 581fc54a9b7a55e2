"""`EncoderDecoderSupernet`: our encoder-decoder cell search (docs/model.md)."""

import keras
import numpy as np
import pytest

from nppnet_tf.layers.search_cells import SearchCell, SearchDecoderCell
from nppnet_tf.models.encoder_decoder_supernet import EncoderDecoderSupernet
from nppnet_tf.models.network import OUTPUT_KEYS
from tests.helpers import check_layer

SPACES = (
    "pose_encoder_normal",
    "pose_encoder_reduce",
    "parsing_encoder_normal",
    "parsing_encoder_reduce",
    "pose_decoder",
    "parsing_decoder",
)
# The contract does not depend on the candidates; three keep it fast.
CANDIDATES = ("none", "skip_connect", "std_conv_1x1")


@pytest.fixture(scope="module")
def supernet():
    keras.utils.set_random_seed(0)
    model = EncoderDecoderSupernet(
        init_channels=8, num_cells=4, partial_channels=2, primitives=CANDIDATES
    )
    model.build((None, 64, 64, 3))
    return model


def _images(seed=0):
    return (
        np.random.default_rng(seed)
        .normal(size=(2, 64, 64, 3))
        .astype("float32")
    )


def test_contract_and_stage_2_repeats_stage_1(supernet, tmp_path):
    outputs = check_layer(supernet, [_images()], tmp_path=tmp_path)
    assert set(outputs) == set(OUTPUT_KEYS)
    for key in ("pose", "pose_aux", "parsing", "edge"):
        np.testing.assert_array_equal(outputs[key], outputs[f"{key}_stage1"])
    assert outputs["pose"].shape == (2, 16, 16, 16)


def test_search_spaces_and_cells(supernet):
    arrays = supernet.architecture_arrays()
    assert {key.split("/")[0] for key in arrays} == set(SPACES)
    for space in SPACES:
        assert arrays[f"{space}/alphas"].shape == (14, 3)
        assert tuple(arrays[f"{space}/ops"]) == CANDIDATES
    assert supernet.encoder_spaces["pose"] == [
        "pose_encoder_normal",
        "pose_encoder_reduce",
        "pose_encoder_reduce",
        "pose_encoder_reduce",
    ]
    cells = supernet.pose_encoder + supernet.parsing_encoder
    assert all(isinstance(cell, SearchCell) for cell in cells)
    decoders = supernet.pose_decoder + supernet.parsing_decoder
    assert all(isinstance(cell, SearchDecoderCell) for cell in decoders)
    assert not supernet.encoder_parsing_to_pose and not supernet.pose_fusion
    assert supernet.get_config()["partial_channels"] == 2


def test_branches_are_independent(supernet):
    # No interactions: the parsing spaces cannot change the pose outputs.
    images = _images(1)
    before = supernet(images, training=False)
    saved = supernet.architecture_arrays()
    rng = np.random.default_rng(0)
    changed = {
        key: (
            rng.normal(size=value.shape).astype("float32")
            if key.startswith("parsing") and not key.endswith("/ops")
            else value
        )
        for key, value in saved.items()
    }
    supernet.assign_architecture(changed)
    after = supernet(images, training=False)
    supernet.assign_architecture(saved)
    np.testing.assert_allclose(after["pose"], before["pose"], atol=1e-6)
    assert not np.allclose(after["parsing"], before["parsing"])


def test_default_space_has_840_architecture_parameters():
    model = EncoderDecoderSupernet(init_channels=16, num_cells=4)
    total = sum(int(np.prod(v.shape)) for v in model.architecture_variables())
    assert total == 6 * 14 * (9 + 1) == 840
    assert model.partial_channels == 4


def test_partial_channels_must_divide_the_node_widths():
    with pytest.raises(ValueError, match="partial_channels must divide"):
        EncoderDecoderSupernet(init_channels=8, num_cells=4, partial_channels=8)
