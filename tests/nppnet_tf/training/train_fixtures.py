"""Shared set-up of the training tests: tiny records and a tiny config.

The records are the search tests' (`search_fixtures.search_records`: a
synthetic LIP of 24 train and 4 val images, 64 x 64 crops, built once per
session). `tiny_config` is a `RunConfig` whose training fits them: global
batch 4 (6 steps per epoch), 2 epochs, checkpoints every 2 steps, the toy
network of `toy_network.py` unless `network=None`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nppnet_tf.config import (
    DistributeConfig,
    LossConfig,
    RunConfig,
    TrainConfig,
)
from tests.nppnet_tf.search.search_fixtures import DATA_CONFIG, search_records

TOY = "tests.nppnet_tf.training.toy_network:toy_network"
AUTHORS_GENOTYPE = (
    Path(__file__).resolve().parents[3] / "configs/genotypes/nppnet_lip.json"
)
STEPS_PER_EPOCH = 6  # 24 train images, batch 4

__all__ = ["search_records", "tiny_config", "TOY", "AUTHORS_GENOTYPE"]


def tiny_config(**train) -> RunConfig:
    """A `RunConfig` for the tiny records; `train` overrides fields of the
    train section."""
    values = dict(
        genotype=str(AUTHORS_GENOTYPE),
        init_channels=8,
        layers=4,
        epochs=2,
        batch_size=4,
        learning_rate=3e-3,
        lr_milestones=(1,),
        val_examples=4,
        val_batch_size=2,
        overlays=2,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
        log_every_steps=1,
        seed=7,
        deterministic=True,
        network=TOY,
    )
    values.update(train)
    return dataclasses.replace(
        RunConfig(),
        data=DATA_CONFIG,
        loss=LossConfig(ohem_min_kept=1024),
        train=TrainConfig(**values),
        distribute=DistributeConfig(devices=1, sync_batchnorm=True),
    )
