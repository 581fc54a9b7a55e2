import re

import numpy as np
import pytest

from nppnet_tf.search import architecture_file
from nppnet_tf.search.architecture_file import (
    ArchitectureFileError,
    load_architecture,
    pack_space,
    parse_arrays,
    row_slices,
    save_architecture,
    uniform_arrays,
)
from nppnet_tf.search.genotype import CELL_FIELDS, SEARCHED_BY_INTERACTION
from nppnet_tf.search.primitives import (
    PRIMITIVES_ENCODER_DECODER,
    PRIMITIVES_INTER,
)


def _bounds(space):
    return [(rows.start, rows.stop) for rows in row_slices(space)]


def test_row_layouts_match_the_reference():
    # Reference 3.1: alphas1/2 (10 rows), alphas3/4 and the fusion cells
    # (18 rows); DARTS cells 14 rows.
    assert _bounds("encoder_parsing_to_pose") == [
        (0, 1),
        (1, 3),
        (3, 6),
        (6, 10),
    ]
    assert _bounds("encoder_pose_to_parsing") == [
        (0, 1),
        (1, 3),
        (3, 6),
        (6, 10),
    ]
    assert _bounds("decoder_parsing_to_pose") == [(0, 5), (5, 11), (11, 18)]
    assert _bounds("decoder_pose_to_parsing") == [(0, 5), (5, 11), (11, 18)]
    assert _bounds("pose_fusion") == [(0, 3), (3, 7), (7, 12), (12, 18)]
    assert _bounds("parsing_fusion") == [(0, 3), (3, 7), (7, 12), (12, 18)]
    for space in CELL_FIELDS:
        assert _bounds(space) == [(0, 2), (2, 5), (5, 9), (9, 14)]
    total = sum(
        architecture_file.num_rows(s) * (len(PRIMITIVES_INTER) + 1)
        for s in SEARCHED_BY_INTERACTION
    )
    assert total == 736  # the released supernet's architecture scalars


@pytest.mark.parametrize(
    "space, row, label",
    [
        ("encoder_parsing_to_pose", 0, (0, 0)),
        ("encoder_parsing_to_pose", 5, (2, 2)),
        ("encoder_parsing_to_pose", 6, (3, 0)),
        ("decoder_pose_to_parsing", 4, (0, 4)),
        ("decoder_pose_to_parsing", 17, (2, 6)),
        ("pose_fusion", 7, (5, 0)),
        ("pose_fusion", 17, (6, 5)),
        ("pose_decoder", 1, (2, 1)),
        ("pose_decoder", 13, (5, 4)),
    ],
)
def test_row_labels(space, row, label):
    assert architecture_file.layout(space).row_label(row) == label


def test_default_op_lists():
    assert architecture_file.DEFAULT_OPS["pose_fusion"] == PRIMITIVES_INTER
    assert (
        architecture_file.DEFAULT_OPS["parsing_decoder"]
        == PRIMITIVES_ENCODER_DECODER
    )
    assert PRIMITIVES_ENCODER_DECODER[0] == "none"


def test_save_load_round_trip(tmp_path, authors_arrays, authors_genotype):
    path = save_architecture(
        tmp_path / "run" / "architecture.npz",
        authors_arrays,
        base_genotype=authors_genotype.cells_only(),
    )
    assert not list(path.parent.glob("*.tmp"))
    loaded = load_architecture(path)
    assert str(loaded["format"]) == "nppnet-architecture/1"
    assert set(loaded) == set(authors_arrays) | {"format", "base_genotype"}
    for key, value in authors_arrays.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    assert loaded["pose_fusion/alphas"].dtype == np.float32
    spaces, base = parse_arrays(loaded)
    assert base == authors_genotype.cells_only()
    assert spaces["pose_fusion"].ops == PRIMITIVES_INTER
    # Saving the loaded arrays again keeps the stored base genotype.
    again = load_architecture(save_architecture(tmp_path / "b.npz", loaded))
    assert str(again["base_genotype"]) == str(loaded["base_genotype"])


def test_uniform_arrays_are_the_search_start():
    arrays = uniform_arrays(["decoder_pose_to_parsing", "pose_decoder"])
    assert arrays["decoder_pose_to_parsing/alphas"].shape == (18, 7)
    assert arrays["pose_decoder/alphas"].shape == (14, 9)
    assert np.all(arrays["pose_decoder/betas"] == np.float32(1e-3))
    assert architecture_file.spaces_in(arrays) == (
        "pose_decoder",
        "decoder_pose_to_parsing",
    )


