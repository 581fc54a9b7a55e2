"""The distributed train step of the final training (reference 6.1).

`TrainStep` owns the three Adam optimisers of the authors' parameter groups
and the traced step:

* the two stems and the two encoders (`ENCODER_PARTS`) at
  `learning_rate * encoder_lr_multiplier` (the authors' `stem*`,
  `cells1.*`, `cells2.*` at 0.2 x 1.5e-3);
* every other network weight at `learning_rate`;
* the four loss lambdas at `lambda_lr`;

all `TorchAdam` (PyTorch's rule) without weight decay. One step: the model
and `NPPNetLoss` run in replica context (`strategy.run`); the loss values
are replica contributions summing to the global-batch loss, so the summed
gradients the optimisers all-reduce are the global gradient whatever the
number of replicas.

Mixed precision. The model is built under a Keras dtype policy
(`mixed_float16` or `mixed_bfloat16`: float32 variables, half-precision
compute); its outputs are cast to float32 before the loss, and the
gradients are float32. With `mixed_float16` the loss is multiplied by a
dynamic loss scale before the backward pass and the gradients divided by
it (`DynamicLossScale`, the rule of `keras.optimizers.LossScaleOptimizer`:
halve the scale and skip the update when a gradient is not finite, double
it after 2000 finite steps). One scale serves the three optimisers: a
`LossScaleOptimizer` per optimiser would scale the one loss three times.

XLA (`jit_compile`). With one replica the whole step (forward, loss,
backward, loss scaling, optimiser updates) is one XLA-compiled function.
With several GPU replicas the forward, loss and backward pass of each
replica are compiled (TensorFlow then all-reduces inside XLA, without
`merge_call`) and the updates run outside. Several replicas on CPU devices
are refused (`xla_mode`): there every `ReplicaContext.all_reduce` (the
loss's global sums and counts, `losses._global_sum`; synchronised
BatchNorm) needs a `merge_call`, which TensorFlow does not allow inside a
nested compiled function, and one compiled function cannot reach the
variables of another device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from nppnet_tf.config import TrainConfig
from nppnet_tf.training.optimizers import TorchAdam

log = logging.getLogger(__name__)

# The network parts trained at the reduced rate and initialised from
# `train.init_weights`: the authors' `stem0-5`, `cells1`, `cells2`.
ENCODER_PARTS = ("pose_stem", "parsing_stem", "pose_encoder", "parsing_encoder")
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras' global dtype policy set to `name` inside the block (layers
    take the policy when they are created)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def encoder_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of the stems and encoders of a two-branch network.

    Args:
        model: a model with the attributes named in `ENCODER_PARTS` (a
            layer or a list of layers each), e.g. `NPPNet`.

    Returns:
        The layers, in `ENCODER_PARTS` order.

    Raises:
        ValueError: the model lacks one of the attributes.
    """
    layers = []
    for name in ENCODER_PARTS:
        part = getattr(model, name, None)
        if part is None:
            raise ValueError(
                f"{type(model).__name__} has no `{name}`: the final training "
                f"needs the stems and encoders {ENCODER_PARTS} for its "
                "reduced-rate parameter group and the initial weights"
            )
        layers.extend(part if isinstance(part, (list, tuple)) else [part])
    return layers


def encoder_variables(
    model: keras.Model, trainable_only: bool = True
) -> list[keras.Variable]:
    """Variables of the stems and encoders (see `encoder_layers`)."""
    found, seen = [], set()
    for layer in encoder_layers(model):
        variables = (
            layer.trainable_variables if trainable_only else layer.variables
        )
        for variable in variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


def parameter_groups(
    model: keras.Model,
) -> tuple[list[keras.Variable], list[keras.Variable]]:
    """`(stems and encoders, everything else)`: the trainable variables of
    the two network groups, each in `model.trainable_variables` order."""
    encoder = {id(v) for v in encoder_variables(model)}
    variables = model.trainable_variables
    return (
        [v for v in variables if id(v) in encoder],
        [v for v in variables if id(v) not in encoder],
    )


