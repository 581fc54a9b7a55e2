"""Fixtures of the data tests: one small set of real records, built once.

`lip_records` runs the Beam job (`beam_jobs.lip_to_tfrecord.preprocess`,
in-process) on a synthetic LIP of 8 train and 4 val images at a 64 x 64 crop
and returns where the records are and the `DataConfig` they were written
with (about 10 s, once per test session).
"""

import dataclasses
from pathlib import Path

import pytest

from nppnet_tf.config import DataConfig

NUM_TRAIN = 8
NUM_VAL = 4


@dataclasses.dataclass(frozen=True)
class LIPRecords:
    records_dir: str
    data_config: DataConfig
    counts: dict


@pytest.fixture(scope="session")
def lip_records(tmp_path_factory) -> LIPRecords:
    from beam_jobs.lip_to_tfrecord import preprocess
    from nppnet_tf.data.synthetic import write_synthetic_lip

    root: Path = tmp_path_factory.mktemp("input_pipeline")
    write_synthetic_lip(
        root / "lip", NUM_TRAIN, NUM_VAL, seed=5, progress=False
    )
    data_config = DataConfig(
        image_size=64, heatmap_stride=4, sigma=4.0, aux_sigma=8.0, shards=2
    )
    manifest = preprocess(
        str(root / "lip"), str(root / "records"), data_config, progress=False
    )
    assert manifest["counts"]["train"] == NUM_TRAIN
    assert manifest["counts"]["val"] == NUM_VAL
    return LIPRecords(str(root / "records"), data_config, manifest["counts"])