def _fusion():
    return uniform_arrays(["pose_fusion"])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda a: a.__setitem__("pose_fusion/alphas", np.zeros((17, 7))),
            "key 'pose_fusion/alphas': expected shape (18, 7), got (17, 7)",
        ),
        (
            lambda a: a.__setitem__("pose_fusion/betas", np.zeros((18, 1))),
            "key 'pose_fusion/betas': expected shape (18,), got (18, 1)",
        ),
        (
            lambda a: a.__setitem__(
                "pose_fusion/ops",
                np.array(list(PRIMITIVES_INTER[:6]) + ["conv_9x9"]),
            ),
            "key 'pose_fusion/ops': unknown op 'conv_9x9'",
        ),
        (
            lambda a: a.__setitem__(
                "pose_fusion/ops",
                np.array(list(PRIMITIVES_INTER[:6]) + ["std_conv_3x3"]),
            ),
            "key 'pose_fusion/ops': op 'std_conv_3x3' listed twice",
        ),
        (
            lambda a: a.update(
                {
                    "pose_fusion/ops": np.array(["none"]),
                    "pose_fusion/alphas": np.zeros((18, 1)),
                }
            ),
            "key 'pose_fusion/ops': needs at least one op besides 'none'",
        ),
        (
            lambda a: a.__setitem__("pose_fusion/ops", np.arange(7)),
            "key 'pose_fusion/ops': expected a 1-D string array",
        ),
        (
            lambda a: a.pop("pose_fusion/betas"),
            "space 'pose_fusion' has no key 'pose_fusion/betas'",
        ),
        (
            lambda a: a.__setitem__("pose_fusion/gammas", np.zeros(3)),
            "unknown key 'pose_fusion/gammas'",
        ),
        (
            lambda a: a.__setitem__("task1/alphas", np.zeros((10, 7))),
            "unknown key 'task1/alphas'",
        ),
        (
            lambda a: a["pose_fusion/alphas"].__setitem__((4, 2), np.nan),
            "key 'pose_fusion/alphas': value nan at (4, 2) is not finite",
        ),
        (
            lambda a: a.__setitem__("pose_fusion/betas", np.array(["a"] * 18)),
            "key 'pose_fusion/betas': expected numbers",
        ),
        (
            lambda a: a.__setitem__(
                "format", np.array("nppnet-architecture/0")
            ),
            "key 'format': format 'nppnet-architecture/0' is not "
            "'nppnet-architecture/1'",
        ),
        (
            lambda a: a.__setitem__("base_genotype", np.array("{}")),
            "key 'base_genotype': missing field 'pose_encoder_normal'",
        ),
        (
            lambda a: a.__setitem__("base_genotype", np.zeros(3)),
            "key 'base_genotype': expected a single string",
        ),
        (
            lambda a: [a.pop(k) for k in list(a)],
            "no search space",
        ),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path, change, message):
    arrays = _fusion()
    change(arrays)
    path = tmp_path / "architecture.npz"
    with pytest.raises(
        ArchitectureFileError, match=re.escape(message)
    ) as error:
        save_architecture(path, arrays)
    assert str(error.value).startswith(f"{path}: ")
    assert not path.exists()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        load_architecture(tmp_path / "missing.npz")
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    with pytest.raises(ArchitectureFileError, match="text.npz: not an npz"):
        load_architecture(text)
    no_format = tmp_path / "no_format.npz"
    np.savez(no_format, **_fusion())
    with pytest.raises(ArchitectureFileError, match="no 'format' key"):
        load_architecture(no_format)
    pickled = tmp_path / "pickled.npz"
    np.savez(
        pickled,
        format=np.array("nppnet-architecture/1"),
        **{"pose_fusion/ops": np.array([object()], dtype=object)},
    )
    with pytest.raises(
        ArchitectureFileError, match="key 'pose_fusion/ops': unreadable array"
    ):
        load_architecture(pickled)
    bad_shape = tmp_path / "bad_shape.npz"
    arrays = _fusion()
    arrays["pose_fusion/betas"] = np.zeros(3)
    np.savez(bad_shape, format=np.array("nppnet-architecture/1"), **arrays)
    with pytest.raises(
        ArchitectureFileError,
        match=re.escape(
            f"{bad_shape}: key 'pose_fusion/betas': expected shape"
        ),
    ):
        load_architecture(bad_shape)


def test_pack_space_checks_its_arguments():
    with pytest.raises(
        ArchitectureFileError, match="unknown search space 'task3'"
    ):
        pack_space("task3", np.zeros((18, 7)), np.zeros(18))
    with pytest.raises(
        ArchitectureFileError, match=r"expected shape \(14, 9\)"
    ):
        pack_space("pose_decoder", np.zeros((14, 7)), np.zeros(14))
    packed = pack_space(
        "pose_decoder", np.zeros((14, 7)), np.zeros(14), PRIMITIVES_INTER
    )
    assert packed["pose_decoder/ops"].tolist() == list(PRIMITIVES_INTER)