class DynamicLossScale(tf.Module):
    """A dynamic loss scale for float16 training, checkpointed with the loop.

    The rule of `keras.optimizers.LossScaleOptimizer`: start at
    `initial_scale`; after a step whose gradients are not all finite,
    halve it (not below 1) and skip the update; after `growth_steps`
    finite steps in a row, double it.

    Create it inside the strategy scope; `update` runs in cross-replica
    context.

    Args:
        initial_scale: float. The first scale.
        growth_steps: int. Finite steps before the scale doubles.
    """

    def __init__(
        self, initial_scale: float = 2.0**15, growth_steps: int = 2000
    ):
        super().__init__(name="loss_scale")
        if initial_scale < 1 or growth_steps < 1:
            raise ValueError(
                "initial_scale must be >= 1 and growth_steps >= 1, got "
                f"{initial_scale} and {growth_steps}"
            )
        self.growth_steps = int(growth_steps)
        self.scale = tf.Variable(
            float(initial_scale),
            dtype=tf.float32,
            trainable=False,
            name="scale",
        )
        self.finite_steps = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="finite_steps"
        )
        self.skipped_steps = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="skipped_steps"
        )

    def update(self, finite: tf.Tensor) -> None:
        """Adapts the scale after a step (`finite`: bool scalar)."""
        grow = finite & (self.finite_steps + 1 >= self.growth_steps)
        new_scale = tf.where(
            finite,
            tf.where(grow, self.scale * 2.0, self.scale),
            tf.maximum(self.scale * 0.5, 1.0),
        )
        self.scale.assign(new_scale)
        self.finite_steps.assign(
            tf.where(
                grow | ~finite, tf.constant(0, tf.int64), self.finite_steps + 1
            )
        )
        self.skipped_steps.assign_add(tf.cast(~finite, tf.int64))


def xla_mode(strategy: tf.distribute.Strategy, jit_compile: bool) -> str:
    """How `TrainStep` compiles with XLA: `off`, `step` or `replica`.

    Raises:
        ValueError: XLA with several replicas that are not all GPUs (see
            the module docstring).
    """
    if not jit_compile:
        return "off"
    if strategy.num_replicas_in_sync == 1:
        return "step"
    devices = list(getattr(strategy.extended, "worker_devices", ()))
    if devices and all(
        tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices
    ):
        return "replica"
    raise ValueError(
        f"train.jit_compile with {strategy.num_replicas_in_sync} replicas on "
        f"{', '.join(devices) or 'non-GPU devices'}: not supported. XLA "
        "cannot compile the cross-replica sums of the loss "
        "(ReplicaContext.all_reduce in losses._global_sum) and of the "
        "synchronised BatchNorm on CPU devices (they need a merge_call, "
        "refused inside a compiled function), and one compiled step cannot "
        "use variables on several devices. Use one replica "
        "(distribute.devices: 1) or jit_compile: false."
    )


def _keep_gradients(gradients, variables):
    """(gradients, variables) without the variables that got no gradient."""
    pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
    return [g for g, _ in pairs], [v for _, v in pairs]


