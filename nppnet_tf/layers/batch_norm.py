"""`BatchNorm`: batch normalisation with TF's fused kernel."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="nppnet")
class BatchNorm(keras.layers.Layer):
    """Batch normalisation over the channels with one fused TF op.

    Computes what `keras.layers.BatchNormalization` computes, but with
    `FusedBatchNormV3` (forward and gradient are one kernel each), which is
    `tf`, not `keras.ops`, because `keras.ops.batch_normalization` is a chain
    of element-wise ops: the fused kernel makes NPPNet's train step faster
    on CPU and its graph several thousand ops smaller. As PyTorch's
    `BatchNorm2d` (and unlike Keras'), the moving variance is updated with
    the unbiased batch variance: `moving = momentum * moving + (1 - momentum)
    * batch`. Not synchronised over replicas: `blocks.batch_norm` returns
    Keras' layer for synchronised BatchNorm.

    Args:
        momentum: float. Keras convention (PyTorch momentum 0.1 = 0.9).
        epsilon: float. Added to the variance (PyTorch's 1e-5).
        affine: bool. Learn a scale (gamma) and an offset (beta).

    Call arguments:
        inputs: `(batch, height, width, channels)` feature map.
        training: bool. Normalise with the batch statistics and update the
            moving ones; else normalise with the moving statistics.

    Returns:
        The normalised map, same shape and dtype.
    """

    def __init__(
        self,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        affine: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}.")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.affine = affine

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("BatchNorm needs a known channel count.")
        # autocast=False: the fused kernel takes float32 statistics and
        # scale/offset also for float16 inputs.
        if self.affine:
            self.gamma = self.add_weight(
                shape=(channels,),
                initializer="ones",
                name="gamma",
                autocast=False,
            )
            self.beta = self.add_weight(
                shape=(channels,),
                initializer="zeros",
                name="beta",
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=(channels,),
            initializer="zeros",
            trainable=False,
            name="moving_mean",
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=(channels,),
            initializer="ones",
            trainable=False,
            name="moving_variance",
            autocast=False,
        )

    def call(self, inputs, training=None):
        if self.affine:
            scale, offset = self.gamma, self.beta
        else:
            channels = self.moving_mean.shape[0]
            scale = tf.ones((channels,), tf.float32)
            offset = tf.zeros((channels,), tf.float32)
        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=scale,
            offset=offset,
            mean=self.moving_mean,
            variance=self.moving_variance,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0 - self.momentum if training else 1.0,
            data_format="NHWC",
            is_training=bool(training),
        )
        if training:
            # With exponential_avg_factor the op returns the updated moving
            # statistics (unbiased batch variance).
            self.moving_mean.assign(mean)
            self.moving_variance.assign(variance)
        return outputs

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "affine": self.affine,
        }


@keras.saving.register_keras_serializable(package="nppnet")
class SyncBatchNorm(keras.layers.BatchNormalization):
    """Keras' synchronised BatchNorm with PyTorch's moving variance.

    Normalises as `keras.layers.BatchNormalization(synchronized=True)`
    (batch statistics all-reduced over the replicas), but updates the moving
    variance with the unbiased variance of the global batch, as PyTorch's
    `SyncBatchNorm` and this project's fused `BatchNorm` do, so that one
    replica (fused) and several (synchronised) train the same statistics.

    Args:
        **kwargs: `keras.layers.BatchNormalization` arguments;
            `synchronized` defaults to True.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("synchronized", True)
        super().__init__(**kwargs)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None:
            return super().call(inputs, training=training, mask=mask)
        before = tf.identity(self.moving_variance.value)
        outputs = super().call(inputs, training=training)
        # Keras set `m * before + (1 - m) * v` with the biased batch
        # variance v; PyTorch uses v * n / (n - 1), n the global count.
        local = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
        context = tf.distribute.get_replica_context()
        replicas = 1 if context is None else context.num_replicas_in_sync
        count = local * float(replicas)
        updated = tf.convert_to_tensor(self.moving_variance.value)
        biased_share = updated - self.momentum * before  # (1 - m) * v
        self.moving_variance.assign(
            updated + biased_share / tf.maximum(count - 1.0, 1.0)
        )
        return outputs
