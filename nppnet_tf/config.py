"""Run configuration: typed, frozen dataclasses loaded from one YAML file.

Values live in `configs/*.yaml` (one file holds a whole run); this module only
holds the types, their defaults (the paper's settings where a paper setting
exists) and their range checks. `load_config` rejects unknown keys, wrong
types and out-of-range values before any work starts, naming the key, the
value and the file; `--set section.key=value` overrides one key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _check(condition: bool, key: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {value!r}: {requirement}")


# The stages of `nppnet run`, in their fixed order (docs/pipeline.md).
PIPELINE_STAGES = (
    "preprocess",
    "validate",
    "search-encoder-decoder",
    "search-interaction",
    "train",
    "evaluate",
    "export",
    "serve-check",
    "register",
    "promote",
)
# stage -> stages it reads the outputs of (each must run before it).
STAGE_NEEDS = {
    "validate": ("preprocess",),
    "search-encoder-decoder": ("preprocess",),
    "search-interaction": ("preprocess",),
    "train": ("preprocess",),
    "evaluate": ("train",),
    "export": ("train",),
    "serve-check": ("export",),
    "register": ("export", "evaluate"),
    "promote": ("register",),
}


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Where a run reads and writes, and which stages `nppnet run` runs.

    Attributes:
        work_dir: every artifact of the run goes under this directory.
        lip_root: a LIP release folder; None synthesises one under
            `work_dir/lip` from the `synth` section.
        stages: the stages of `nppnet run`, a subsequence of
            `PIPELINE_STAGES` in that order. Without the searches, `train`
            trains `train.genotype` (e.g. the authors'); without
            `search-encoder-decoder`, the interaction search searches on
            the cells of `train.genotype`.
    """

    work_dir: str = "runs/lip"
    lip_root: str | None = None
    stages: tuple[str, ...] = PIPELINE_STAGES

    def __post_init__(self):
        for stage in self.stages:
            _check(
                stage in PIPELINE_STAGES,
                "run.stages",
                list(self.stages),
                f"{stage!r} is not a stage (stages: "
                f"{', '.join(PIPELINE_STAGES)})",
            )
        _check(
            len(set(self.stages)) == len(self.stages)
            and list(self.stages)
            == [s for s in PIPELINE_STAGES if s in self.stages],
            "run.stages",
            list(self.stages),
            "must list each stage once, in the pipeline's order: "
            + " -> ".join(PIPELINE_STAGES),
        )
        for stage in self.stages:
            for need in STAGE_NEEDS.get(stage, ()):
                _check(
                    need in self.stages,
                    "run.stages",
                    list(self.stages),
                    f"{stage!r} needs the outputs of {need!r}, which is "
                    "not listed",
                )
        _check(
            not (
                "search-encoder-decoder" in self.stages
                and "train" in self.stages
                and "search-interaction" not in self.stages
            ),
            "run.stages",
            list(self.stages),
            "'search-encoder-decoder' finds cells only; 'train' then needs "
            "'search-interaction' to complete the genotype",
        )


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Synthetic LIP in the release layout (`nppnet data synth`)."""

    train: int = 64
    val: int = 16
    seed: int = 0
    min_size: int = 96
    max_size: int = 192

    def __post_init__(self):
        _check(self.train >= 1, "synth.train", self.train, "must be >= 1")
        _check(self.val >= 1, "synth.val", self.val, "must be >= 1")
        _check(
            self.min_size >= 32,
            "synth.min_size",
            self.min_size,
            "must be >= 32",
        )
        _check(
            self.max_size >= self.min_size,
            "synth.max_size",
            self.max_size,
            f"must be >= synth.min_size ({self.min_size})",
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Crops, targets and record layout (reference 6.3, 6.4).

    Attributes:
        image_size: side of the square network input crop, a multiple of 32.
        heatmap_stride: input pixels per heatmap cell.
        sigma: Gaussian sigma of the main heatmaps, in input pixels.
        aux_sigma: sigma of the auxiliary heatmaps, in input pixels.
        edge_width: side of the square dilation kernel of the edge map.
        shards: TFRecord shards per split.
        include_test: also encode `testing_images` (images only) if present.
        keypoint_margin: a present keypoint further than this fraction of the
            image's long side outside the image sends the record to the
            dead-letter output.
    """

    image_size: int = 384
    heatmap_stride: int = 4
    sigma: float = 7.0
    aux_sigma: float = 14.0
    edge_width: int = 3
    shards: int = 16
    include_test: bool = False
    keypoint_margin: float = 0.5

    def __post_init__(self):
        _check(
            self.image_size >= 32 and self.image_size % 32 == 0,
            "data.image_size",
            self.image_size,
            "must be a positive multiple of 32",
        )
        _check(
            self.heatmap_stride >= 1
            and self.image_size % self.heatmap_stride == 0,
            "data.heatmap_stride",
            self.heatmap_stride,
            f"must be >= 1 and divide data.image_size ({self.image_size})",
        )
        _check(self.sigma > 0, "data.sigma", self.sigma, "must be > 0")
        _check(
            self.aux_sigma > 0, "data.aux_sigma", self.aux_sigma, "must be > 0"
        )
        _check(
            self.edge_width >= 1 and self.edge_width % 2 == 1,
            "data.edge_width",
            self.edge_width,
            "must be a positive odd number",
        )
        _check(self.shards >= 1, "data.shards", self.shards, "must be >= 1")
        _check(
            self.keypoint_margin >= 0,
            "data.keypoint_margin",
            self.keypoint_margin,
            "must be >= 0",
        )

    @property
    def heatmap_size(self) -> int:
        return self.image_size // self.heatmap_stride


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random training augmentation of the crop (reference 6.3).

    Attributes:
        scale_min: smallest random scale multiplier of `S / max(H, W)`.
        scale_max: largest random scale multiplier.
        max_rotation: rotation angles are drawn from
            `U[-max_rotation, max_rotation]` degrees.
        max_offset: the crop centre moves by integers in
            `[-max_offset, max_offset]` pixels per axis, in pixels of the
            configured crop (the authors: 40 at a 384 crop).
        flip_probability: chance of a horizontal flip.
    """

    scale_min: float = 0.5
    scale_max: float = 1.5
    max_rotation: float = 40.0
    max_offset: int = 40
    flip_probability: float = 0.5

    def __post_init__(self):
        _check(
            self.scale_min > 0,
            "augment.scale_min",
            self.scale_min,
            "must be > 0",
        )
        _check(
            self.scale_max >= self.scale_min,
            "augment.scale_max",
            self.scale_max,
            f"must be >= augment.scale_min ({self.scale_min})",
        )
        _check(
            0 <= self.max_rotation <= 180,
            "augment.max_rotation",
            self.max_rotation,
            "must be in [0, 180] degrees",
        )
        _check(
            self.max_offset >= 0,
            "augment.max_offset",
            self.max_offset,
            "must be >= 0",
        )
        _check(
            0 <= self.flip_probability <= 1,
            "augment.flip_probability",
            self.flip_probability,
            "must be in [0, 1]",
        )


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Apache Beam options of the preprocessing job.

    Attributes:
        pipeline_args: standard Beam pipeline flags, e.g.
            `["--runner=FlinkRunner", "--flink_master=host:8081"]`. Empty runs
            in-process (FnApiRunner, no network).
        direct_num_workers: workers of the in-process runner.
    """

    pipeline_args: tuple[str, ...] = ()
    direct_num_workers: int = 1

    def __post_init__(self):
        _check(
            self.direct_num_workers >= 1,
            "beam.direct_num_workers",
            self.direct_num_workers,
            "must be >= 1",
        )


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """TF Data Validation gate (`nppnet data validate`).

    Attributes:
        schema: curated schema kept in the repository (inferred and written
            there on the first run if absent).
        skew_threshold: L-infinity distance above which a train/val skew on a
            scalar feature is an anomaly.
        skew_min_examples: the skew check runs only when train and val both
            have at least this many records; below it the sampling noise of
            the L-infinity distance (about 1 / sqrt(n)) exceeds any useful
            threshold, and the report says the check was skipped.
    """

    schema: str = "configs/schema/lip_records.pbtxt"
    skew_threshold: float = 0.3
    skew_min_examples: int = 100

    def __post_init__(self):
        _check(
            0 < self.skew_threshold <= 1,
            "validate.skew_threshold",
            self.skew_threshold,
            "must be in (0, 1]",
        )
        _check(
            self.skew_min_examples >= 0,
            "validate.skew_min_examples",
            self.skew_min_examples,
            "must be >= 0",
        )


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """NPPNet training loss (reference 4).

    Attributes:
        ohem_threshold: OHEM keeps pixels whose ground-truth probability is
            below max(this, the min_kept-th smallest probability).
        ohem_min_kept: minimum number of pixels OHEM keeps in the global
            batch (all replicas together; the authors count per GPU, so
            their setting is 131072 x global_batch / 16 at 384x384).
        pose_lambda_init: initial uncertainty weight of the pose loss.
        parsing_lambda_init: initial uncertainty weight of the parsing loss.
    """

    ohem_threshold: float = 0.9
    ohem_min_kept: int = 131072
    pose_lambda_init: float = -2.5
    parsing_lambda_init: float = 2.3

    def __post_init__(self):
        _check(
            0 < self.ohem_threshold <= 1,
            "loss.ohem_threshold",
            self.ohem_threshold,
            "must be in (0, 1]",
        )
        _check(
            self.ohem_min_kept >= 1,
            "loss.ohem_min_kept",
            self.ohem_min_kept,
            "must be >= 1",
        )


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (MLflow) and TensorBoard.

    Attributes:
        uri: MLflow tracking URI; None uses `$MLFLOW_TRACKING_URI`, else the
            embedded store `sqlite:///<run.work_dir>/mlflow.db` with
            artifacts under `<run.work_dir>/mlartifacts`.
        experiment: MLflow experiment name.
        enabled: False runs without MLflow (TensorBoard still written).
    """

    uri: str | None = None
    experiment: str = "nppnet"
    enabled: bool = True

    def __post_init__(self):
        _check(
            bool(self.experiment.strip()),
            "tracking.experiment",
            self.experiment,
            "must not be empty",
        )


@dataclasses.dataclass(frozen=True)
class RegistryConfig:
    """MLflow model registry (`nppnet register`, `nppnet promote`).

    Attributes:
        model_name: registered model the versions go to.
        candidate_alias: alias set on every newly registered version.
        champion_alias: alias of the version that serves; `nppnet promote`
            moves it.
        miou_margin: a candidate replaces the champion only if its val mIoU
            exceeds the champion's by more than this many points (percent).
        pckh_margin: the same for val PCKh@0.5, in points (percent).
    """

    model_name: str = "nppnet-lip"
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    miou_margin: float = 0.0
    pckh_margin: float = 0.0

    def __post_init__(self):
        _check(
            bool(self.model_name.strip())
            and self.model_name == self.model_name.strip()
            and not any(c in self.model_name for c in "/:'\"`"),
            "registry.model_name",
            self.model_name,
            "must be non-empty, without surrounding spaces, '/', ':' or quotes",
        )
        for name in ("candidate_alias", "champion_alias"):
            alias = getattr(self, name)
            _check(
                bool(re.fullmatch(r"[A-Za-z0-9_\-]{1,255}", alias))
                and alias.lower() != "latest"
                and not re.fullmatch(r"[vV]\d+", alias),
                f"registry.{name}",
                alias,
                "must be letters, digits, '_' or '-', and not 'latest' or "
                "a version name such as 'v3'",
            )
        _check(
            self.champion_alias != self.candidate_alias,
            "registry.champion_alias",
            self.champion_alias,
            "must differ from registry.candidate_alias",
        )
        for name in ("miou_margin", "pckh_margin"):
            margin = getattr(self, name)
            _check(
                0 <= margin < 100,
                f"registry.{name}",
                margin,
                "must be in [0, 100) points",
            )


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """TF Serving export (`nppnet export`; docs/serving.md).

    Attributes:
        base_dir: the export base directory (`models.config`,
            `<model_name>/<version>/`); None uses `<run.work_dir>/export`.
        model_name: served model name: the subdirectory holding the
            versions, the name in `models.config` and in request URLs.
        flip: flip test inside the `serving_default` signature (as the
            evaluation protocol; doubles the network's cost per image).
    """

    base_dir: str | None = None
    model_name: str = "nppnet"
    flip: bool = True

    def __post_init__(self):
        _check(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", self.model_name)
            is not None,
            "export.model_name",
            self.model_name,
            "must be letters, digits, '_', '.' or '-', starting with a "
            "letter or digit (it is a directory and a URL segment)",
        )
        _check(
            self.base_dir is None or bool(self.base_dir.strip()),
            "export.base_dir",
            self.base_dir,
            "must be a directory or null",
        )


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Bilevel architecture search (reference 5; docs/search.md).

    Defaults are the authors' (`search_lip_sync.py`, `core/function.py`).

    Attributes:
        init_channels: C of the supernets (32 in the authors' search).
        layers: cells per encoder, a multiple of 4.
        epochs: epochs of the interaction search.
        encoder_decoder_epochs: epochs of the encoder-decoder search (not
            released by the authors; their interaction schedule).
        warmup_epochs: leading epochs of weight-only training on the
            `search_weights` split, architecture frozen.
        entropy_start_epoch: the entropy regulariser is used in epochs
            (0-based) strictly greater than this.
        entropy_weight: weight of the entropy regulariser.
        arch_loss_scale: factor of the whole architecture loss
            (reference 4.3: `2 x (L + [epoch > 70] 2 entropy)`).
        batch_size: global batch (all replicas) of both search loaders.
        weight_lr: Adam learning rate of the network weights.
        lambda_lr: Adam learning rate of the four loss lambdas.
        lr_milestones: epochs at which both weight learning rates are
            multiplied by `lr_gamma` (MultiStep, per epoch).
        lr_gamma: the MultiStep factor.
        arch_lr: Adam learning rate of the architecture parameters.
        arch_beta_1: Adam beta_1 of the architecture optimiser.
        arch_beta_2: Adam beta_2 of the architecture optimiser.
        arch_weight_decay: coupled L2 on the architecture parameters (added
            to their gradient, as PyTorch's Adam `weight_decay`).
        adam_epsilon: epsilon of every Adam (PyTorch's 1e-8).
        order: `first` (the authors') or `second` (DARTS unrolled).
        unrolled_lr: xi, the virtual step size of the second-order
            gradient; None uses the current weight learning rate (DARTS).
        partial_channels: PC-DARTS K of the encoder-decoder supernet (the
            interaction supernet uses the authors' K = 2).
        threshold: Algorithm 1's cumulative weight when deriving
            interactions.
        max_edges: Algorithm 1's cap on edges per interaction target.
        val_examples: validate on the first this many `val` images (the
            authors: 5000); 0 uses them all.
        val_batch_size: global batch of the validation.
        checkpoint_every_steps: also checkpoint every this many steps
            (0: only at the end of each epoch).
        keep_checkpoints: checkpoints kept on disk.
        log_every_steps: per-step metrics go to the loggers every this many
            steps (and at the last step of an epoch).
        seed: seed of the model initialisation and of the data order and
            augmentation.
        deterministic: op determinism and a fixed tf.data order (slower);
            needed for a resumed search to match an uninterrupted one bit
            for bit.
        jit_compile: compile the steps with XLA.
        shared_gradients: the weight and the (first-order) architecture
            step are one traced function: one forward and backward pass
            giving every gradient, then a `tf.cond` applying the weight or
            the architecture update. One graph to trace and optimise
            instead of two (the paper-size interaction supernet's first
            iteration 159 s instead of 213 s on 2 cores), at the price of
            the network's weight gradients in the architecture step too
            (iterations 26% longer) and a higher peak (10.0 instead of 7.6
            GiB); docs/benchmarks.md. Same updates as without, on any
            number of replicas. Off by default; on in the demo, whose
            searches are short.
        supernet: `module:function` of a model builder `(stage, config,
            base_genotype) -> built Keras model` searched instead of the
            NPPNet supernets (small test models, experiments); null: the
            NPPNet supernets.
    """

    init_channels: int = 32
    layers: int = 16
    epochs: int = 120
    encoder_decoder_epochs: int = 120
    warmup_epochs: int = 15
    entropy_start_epoch: int = 70
    entropy_weight: float = 2.0
    arch_loss_scale: float = 2.0
    batch_size: int = 28
    weight_lr: float = 1e-3
    lambda_lr: float = 1e-4
    lr_milestones: tuple[int, ...] = (70, 100)
    lr_gamma: float = 0.2
    arch_lr: float = 1e-3
    arch_beta_1: float = 0.5
    arch_beta_2: float = 0.999
    arch_weight_decay: float = 1e-3
    adam_epsilon: float = 1e-8
    order: Literal["first", "second"] = "first"
    unrolled_lr: float | None = None
    partial_channels: int = 4
    threshold: float = 0.7
    max_edges: int = 4
    val_examples: int = 5000
    val_batch_size: int = 56
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 3
    log_every_steps: int = 10
    seed: int = 0
    deterministic: bool = False
    jit_compile: bool = False
    shared_gradients: bool = False
    supernet: str | None = None

    def __post_init__(self):
        _check(
            self.init_channels >= 2 and self.init_channels % 2 == 0,
            "search.init_channels",
            self.init_channels,
            "must be a positive even number",
        )
        _check(
            self.layers >= 4 and self.layers % 4 == 0,
            "search.layers",
            self.layers,
            "must be a positive multiple of 4",
        )
        for name in ("epochs", "encoder_decoder_epochs"):
            value = getattr(self, name)
            _check(value >= 1, f"search.{name}", value, "must be >= 1")
        _check(
            self.warmup_epochs >= 0,
            "search.warmup_epochs",
            self.warmup_epochs,
            "must be >= 0",
        )
        _check(
            self.entropy_start_epoch >= -1,
            "search.entropy_start_epoch",
            self.entropy_start_epoch,
            "must be >= -1 (-1: from the first epoch)",
        )
        for name in ("entropy_weight", "arch_weight_decay"):
            value = getattr(self, name)
            _check(value >= 0, f"search.{name}", value, "must be >= 0")
        for name in (
            "arch_loss_scale",
            "weight_lr",
            "lambda_lr",
            "arch_lr",
            "adam_epsilon",
        ):
            value = getattr(self, name)
            _check(value > 0, f"search.{name}", value, "must be > 0")
        _check(
            self.batch_size >= 1,
            "search.batch_size",
            self.batch_size,
            "must be >= 1",
        )
        _check(
            list(self.lr_milestones) == sorted(set(self.lr_milestones))
            and all(m >= 1 for m in self.lr_milestones),
            "search.lr_milestones",
            self.lr_milestones,
            "must be increasing epochs >= 1",
        )
        _check(
            0 < self.lr_gamma <= 1,
            "search.lr_gamma",
            self.lr_gamma,
            "must be in (0, 1]",
        )
        for name in ("arch_beta_1", "arch_beta_2"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"search.{name}", value, "must be in [0, 1)")
        _check(
            self.unrolled_lr is None or self.unrolled_lr > 0,
            "search.unrolled_lr",
            self.unrolled_lr,
            "must be > 0 or null (the weight learning rate)",
        )
        _check(
            self.partial_channels >= 1,
            "search.partial_channels",
            self.partial_channels,
            "must be >= 1",
        )
        _check(
            0 < self.threshold <= 1,
            "search.threshold",
            self.threshold,
            "must be in (0, 1]",
        )
        _check(
            self.max_edges >= 1,
            "search.max_edges",
            self.max_edges,
            "must be >= 1",
        )
        _check(
            self.val_examples >= 0,
            "search.val_examples",
            self.val_examples,
            "must be >= 0 (0: the whole val split)",
        )
        _check(
            self.val_batch_size >= 1,
            "search.val_batch_size",
            self.val_batch_size,
            "must be >= 1",
        )
        _check(
            self.checkpoint_every_steps >= 0,
            "search.checkpoint_every_steps",
            self.checkpoint_every_steps,
            "must be >= 0 (0: at the end of each epoch only)",
        )
        _check(
            self.keep_checkpoints >= 1,
            "search.keep_checkpoints",
            self.keep_checkpoints,
            "must be >= 1",
        )
        _check(
            self.log_every_steps >= 1,
            "search.log_every_steps",
            self.log_every_steps,
            "must be >= 1",
        )
        _check(self.seed >= 0, "search.seed", self.seed, "must be >= 0")
        _check(
            self.supernet is None
            or (
                self.supernet.count(":") == 1
                and all(part.strip() for part in self.supernet.split(":"))
            ),
            "search.supernet",
            self.supernet,
            "must be module:function or null",
        )

    def epochs_of(self, stage: str) -> int:
        """Epochs of a search stage (`encoder-decoder` or `interaction`).

        Raises:
            ValueError: an unknown stage.
        """
        if stage == "encoder-decoder":
            return self.encoder_decoder_epochs
        if stage == "interaction":
            return self.epochs
        raise ValueError(
            f"unknown search stage {stage!r} (encoder-decoder or interaction)"
        )


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
    """Devices and strategy of training and search (docs/search.md).

    Attributes:
        devices: None: every local GPU, else the CPU; an int: that many
            local devices (GPUs if there are enough, else that many logical
            CPU devices split from the host CPU); a list: those device
            names (e.g. `["/gpu:0", "/gpu:1"]`).
        sync_batchnorm: synchronise BatchNorm batch statistics over all
            replicas (the authors' SyncBatchNorm).
        multi_worker: None: MultiWorkerMirroredStrategy when `TF_CONFIG`
            describes a cluster of several workers, else MirroredStrategy;
            true or false forces the choice.
        graph_optimizations: run TensorFlow's graph optimiser (Grappler)
            on traced functions. Off, the first call of a step of a big
            traced graph (a supernet) starts minutes sooner on a CPU, but
            every later step is slower and the peak memory higher (tiny
            search supernet: first iteration 0.74x, later iterations 1.28x,
            peak 1.42x; docs/benchmarks.md): worth it for a short run such
            as the demo, not for the paper's.
    """

    devices: int | tuple[str, ...] | None = None
    sync_batchnorm: bool = True
    multi_worker: bool | None = None
    graph_optimizations: bool = True

    def __post_init__(self):
        if isinstance(self.devices, int):
            _check(
                self.devices >= 1,
                "distribute.devices",
                self.devices,
                "must be >= 1, a list of device names or null",
            )
        elif self.devices is not None:
            _check(
                len(self.devices) >= 1
                and all(str(d).strip() for d in self.devices),
                "distribute.devices",
                self.devices,
                "must be a non-empty list of device names",
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Final training of the derived network (reference 6; docs/training.md).

    Defaults are the authors' (`augment_lip_sync.py`).

    Attributes:
        genotype: genotype JSON of the trained network (`--genotype`
            overrides it); the authors' by default.
        init_channels: C of the network (64 in the paper).
        layers: cells per encoder, a multiple of 4.
        epochs: training epochs.
        batch_size: global batch (all replicas); the last incomplete batch
            of every epoch is dropped (the authors').
        learning_rate: Adam learning rate of every network weight outside
            the stems and encoders.
        encoder_lr_multiplier: factor of `learning_rate` for the two stems
            and the two encoders (the authors' 0.2 for their pretrained
            part).
        lambda_lr: Adam learning rate of the four loss lambdas.
        lr_milestones: epochs at which every learning rate is multiplied by
            `lr_gamma` (MultiStep, per epoch).
        lr_gamma: the MultiStep factor.
        adam_epsilon: epsilon of every Adam (PyTorch's 1e-8).
        eval_every_epochs: validation (crop protocol, flip test) after
            every this many epochs, and always after the last one.
        val_examples: validate on the first this many val images (the
            authors' 5000; 0: the whole split).
        val_batch_size: global batch of the validation and of the final
            evaluation.
        final_protocol: protocol of the final evaluation of the best model
            (`official`: original resolution, every val image; `crop`).
        final_scales: test scales of the final evaluation.
        final_flip: flip test in the final evaluation.
        overlays: overlay images written with the final report.
        final_baseline: the final evaluation also scores the untrained
            network (same genotype, size and seed, initial weights) by the
            same protocol, for comparison (`baseline` in the report).
        init_weights: a `.keras` model or a training checkpoint whose stem
            and encoder variables initialise the network where names and
            shapes match (reference 2.12); null: train from scratch.
        mixed_precision: Keras dtype policy of the network: `float32`,
            `mixed_float16` (dynamic loss scaling) or `mixed_bfloat16`.
        jit_compile: compile the train step with XLA (the whole step on
            one replica; each replica's forward and backward pass on
            several GPUs; not supported on several CPU replicas).
        checkpoint_every_steps: checkpoint every this many steps (0: at the
            end of each epoch only).
        keep_checkpoints: checkpoints kept on disk.
        log_every_steps: per-step metrics go to the loggers every this many
            steps (and at the last step of an epoch).
        seed: seed of the model initialisation and of the data order and
            augmentation.
        deterministic: op determinism and a fixed tf.data order (slower);
            needed for a resumed training to match an uninterrupted one bit
            for bit.
        network: `module:function` of a model builder `(config, genotype)
            -> built Keras model` trained instead of NPPNet (small test
            models, experiments); null: NPPNet.
    """

    genotype: str = "configs/genotypes/nppnet_lip.json"
    init_channels: int = 64
    layers: int = 16
    epochs: int = 190
    batch_size: int = 64
    learning_rate: float = 1.5e-3
    encoder_lr_multiplier: float = 0.2
    lambda_lr: float = 1e-4
    lr_milestones: tuple[int, ...] = (150, 170)
    lr_gamma: float = 0.2
    adam_epsilon: float = 1e-8
    eval_every_epochs: int = 1
    val_examples: int = 5000
    val_batch_size: int = 64
    final_protocol: Literal["official", "crop"] = "official"
    final_scales: tuple[float, ...] = (1.0,)
    final_flip: bool = True
    overlays: int = 8
    final_baseline: bool = False
    init_weights: str | None = None
    mixed_precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = (
        "float32"
    )
    jit_compile: bool = False
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 3
    log_every_steps: int = 10
    seed: int = 0
    deterministic: bool = False
    network: str | None = None

    def __post_init__(self):
        _check(
            bool(self.genotype.strip()),
            "train.genotype",
            self.genotype,
            "must be a genotype JSON path",
        )
        _check(
            self.init_channels >= 2 and self.init_channels % 2 == 0,
            "train.init_channels",
            self.init_channels,
            "must be a positive even number",
        )
        _check(
            self.layers >= 4 and self.layers % 4 == 0,
            "train.layers",
            self.layers,
            "must be a positive multiple of 4",
        )
        for name in (
            "epochs",
            "batch_size",
            "eval_every_epochs",
            "val_batch_size",
            "keep_checkpoints",
            "log_every_steps",
        ):
            value = getattr(self, name)
            _check(value >= 1, f"train.{name}", value, "must be >= 1")
        for name in (
            "learning_rate",
            "encoder_lr_multiplier",
            "lambda_lr",
            "adam_epsilon",
        ):
            value = getattr(self, name)
            _check(value > 0, f"train.{name}", value, "must be > 0")
        _check(
            list(self.lr_milestones) == sorted(set(self.lr_milestones))
            and all(m >= 1 for m in self.lr_milestones),
            "train.lr_milestones",
            self.lr_milestones,
            "must be increasing epochs >= 1",
        )
        _check(
            0 < self.lr_gamma <= 1,
            "train.lr_gamma",
            self.lr_gamma,
            "must be in (0, 1]",
        )
        _check(
            self.val_examples >= 0,
            "train.val_examples",
            self.val_examples,
            "must be >= 0 (0: the whole val split)",
        )
        _check(
            len(self.final_scales) >= 1
            and all(scale > 0 for scale in self.final_scales),
            "train.final_scales",
            self.final_scales,
            "must be a non-empty list of positive scales",
        )
        _check(
            self.overlays >= 0, "train.overlays", self.overlays, "must be >= 0"
        )
        _check(
            self.init_weights is None or bool(self.init_weights.strip()),
            "train.init_weights",
            self.init_weights,
            "must be a path or null",
        )
        _check(
            self.checkpoint_every_steps >= 0,
            "train.checkpoint_every_steps",
            self.checkpoint_every_steps,
            "must be >= 0 (0: at the end of each epoch only)",
        )
        _check(self.seed >= 0, "train.seed", self.seed, "must be >= 0")
        _check(
            self.network is None
            or (
                self.network.count(":") == 1
                and all(part.strip() for part in self.network.split(":"))
            ),
            "train.network",
            self.network,
            "must be module:function or null",
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One whole run, as one YAML file describes it."""

    run: RunSection = RunSection()
    synth: SynthConfig = SynthConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    beam: BeamConfig = BeamConfig()
    validate: ValidateConfig = ValidateConfig()
    loss: LossConfig = LossConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    export: ExportConfig = ExportConfig()
    search: SearchConfig = SearchConfig()
    distribute: DistributeConfig = DistributeConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
            }
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def section_hash(config: Any) -> str:
    """Stable short hash of a config (section) for manifests and caching."""
    import hashlib
    import json

    text = json.dumps(to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _float_text(value: str, key: str) -> float | str:
    """`value` as a float when it is a number in exponent notation."""
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; returns the typed value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{key} = {value!r}: expected a mapping of {tp.__name__} keys"
            )
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{key} = {value!r}: expected one of {list(args)}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(
                _coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)
            )
        if len(value) != len(args):
            raise ConfigError(
                f"{key} = {value!r}: expected a list of {len(args)} values"
            )
        return tuple(
            _coerce(v, a, f"{key}[{i}]")
            for i, (v, a) in enumerate(zip(value, args))
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-3 and 1e30, without a dot, as text.
            value = _float_text(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (known keys of "
            f"{prefix or 'the top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}: {err}") from err


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {override!r}: value is not YAML ({err})"
        ) from err
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(
    tree: Mapping[str, Any], source: str = "<dict>", cls: type = RunConfig
) -> Any:
    """Builds a config dataclass from a nested mapping, naming `source` in errors."""
    try:
        return _build(cls, tree, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(
    path: str | Path, overrides: Sequence[str] = (), cls: type = RunConfig
) -> Any:
    """YAML -> RunConfig. Unknown keys, wrong types and out-of-range values
    fail here, naming the key, the value and the file; each override
    `section.key=value` (value parsed as YAML) replaces one key.

    Raises:
        ConfigError: on any bad key or value, or a file that is not YAML.
        FileNotFoundError: if `path` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level, got {tree!r}"
        )
    source = str(path)
    for override in overrides:
        try:
            _apply_override(tree, override)
        except ConfigError as err:
            raise ConfigError(f"{path} (--set): {err}") from None
    if overrides:
        source = f"{path} with --set {' '.join(overrides)}"
    return config_from_dict(tree, source, cls)
