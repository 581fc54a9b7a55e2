"""A toy two-branch network for fast tests of the training step and loop.

Tracing the real NPPNet's forward and backward pass takes more than a
minute on two CPU cores even at C = 8 and 4 cells, too slow for the
default suite. The toy has what the training needs of NPPNet: the stems
and encoders by their names (`pose_stem`, `parsing_stem`, `pose_encoder`,
`parsing_encoder`, lists of layers held as in NPPNet), a (synchronised)
BatchNorm, the eight output maps at 1/4 resolution, `.keras` save/load,
and a graph of a few dozen ops:

    pose    = encoder(stem(images)),  parsing = encoder(stem(images))
    stage 1 = 1x1 heads on each branch
    stage 2 = 1x1 heads on relu(1x1 conv(concat(pose, parsing)))

`toy_network(config, genotype)` is the `train.network` builder.
"""

from __future__ import annotations

import keras

HEADS = (("pose", 16), ("pose_aux", 16), ("parsing", 20), ("edge", 2))


@keras.saving.register_keras_serializable(package="nppnet_tests")
class ToyNetwork(keras.Model):
    """See the module docstring.

    Args:
        channels: feature width.
        sync_batchnorm: synchronise the encoders' BatchNorm over replicas.
    """

    def __init__(
        self, channels: int = 8, sync_batchnorm: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        self.channels = channels
        self.sync_batchnorm = sync_batchnorm
        self.pose_stem = keras.layers.Conv2D(
            channels, 3, strides=2, padding="same", name="pose_stem"
        )
        self.parsing_stem = keras.layers.Conv2D(
            channels, 3, strides=2, padding="same", name="parsing_stem"
        )
        self.pose_encoder, self.parsing_encoder = [], []
        for branch in ("pose", "parsing"):
            cells = getattr(self, f"{branch}_encoder")
            cells.append(
                keras.layers.Conv2D(
                    channels,
                    3,
                    strides=2,
                    padding="same",
                    # No bias before a BatchNorm: its gradient is rounding
                    # noise, which Adam would turn into +-lr steps.
                    use_bias=False,
                    name=f"{branch}_encoder_0",
                )
            )
            cells.append(
                keras.layers.BatchNormalization(
                    momentum=0.9,
                    epsilon=1e-5,
                    synchronized=sync_batchnorm,
                    name=f"{branch}_encoder_1",
                )
            )
        self.mix = keras.layers.Conv2D(channels, 1, name="mix")
        self.heads = [
            keras.layers.Conv2D(width, 1, name=f"{name}_head_{stage}")
            for stage in (1, 2)
            for name, width in HEADS
        ]

    def build(self, input_shape):
        batch = input_shape[0]
        for stem in (self.pose_stem, self.parsing_stem):
            stem.build(input_shape)
        features = (batch, None, None, self.channels)
        for cells in (self.pose_encoder, self.parsing_encoder):
            cells[0].build(features)
            cells[1].build(features)
        self.mix.build((batch, None, None, 2 * self.channels))
        for head in self.heads:
            head.build(features)
        self.built = True

    def _encode(self, stem, cells, images, training):
        features = keras.ops.relu(stem(images))
        features = cells[1](cells[0](features), training=training)
        return keras.ops.relu(features)

    def call(self, images, training=None):
        pose = self._encode(self.pose_stem, self.pose_encoder, images, training)
        parsing = self._encode(
            self.parsing_stem, self.parsing_encoder, images, training
        )
        mixed = keras.ops.relu(
            self.mix(keras.ops.concatenate([pose, parsing], axis=-1))
        )
        outputs = {}
        inputs = {"pose": pose, "pose_aux": pose, "parsing": parsing}
        inputs["edge"] = parsing
        for index, (name, _) in enumerate(HEADS):
            outputs[f"{name}_stage1"] = self.heads[index](inputs[name])
            outputs[name] = self.heads[len(HEADS) + index](mixed)
        return outputs

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "sync_batchnorm": self.sync_batchnorm,
        }


def toy_network(config, genotype) -> ToyNetwork:
    """The `train.network` builder: a built `ToyNetwork` (the genotype is
    ignored; the width is `train.init_channels`)."""
    del genotype
    model = ToyNetwork(
        channels=config.train.init_channels,
        sync_batchnorm=config.distribute.sync_batchnorm,
    )
    size = config.data.image_size
    model.build((None, size, size, 3))
    return model
