"""Tests of the initial stem and encoder weights (reference 2.12) and of
the checkpointed model variables they can come from."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.models.nppnet import NPPNet
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.training.checkpointing import Checkpointer
from nppnet_tf.training.init_weights import (
    ModelVariables,
    canonical_paths,
    load_init_weights,
)
from nppnet_tf.training.train_step import encoder_variables
from tests.nppnet_tf.training.toy_network import ToyNetwork
from tests.nppnet_tf.training.train_fixtures import AUTHORS_GENOTYPE

ENCODER_PREFIXES = (
    "pose_stem",
    "parsing_stem",
    "pose_encoder",
    "parsing_encoder",
)


def _nppnet(seed: int, layers: int = 4) -> NPPNet:
    keras.utils.set_random_seed(seed)
    model = NPPNet(
        Genotype.load(AUTHORS_GENOTYPE), init_channels=8, num_cells=layers
    )
    model.build((None, 64, 64, 3))
    return model


def _by_path(model):
    return {
        path: np.array(v.numpy())
        for path, v in zip(canonical_paths(model), model.variables)
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny NPPNet with non-default BatchNorm statistics, saved."""
    model = _nppnet(seed=1)
    for variable in model.variables:
        if "moving_mean" in variable.path:
            variable.assign(np.full(variable.shape, 0.25, "float32"))
    path = tmp_path_factory.mktemp("init") / "source.keras"
    model.save(path)
    return model, path


def test_keras_file_loads_exactly_the_stems_and_encoders(source):
    model, path = source
    target = _nppnet(seed=2)
    untouched = _by_path(target)
    report = load_init_weights(target, path)
    wanted = _by_path(model)
    got = _by_path(target)
    encoder = {
        canonical_paths(target)[i]
        for i, v in enumerate(target.variables)
        if id(v) in {id(e) for e in encoder_variables(target, False)}
    }
    assert set(report.loaded) == encoder
    assert all(name.startswith(ENCODER_PREFIXES) for name in encoder)
    assert any("moving_mean" in name for name in report.loaded)
    for name in got:
        if name in encoder:
            np.testing.assert_array_equal(got[name], wanted[name], name)
        else:
            np.testing.assert_array_equal(got[name], untouched[name], name)
    assert not report.skipped_shape and not report.missing
    assert report.kind == "keras" and report.source == str(path)
    assert report.unused == len(wanted) - len(encoder)
    assert report.loaded_parameters == sum(wanted[n].size for n in encoder)
    counts = report.to_dict()["counts"]
    assert counts["loaded"] == len(encoder) and counts["missing"] == 0
    json.dumps(report.to_dict())  # plain data


def test_mismatched_shapes_are_skipped_and_absent_cells_reported(source):
    """An 8-cell network from a 4-cell one: cells 4-7 are missing; cells
    1-3 are reduction cells in the source, normal ones in the target
    (other ops, other shapes); the stems and the first cell load."""
    model, path = source
    target = _nppnet(seed=3, layers=8)
    before = _by_path(target)
    report = load_init_weights(target, path)
    assert report.missing and report.skipped_shape and report.loaded
    absent = {
        f"{branch}_encoder_{index}"
        for branch in ("pose", "parsing")
        for index in range(4, 8)
    }
    names = _by_path(target)
    assert {n for n in names if n.split("/")[0] in absent} <= set(
        report.missing
    )
    assert not any(
        n.startswith(("pose_stem", "parsing_stem")) for n in report.missing
    )
    after, wanted = _by_path(target), _by_path(model)
    for name, ours, theirs in report.skipped_shape:
        assert ours == before[name].shape and theirs == wanted[name].shape
        assert ours != theirs
        np.testing.assert_array_equal(after[name], before[name])
    for name in report.loaded:
        np.testing.assert_array_equal(after[name], wanted[name])
    assert any(n.startswith("pose_stem/") for n in report.loaded)


def test_training_checkpoint_is_a_source_too(source, tmp_path):
    model, _ = source
    checkpointer = Checkpointer(
        tmp_path / "checkpoints", model=ModelVariables(model)
    )
    checkpointer.save(5)
    target = _nppnet(seed=4)
    for where in (
        tmp_path,
        tmp_path / "checkpoints",
        tmp_path / "checkpoints" / "ckpt-5",
    ):
        report = load_init_weights(target, where)
        assert report.kind == "checkpoint" and report.source.endswith("ckpt-5")
        assert not report.missing and not report.skipped_shape
    got, wanted = _by_path(target), _by_path(model)
    for name in report.loaded:
        np.testing.assert_array_equal(got[name], wanted[name])


def test_model_variables_checkpoint_holds_list_held_layers(tmp_path):
    """`tf.train.Checkpoint(model=keras_model)` drops the layers a Keras 3
    model keeps in lists (most of NPPNet); `ModelVariables` keeps all."""
    model = _nppnet(seed=5)
    plain = tf.train.Checkpoint(model=model).write(str(tmp_path / "plain"))
    ours = tf.train.Checkpoint(model=ModelVariables(model)).write(
        str(tmp_path / "ours")
    )

    def count(prefix):
        keys = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
        return len([k for k in keys if k.endswith("VARIABLE_VALUE")])

    assert count(ours) == len(model.variables)
    assert count(plain) < len(model.variables) // 10


def test_bad_sources_fail_naming_the_path(tmp_path):
    target = _nppnet(seed=6)
    with pytest.raises(FileNotFoundError, match="nowhere.keras"):
        load_init_weights(target, tmp_path / "nowhere.keras")
    text = tmp_path / "weights.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="neither a .keras model"):
        load_init_weights(target, text)
    toy = ToyNetwork(channels=8)
    toy.build((None, 64, 64, 3))
    toy.save(tmp_path / "toy.keras")
    with pytest.raises(ValueError, match="none of the .* stem and encoder"):
        load_init_weights(target, tmp_path / "toy.keras")
    other = tf.train.Checkpoint(step=tf.Variable(1)).write(str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not a checkpoint of `nppnet train`"):
        load_init_weights(target, other)
