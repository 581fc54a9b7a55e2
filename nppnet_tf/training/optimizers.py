"""`TorchAdam`: Adam with PyTorch's update rule and coupled weight decay.

The authors train with `torch.optim.Adam` (reference 0.7, 5.4, 6.1). Keras'
`Adam` differs in two ways that matter for architecture parameters, whose
gradients are small:

* epsilon: PyTorch divides by `sqrt(v_hat) + eps` with the bias-corrected
  `v_hat = v / (1 - beta_2^t)`; Keras by `sqrt(v) + eps` with the raw `v`,
  which is an effective epsilon `eps / sqrt(1 - beta_2^t)` (31x larger at
  the first step with beta_2 = 0.999);
* weight decay: PyTorch's Adam `weight_decay` is coupled L2, added to the
  gradient before the moments (`g + wd * w`); Keras' `weight_decay` is the
  decoupled AdamW decay.

`TorchAdam` is PyTorch's rule. Each variable is updated by one fused
`ResourceApplyAdam` kernel (with epsilon `eps * sqrt(1 - beta_2^t)`, which
makes its formula PyTorch's exactly), so a supernet with thousands of
variables traces a small update graph. Under a `tf.distribute` strategy
the update runs once per device on the all-reduced gradient, so the
coupled decay is added once, whatever the number of replicas.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="nppnet")
class TorchAdam(keras.optimizers.Adam):
    """Adam as `torch.optim.Adam` computes it (reference 0.7).

    `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
    `w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)` with
    `g = gradient + coupled_weight_decay * w`.

    Args:
        learning_rate: float or schedule. The step size.
        beta_1: float. First-moment decay.
        beta_2: float. Second-moment decay.
        epsilon: float. Added to the bias-corrected root of `v` (PyTorch's
            1e-8 by default).
        coupled_weight_decay: float. L2 coefficient added to the gradient
            (PyTorch's `weight_decay`); 0 for none.
        name: str. Optimiser name (also the prefix of its variables).
        **kwargs: other `keras.optimizers.Optimizer` arguments (no
            `weight_decay`, no `amsgrad`).

    Raises:
        ValueError: a negative `coupled_weight_decay`, or `amsgrad` or a
            decoupled `weight_decay` given.
    """

    def __init__(
        self,
        learning_rate=1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        coupled_weight_decay: float = 0.0,
        name: str = "torch_adam",
        **kwargs,
    ):
        if kwargs.get("amsgrad"):
            raise ValueError("TorchAdam does not implement amsgrad.")
        if kwargs.get("weight_decay"):
            raise ValueError(
                "TorchAdam takes coupled_weight_decay (PyTorch's L2), not the "
                f"decoupled weight_decay={kwargs['weight_decay']!r}."
            )
        if coupled_weight_decay < 0:
            raise ValueError(
                f"coupled_weight_decay must be >= 0, got {coupled_weight_decay}."
            )
        kwargs.pop("amsgrad", None)
        kwargs.pop("weight_decay", None)
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            name=name,
            **kwargs,
        )
        self.coupled_weight_decay = float(coupled_weight_decay)

    def _coefficients(self, learning_rate) -> dict[str, tf.Tensor]:
        """The per-step scalars shared by every variable's update."""
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1 = tf.constant(self.beta_1, tf.float32)
        beta_2 = tf.constant(self.beta_2, tf.float32)
        beta_2_power = tf.pow(beta_2, step)
        return {
            "lr": tf.cast(learning_rate, tf.float32),
            "beta1": beta_1,
            "beta2": beta_2,
            "beta1_power": tf.pow(beta_1, step),
            "beta2_power": beta_2_power,
            # ResourceApplyAdam divides by sqrt(v) + epsilon; this epsilon
            # turns that into PyTorch's sqrt(v / (1 - b2^t)) + eps.
            "epsilon": self.epsilon * tf.sqrt(1.0 - beta_2_power),
        }

    def _apply(self, variable, gradient, coefficients) -> tf.Operation:
        index = self._get_variable_index(variable)
        momentum = self._momentums[index].value
        velocity = self._velocities[index].value
        gradient = tf.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            gradient = (
                gradient
                + self.coupled_weight_decay * tf.convert_to_tensor(variable)
            )
        cast = {k: tf.cast(v, variable.dtype) for k, v in coefficients.items()}
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=momentum.handle,
            v=velocity.handle,
            grad=gradient,
            use_locking=False,
            **cast,
        )

    def update_step(self, gradient, variable, learning_rate):
        if isinstance(variable, keras.Variable):
            variable = variable.value
        self._apply(variable, gradient, self._coefficients(learning_rate))

    def _distributed_tf_update_step(
        self, distribution, grads_and_vars, learning_rate
    ):
        # The scalars once per step (not per variable): a smaller graph.
        coefficients = self._coefficients(learning_rate)
        for gradient, variable in grads_and_vars:
            distribution.extended.update(
                variable,
                self._apply,
                args=(gradient, coefficients),
                group=False,
            )

    def get_config(self):
        config = super().get_config()
        config.pop("amsgrad", None)
        config.pop("weight_decay", None)
        config["coupled_weight_decay"] = self.coupled_weight_decay
        return config
