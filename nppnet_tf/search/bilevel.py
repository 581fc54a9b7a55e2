"""The steps of the bilevel architecture search (reference 5.3, 5.4, 3.5).

One search iteration, in the authors' order (`core/function.py`,
`train_with_alpha`): a weight step on a `search_weights` batch, then an
architecture step on a fresh `search_arch` batch with the just-updated
weights. Both run the supernet in training mode (BatchNorm uses batch
statistics and updates its running statistics in both, as the authors').

* Weight step: `L = L_pose + L_parsing` (the `NPPNetLoss` total); its
  gradient updates the network weights with one `TorchAdam` and the four
  loss lambdas with another (PyTorch's parameter groups; lr 1e-3 and 1e-4).
* Architecture step, first order: `scale * (L + w_e * E)` with
  `E = entropy_loss(...)` and `w_e` the entropy weight (0 until the
  entropy epoch); its gradient updates every `alphas` and `betas` with the
  architecture `TorchAdam` (betas 0.5, 0.999, coupled weight decay 1e-3).
* Architecture step, second order (DARTS, unrolled): with `xi` the virtual
  step size, `w' = w - xi * grad_w L_train(w, a)` on the weight batch;
  `g_a, g_w' = grad_{a, w'} objective(w', a)` on the architecture batch;
  `eps = 0.01 / ||g_w'||`; the Hessian-vector product
  `h = (grad_a L_train(w + eps g_w', a) - grad_a L_train(w - eps g_w', a))
  / (2 eps)`; the architecture gradient is `g_a - xi * h`; then `w` is
  restored. The lambdas stay fixed in the virtual step.

Distribution. The step functions run the model and loss in replica context
with `strategy.run`. `NPPNetLoss` values are replica contributions whose
sum over replicas is the global loss, so the gradients the optimisers
all-reduce (sum) are the global gradients; the entropy term, identical on
every replica, enters each replica's objective divided by the number of
replicas. The coupled weight decay is applied by `TorchAdam` after the
all-reduce, once. The second-order step does its weight backups,
perturbations and restores in cross-replica context on all-reduced
gradients, so every replica keeps identical weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from nppnet_tf.config import SearchConfig
from nppnet_tf.training.optimizers import TorchAdam

log = logging.getLogger(__name__)

# The authors' `loss_entropy` is `0.25 * 2 * sum / len(arch_parameters)`.
ENTROPY_FACTOR = 0.5
# DARTS' finite-difference radius: eps = 0.01 / ||grad_w' L_val||.
FINITE_DIFFERENCE_RADIUS = 0.01


def normalised_entropy(alphas) -> tf.Tensor:
    """Mean over rows of `H(softmax(row)) / ln(columns)` of one tensor.

    Args:
        alphas: `(rows, ops)` architecture parameters.

    Returns:
        Scalar float32 in [0, 1]: 1 for uniform rows, 0 for one-hot rows.
    """
    alphas = tf.convert_to_tensor(alphas, tf.float32)
    num_ops = alphas.shape[-1]
    if num_ops is None or num_ops < 2:
        return tf.zeros([], tf.float32)
    log_probabilities = tf.nn.log_softmax(alphas, axis=-1)
    entropy = -tf.reduce_sum(tf.exp(log_probabilities) * log_probabilities, -1)
    return tf.reduce_mean(entropy) / math.log(num_ops)


def entropy_loss(alphas: Sequence, num_tensors: int) -> tf.Tensor:
    """The search's entropy regulariser (reference 3.5, the authors' code).

    `0.5 * sum_t normalised_entropy(alphas_t) / num_tensors`, where the sum
    runs over the `alphas` tensors only (betas are not regularised) and
    `num_tensors` counts alphas and betas together (12 for both search
    stages): the authors' `0.25 * 2 * en_alphas / length`.

    Args:
        alphas: the `alphas` tensors of every search space.
        num_tensors: number of architecture tensors (alphas + betas).

    Returns:
        Scalar float32.

    Raises:
        ValueError: no alphas or `num_tensors` < 1.
    """
    if not alphas:
        raise ValueError("entropy_loss needs at least one alphas tensor.")
    if num_tensors < 1:
        raise ValueError(f"num_tensors must be >= 1, got {num_tensors}.")
    total = tf.add_n([normalised_entropy(a) for a in alphas])
    return ENTROPY_FACTOR * total / float(num_tensors)


def _step_metrics(terms: dict, step: str) -> dict[str, tf.Tensor]:
    """A shared step's terms as the metrics of the weight step (the loss
    terms, `objective` = `L`) or of the architecture step (the loss terms,
    `entropy`, `objective` = the architecture loss)."""
    metrics = {
        f"{step}/{key}": value
        for key, value in terms.items()
        if key not in ("entropy", "architecture_objective", "objective")
    }
    if step == "weight":
        metrics["weight/objective"] = terms["objective"]
    else:
        metrics["architecture/entropy"] = terms["entropy"]
        metrics["architecture/objective"] = terms["architecture_objective"]
    return metrics


def _keep_gradients(gradients, variables):
    """(gradients, variables) without the variables that got no gradient."""
    pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
    return [g for g, _ in pairs], [v for _, v in pairs]


class BilevelSearch:
    """Optimisers and distributed steps of one bilevel search.

    Build the model (every variable created) and the loss inside
    `strategy.scope()` first; the optimisers are created and built on
    their variables here, inside the same scope, before any step runs.

    Args:
        model: a built supernet with `architecture_variables()`,
            `network_variables()` and an `architecture` mapping of spaces
            (each with an `alphas` variable).
        loss: `NPPNetLoss`-like: `loss(targets, outputs) -> (total,
            components)` with replica-sum semantics.
        config: `SearchConfig` (learning rates, Adam settings, order,
            scales, XLA).
        strategy: the `tf.distribute` strategy; None uses the current one.
        lambda_variables: the loss weights' variables; default
            `loss.uncertainty.trainable_variables`.

    Raises:
        ValueError: the model has no architecture parameters or is not
            built.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: Any,
        config: SearchConfig,
        strategy: tf.distribute.Strategy | None = None,
        lambda_variables: Sequence[tf.Variable] | None = None,
    ):
        if not getattr(model, "built", False):
            raise ValueError(
                "build the supernet (model.build(input_shape)) inside the "
                "strategy scope before creating BilevelSearch"
            )
        self.model = model
        self.loss = loss
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.architecture_variables = list(model.architecture_variables())
        if not self.architecture_variables:
            raise ValueError(
                f"{type(model).__name__} has no architecture parameters "
                "(a derived network?); the search needs a supernet"
            )
        if config.jit_compile and getattr(model, "sync_batchnorm", False):
            raise ValueError(
                "search.jit_compile cannot compile synchronised BatchNorm "
                "(its all-reduce is a cross-replica call inside the compiled "
                f"pass; {type(model).__name__} has sync_batchnorm=True): set "
                "distribute.sync_batchnorm: false or search.jit_compile: false"
            )
        self.network_variables = list(model.network_variables())
        if lambda_variables is None:
            lambda_variables = loss.uncertainty.trainable_variables
        self.lambda_variables = list(lambda_variables)
        self.alphas = [space.alphas for space in model.architecture.values()]
        with self.strategy.scope():
            self.weight_optimizer = TorchAdam(
                config.weight_lr,
                epsilon=config.adam_epsilon,
                name="weight_adam",
            )
            self.lambda_optimizer = TorchAdam(
                config.lambda_lr,
                epsilon=config.adam_epsilon,
                name="lambda_adam",
            )
            self.architecture_optimizer = TorchAdam(
                config.arch_lr,
                beta_1=config.arch_beta_1,
                beta_2=config.arch_beta_2,
                epsilon=config.adam_epsilon,
                coupled_weight_decay=config.arch_weight_decay,
                name="architecture_adam",
            )
            # Built here, inside the scope, on exactly the variables each
            # one updates: slots created lazily inside a replica function
            # fail under MirroredStrategy.
            self.weight_optimizer.build(self.network_variables)
            self.lambda_optimizer.build(self.lambda_variables)
            self.architecture_optimizer.build(self.architecture_variables)
        self._functions: dict[str, Any] = {}
        # XLA-compiled gradient passes, by variable list (`_forward`).
        self._compiled: dict[tuple, Any] = {}
        self._batch_spec = None

    # ------------------------------------------------------------ plumbing

    @property
    def optimizers(self) -> dict[str, keras.optimizers.Optimizer]:
        """The three optimisers by role (for checkpoints)."""
        return {
            "weight_optimizer": self.weight_optimizer,
            "lambda_optimizer": self.lambda_optimizer,
            "architecture_optimizer": self.architecture_optimizer,
        }

    def base_learning_rates(
        self,
    ) -> list[tuple[keras.optimizers.Optimizer, float]]:
        """`(optimizer, base rate)` of the per-epoch MultiStep schedule
        (the weight and lambda groups; the architecture rate is constant)."""
        return [
            (self.weight_optimizer, self.config.weight_lr),
            (self.lambda_optimizer, self.config.lambda_lr),
        ]

    def set_batch_spec(self, element_spec) -> None:
        """Fixes the traced input signature to one (distributed) batch's
        `element_spec`, so that the steps are traced once (call before the
        first step; optional)."""
        if self._functions:
            raise RuntimeError("set_batch_spec must be called before any step")
        self._batch_spec = element_spec

    def _function(self, name: str, python_function, num_batches: int):
        if name not in self._functions:
            signature = None
            if self._batch_spec is not None:
                signature = [self._batch_spec] * num_batches
                if name == "shared":
                    signature.append(tf.TensorSpec([], tf.bool))
                if name != "weight":
                    signature.append(tf.TensorSpec([], tf.float32))
            self._functions[name] = tf.function(
                python_function,
                input_signature=signature,
                reduce_retracing=signature is None,
            )
        return self._functions[name]

    def _num_replicas(self) -> int:
        context = tf.distribute.get_replica_context()
        return context.num_replicas_in_sync

    def _forward(self, images, targets, variables, entropy_weight=None):
        """Loss terms and gradients of one replica batch.

        With `entropy_weight` the objective is the architecture loss
        `scale * (L + entropy_weight * E)`, else the weight loss `L`. With
        `search.jit_compile` the pass is one XLA cluster per variable list
        (the variables are captured, not passed: a traced function cannot
        take Keras variables as arguments).
        """
        if not self.config.jit_compile:
            return self._gradients(images, targets, variables, entropy_weight)
        key = tuple(id(v) for v in variables)
        if key not in self._compiled:

            def compiled(images, targets, entropy_weight):
                return self._gradients(
                    images, targets, variables, entropy_weight
                )

            # A None entropy weight (the weight pass) is a Python constant
            # of its own trace.
            self._compiled[key] = tf.function(compiled, jit_compile=True)
        return self._compiled[key](images, targets, entropy_weight)

    def _gradients(self, images, targets, variables, entropy_weight):
        with tf.GradientTape() as tape:
            outputs = self.model(images, training=True)
            total, components = self.loss(targets, outputs)
            objective = total
            terms = dict(components)
            if entropy_weight is not None:
                entropy = entropy_loss(
                    self.alphas, len(self.architecture_variables)
                ) / float(self._num_replicas())
                objective = self.config.arch_loss_scale * (
                    total + entropy_weight * entropy
                )
                terms["entropy"] = entropy
            terms["objective"] = objective
        return terms, tape.gradient(objective, variables)

    def _sum(self, per_replica: dict, prefix: str) -> dict[str, tf.Tensor]:
        """Global values of replica contributions (summed over replicas)."""
        return {
            f"{prefix}/{key}": self.strategy.reduce(
                tf.distribute.ReduceOp.SUM, value, axis=None
            )
            for key, value in per_replica.items()
        }

    # --------------------------------------------------------------- steps

    def weight_step(self, batch) -> dict[str, tf.Tensor]:
        """One weight step on a (distributed) `search_weights` batch.

        Args:
            batch: `(images, targets)`, a global batch from the distributed
                dataset.

        Returns:
            `weight/<term>` global loss values (`weight/total` is `L`).
        """
        if self.config.shared_gradients:
            metrics = self._function("shared", self._shared_step, 1)(
                batch, tf.constant(False), tf.constant(0.0)
            )
            return _step_metrics(metrics, "weight")
        return self._function("weight", self._weight_step, 1)(batch)

    def _weight_step(self, batch):
        images, targets = batch
        per_replica = self.strategy.run(
            self._replica_weight_step, args=(images, targets)
        )
        return self._sum(per_replica, "weight")

    def _replica_weight_step(self, images, targets):
        network, lambdas = self.network_variables, self.lambda_variables
        terms, gradients = self._forward(images, targets, network + lambdas)
        network_gradients, network_used = _keep_gradients(
            gradients[: len(network)], network
        )
        lambda_gradients, lambdas_used = _keep_gradients(
            gradients[len(network) :], lambdas
        )
        self.weight_optimizer.apply(network_gradients, network_used)
        self.lambda_optimizer.apply(lambda_gradients, lambdas_used)
        return terms

    def iteration(
        self, weight_batch, architecture_batch, entropy_weight: float = 0.0
    ) -> dict[str, tf.Tensor]:
        """One search iteration in the authors' order: `weight_step` on
        `weight_batch`, then `architecture_step` on `architecture_batch`
        with the updated weights.

        Returns:
            The metrics of both steps (`weight/...`, `architecture/...`).
        """
        metrics = self.weight_step(weight_batch)
        metrics.update(
            self.architecture_step(
                architecture_batch, weight_batch, entropy_weight
            )
        )
        return metrics

    def architecture_step(
        self, batch, weight_batch=None, entropy_weight: float = 0.0
    ) -> dict[str, tf.Tensor]:
        """One architecture step on a fresh `search_arch` batch.

        Args:
            batch: `(images, targets)` of the architecture split.
            weight_batch: the iteration's weight batch; required for the
                second-order step (its virtual weight step), unused by the
                first-order one.
            entropy_weight: weight of the entropy term (0 before the
                entropy epoch).

        Returns:
            `architecture/<term>` global values: the loss terms at the
            weights the gradient is taken at, `architecture/entropy` and
            `architecture/objective` (the scaled architecture loss).

        Raises:
            ValueError: second order without `weight_batch`.
        """
        weight = tf.constant(entropy_weight, tf.float32)
        if self.config.order == "second":
            if weight_batch is None:
                raise ValueError(
                    "the second-order architecture step needs the weight batch"
                )
            function = self._function(
                "second_order", self._second_order_step, 2
            )
            return function(batch, weight_batch, weight)
        if self.config.shared_gradients:
            function = self._function("shared", self._shared_step, 1)
            return _step_metrics(
                function(batch, tf.constant(True), weight), "architecture"
            )
        function = self._function("architecture", self._architecture_step, 1)
        return function(batch, weight)

    def _architecture_step(self, batch, entropy_weight):
        images, targets = batch
        per_replica = self.strategy.run(
            self._replica_architecture_step,
            args=(images, targets, entropy_weight),
        )
        return self._sum(per_replica, "architecture")

    def _replica_architecture_step(self, images, targets, entropy_weight):
        architecture = self.architecture_variables
        terms, gradients = self._forward(
            images, targets, architecture, entropy_weight
        )
        self.architecture_optimizer.apply(gradients, architecture)
        return terms

    # ------------------------------------------------ shared (one graph)

    def _shared_step(self, batch, architecture_step, entropy_weight):
        """The weight or the first-order architecture step in one traced
        function (`search.shared_gradients`): a forward and backward pass
        giving the gradients of `L` for every variable, then a `tf.cond`
        that applies the weight and lambda updates or the architecture
        update. The architecture gradient is
        `scale * (grad_a L + w_e * grad_a E)`, the gradient of the
        architecture loss. Returns the global terms, `entropy` and
        `architecture_objective`."""
        network, lambdas = self.network_variables, self.lambda_variables
        architecture = self.architecture_variables
        variables = network + lambdas + architecture

        def replica(images, targets):
            terms, gradients = self._forward(images, targets, variables)
            with tf.GradientTape() as tape:
                # Identical on every replica: each adds its share.
                entropy = entropy_loss(self.alphas, len(architecture)) / float(
                    self._num_replicas()
                )
            terms["entropy"] = entropy
            return terms, [gradients, tape.gradient(entropy, architecture)]

        terms, (gradients, entropy_gradients) = self._run_reduced(
            replica, batch
        )
        entropy = terms["entropy"]
        scale = self.config.arch_loss_scale

        def architecture_gradient(loss_gradient, entropy_gradient):
            if entropy_gradient is None:
                total = loss_gradient
            elif loss_gradient is None:
                total = entropy_weight * entropy_gradient
            else:
                total = loss_gradient + entropy_weight * entropy_gradient
            return None if total is None else scale * total

        architecture_gradients = [
            architecture_gradient(g, e)
            for g, e in zip(
                gradients[len(network) + len(lambdas) :], entropy_gradients
            )
        ]

        def update_architecture():
            pairs = _keep_gradients(architecture_gradients, architecture)
            self.architecture_optimizer.apply(*pairs)
            return tf.constant(True)

        def update_weights():
            self.weight_optimizer.apply(
                *_keep_gradients(gradients[: len(network)], network)
            )
            self.lambda_optimizer.apply(
                *_keep_gradients(
                    gradients[len(network) : len(network) + len(lambdas)],
                    lambdas,
                )
            )
            return tf.constant(False)

        tf.cond(architecture_step, update_architecture, update_weights)
        terms["architecture_objective"] = scale * (
            terms["objective"] + entropy_weight * entropy
        )
        return terms

    # -------------------------------------------------------- second order

    def _second_order_step(self, batch, weight_batch, entropy_weight):
        xi = self.config.unrolled_lr
        if xi is None:
            xi = self.weight_optimizer.learning_rate
        xi = tf.cast(xi, tf.float32)
        network = self.network_variables
        architecture = self.architecture_variables
        backups = [tf.identity(v) for v in network]

        _, train_gradients = self._reduced_gradients(weight_batch, network)
        for variable, gradient in zip(network, train_gradients):
            if gradient is not None:
                variable.assign_sub(xi * gradient)  # the virtual step w'

        terms, gradients = self._reduced_gradients(
            batch, architecture + network, entropy_weight
        )
        architecture_gradients = gradients[: len(architecture)]
        unrolled = gradients[len(architecture) :]
        present = [g for g in unrolled if g is not None]
        norm = tf.linalg.global_norm(present)
        epsilon = FINITE_DIFFERENCE_RADIUS / tf.maximum(norm, 1e-12)

        def perturb(sign: float) -> list:
            for variable, backup, direction in zip(network, backups, unrolled):
                if direction is None:
                    variable.assign(backup)
                else:
                    variable.assign(backup + sign * epsilon * direction)
            _, result = self._reduced_gradients(weight_batch, architecture)
            return result

        plus = perturb(1.0)
        minus = perturb(-1.0)
        for variable, backup in zip(network, backups):
            variable.assign(backup)
        final = []
        for direct, up, down in zip(architecture_gradients, plus, minus):
            hessian_vector = (up - down) / (2.0 * epsilon)
            final.append(direct - xi * hessian_vector)
        self.architecture_optimizer.apply(final, architecture)
        summed = {f"architecture/{k}": v for k, v in terms.items()}
        summed["architecture/hessian_epsilon"] = epsilon
        return summed

    def _reduced_gradients(self, batch, variables, entropy_weight=None):
        """Global loss terms and all-reduced gradients, in cross-replica
        context; None for a variable without a gradient."""

        def replica(images, targets):
            terms, gradients = self._forward(
                images, targets, variables, entropy_weight
            )
            return terms, [gradients]

        terms, (gradients,) = self._run_reduced(replica, batch)
        return terms, gradients

    def _run_reduced(self, replica, batch):
        """Runs `replica(images, targets) -> (terms, gradient lists)` on
        every replica and sums both over the replicas, in cross-replica
        context. Gradients that are None stay None (which variables have
        one is fixed by the graph, recorded while tracing)."""
        images, targets = batch
        masks: list[list[bool]] = []

        def masked(images, targets):
            terms, lists = replica(images, targets)
            masks[:] = [[g is not None for g in gs] for gs in lists]
            return terms, [[g for g in gs if g is not None] for gs in lists]

        terms, present = self.strategy.run(masked, args=(images, targets))
        summed = {
            key: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for key, v in terms.items()
        }
        gradient_lists = []
        for values, mask in zip(present, masks):
            reduced = iter(
                self.strategy.reduce(
                    tf.distribute.ReduceOp.SUM, values, axis=None
                )
            )
            gradient_lists.append(
                [next(reduced) if has else None for has in mask]
            )
        return summed, gradient_lists
