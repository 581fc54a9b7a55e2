"""Shared set-up of the search tests: tiny records and a tiny config.

`search_records(tmp_path_factory)` runs the Beam job in-process on a
synthetic LIP (24 train, 4 val images, 64 x 64 crops) once per test
session and returns the records directory and its counts. `tiny_config`
is a `RunConfig` whose search fits those records: global batch 2, 1 warm-up
epoch, 2 epochs, checkpoints every 2 steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nppnet_tf.config import (
    DataConfig,
    DistributeConfig,
    LossConfig,
    RunConfig,
    SearchConfig,
)

NUM_TRAIN = 24
NUM_VAL = 4
DATA_CONFIG = DataConfig(
    image_size=64, heatmap_stride=4, sigma=4.0, aux_sigma=8.0, shards=2
)
_CACHE: dict[str, tuple[str, dict]] = {}


def search_records(tmp_path_factory) -> tuple[str, dict]:
    """`(records_dir, counts)` of the tiny synthetic LIP (built once)."""
    if "records" not in _CACHE:
        from beam_jobs.lip_to_tfrecord import preprocess
        from nppnet_tf.data.synthetic import write_synthetic_lip

        root: Path = tmp_path_factory.mktemp("search_records")
        write_synthetic_lip(
            root / "lip", NUM_TRAIN, NUM_VAL, seed=3, progress=False
        )
        manifest = preprocess(
            str(root / "lip"),
            str(root / "records"),
            DATA_CONFIG,
            progress=False,
        )
        _CACHE["records"] = (str(root / "records"), manifest["counts"])
    return _CACHE["records"]


def tiny_config(work_dir: str | Path = "runs/test", **search) -> RunConfig:
    """A `RunConfig` for the tiny records; `search` overrides fields of the
    search section."""
    values = dict(
        init_channels=8,
        layers=4,
        epochs=2,
        encoder_decoder_epochs=2,
        warmup_epochs=1,
        entropy_start_epoch=0,
        batch_size=2,
        partial_channels=2,
        val_examples=4,
        val_batch_size=2,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
        log_every_steps=1,
        seed=7,
        deterministic=True,
    )
    values.update(search)
    return dataclasses.replace(
        RunConfig(),
        data=DATA_CONFIG,
        loss=LossConfig(ohem_min_kept=1024),
        search=SearchConfig(**values),
        distribute=DistributeConfig(devices=1, sync_batchnorm=True),
    )