class TrainStep:
    """Optimisers and the distributed train step of the final training.

    Build the model (every variable created) and the loss inside
    `strategy.scope()` first; the optimisers (and the loss scale) are
    created and built on their variables here, inside the same scope,
    before any step runs.

    Args:
        model: a built two-branch network (`NPPNet`) returning the eight
            output maps.
        loss: `NPPNetLoss`-like: `loss(targets, outputs) -> (total,
            components)` with replica-sum semantics.
        config: `TrainConfig` (learning rates, Adam epsilon, mixed
            precision, XLA).
        strategy: the `tf.distribute` strategy; None uses the current one.
        lambda_variables: the loss weights' variables; default
            `loss.uncertainty.trainable_variables`.

    Raises:
        ValueError: an unbuilt model, one without stems and encoders, or
            XLA with several CPU replicas (`xla_mode`).
    """

    def __init__(
        self,
        model: keras.Model,
        loss: Any,
        config: TrainConfig,
        strategy: tf.distribute.Strategy | None = None,
        lambda_variables: Sequence[tf.Variable] | None = None,
    ):
        if not getattr(model, "built", False):
            raise ValueError(
                "build the network (model.build(input_shape)) inside the "
                "strategy scope before creating TrainStep"
            )
        self.model = model
        self.loss = loss
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.encoder_variables, self.network_variables = parameter_groups(model)
        if lambda_variables is None:
            lambda_variables = loss.uncertainty.trainable_variables
        self.lambda_variables = list(lambda_variables)
        self.variables = (
            self.encoder_variables
            + self.network_variables
            + self.lambda_variables
        )
        rate = config.learning_rate
        with self.strategy.scope():
            self.encoder_optimizer = TorchAdam(
                rate * config.encoder_lr_multiplier,
                epsilon=config.adam_epsilon,
                name="encoder_adam",
            )
            self.network_optimizer = TorchAdam(
                rate, epsilon=config.adam_epsilon, name="network_adam"
            )
            self.lambda_optimizer = TorchAdam(
                config.lambda_lr,
                epsilon=config.adam_epsilon,
                name="lambda_adam",
            )
            # Built here, inside the scope, on exactly the variables each
            # one updates: slots created lazily inside a replica function
            # fail under MirroredStrategy.
            for optimizer, variables in self._groups():
                optimizer.build(variables)
            self.loss_scale = (
                DynamicLossScale()
                if config.mixed_precision == "mixed_float16"
                else None
            )
        self.xla = xla_mode(self.strategy, config.jit_compile)
        self._step_function = None
        self._gradient_function = None
        self._batch_spec = None
        self._gradient_mask: list[bool] = []

    def _groups(self) -> list[tuple[keras.optimizers.Optimizer, list]]:
        return [
            (self.encoder_optimizer, self.encoder_variables),
            (self.network_optimizer, self.network_variables),
            (self.lambda_optimizer, self.lambda_variables),
        ]

    @property
    def optimizers(self) -> dict[str, keras.optimizers.Optimizer]:
        """The three optimisers by role (for checkpoints)."""
        return {
            "encoder_optimizer": self.encoder_optimizer,
            "network_optimizer": self.network_optimizer,
            "lambda_optimizer": self.lambda_optimizer,
        }

    def base_learning_rates(
        self,
    ) -> list[tuple[keras.optimizers.Optimizer, float]]:
        """`(optimizer, base rate)` of the per-epoch MultiStep schedule."""
        config = self.config
        return [
            (
                self.encoder_optimizer,
                config.learning_rate * config.encoder_lr_multiplier,
            ),
            (self.network_optimizer, config.learning_rate),
            (self.lambda_optimizer, config.lambda_lr),
        ]

    def set_batch_spec(self, element_spec) -> None:
        """Fixes the traced input signature to one (distributed) batch's
        `element_spec`, so that the step is traced once (call before the
        first step; optional)."""
        if self._step_function is not None:
            raise RuntimeError("set_batch_spec must be called before any step")
        self._batch_spec = element_spec

    def __call__(self, batch) -> dict[str, tf.Tensor]:
        """One train step on a (distributed) global batch.

        Args:
            batch: `(images, targets)` from the distributed dataset.

        Returns:
            `loss/<term>`: global values of every `NPPNetLoss` term
            (`loss/total` is the training loss); with `mixed_float16` also
            `loss_scale` (the scale after the step) and `finite` (1.0 if
            the update was applied, 0.0 if skipped).
        """
        if self._step_function is None:
            signature = None
            if self._batch_spec is not None:
                signature = [self._batch_spec]
            self._step_function = tf.function(
                self._step,
                input_signature=signature,
                reduce_retracing=signature is None,
                jit_compile=self.xla == "step",
            )
        return self._step_function(batch)

    # ------------------------------------------------------------ internals

    def _gradients(self, images, targets, scale):
        with tf.GradientTape() as tape:
            outputs = self.model(images, training=True)
            # The loss in float32 whatever the compute dtype.
            outputs = {k: tf.cast(v, tf.float32) for k, v in outputs.items()}
            total, components = self.loss(targets, outputs)
            objective = total if scale is None else total * scale
        gradients = tape.gradient(objective, self.variables)
        if scale is not None:
            gradients = [
                None if g is None else tf.cast(g, tf.float32) / scale
                for g in gradients
            ]
        return dict(components), gradients

    def _replica_gradients(self, images, targets, scale=None):
        if self._gradient_function is None:
            function = self._gradients
            if self.xla == "replica":
                function = tf.function(function, jit_compile=True)
            self._gradient_function = function
        terms, gradients = self._gradient_function(images, targets, scale)
        # Which variables have a gradient is fixed by the graph; recorded
        # while tracing, the same on every replica.
        self._gradient_mask = [g is not None for g in gradients]
        present = [g for g in gradients if g is not None]
        finite = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in present]
        )
        return terms, present, tf.cast(finite, tf.float32)

    def _replica_apply(self, present):
        gradients, position = [], 0
        for has_gradient in self._gradient_mask:
            if has_gradient:
                gradients.append(present[position])
                position += 1
            else:
                gradients.append(None)
        start = 0
        for optimizer, variables in self._groups():
            group = gradients[start : start + len(variables)]
            start += len(variables)
            kept, used = _keep_gradients(group, variables)
            if used:
                optimizer.apply(kept, used)

    def _step(self, batch):
        images, targets = batch
        strategy = self.strategy
        metrics = {}
        if self.loss_scale is None:
            terms, present, _ = strategy.run(
                self._replica_gradients, args=(images, targets)
            )
            strategy.run(self._replica_apply, args=(present,))
        else:
            scale = self.loss_scale.scale.read_value()
            terms, present, finite = strategy.run(
                self._replica_gradients, args=(images, targets, scale)
            )
            # Every replica must take the same decision: skip the update
            # when any replica's gradient is not finite.
            finite = (
                strategy.reduce(tf.distribute.ReduceOp.SUM, finite, axis=None)
                > strategy.num_replicas_in_sync - 0.5
            )

            def apply():
                strategy.run(self._replica_apply, args=(present,))
                return tf.constant(True)

            # The cond in cross-replica context: a replica-context cond
            # cannot hold the optimisers' merge_call.
            tf.cond(finite, apply, lambda: tf.constant(False))
            self.loss_scale.update(finite)
            metrics["loss_scale"] = self.loss_scale.scale.read_value()
            metrics["finite"] = tf.cast(finite, tf.float32)
        for key, value in terms.items():
            metrics[f"loss/{key}"] = strategy.reduce(
                tf.distribute.ReduceOp.SUM, value, axis=None
            )
        return metrics
