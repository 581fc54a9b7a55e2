"""Tests of `TorchAdam`: PyTorch's Adam rule and its coupled weight decay."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.training.optimizers import TorchAdam


def _torch_adam(values, gradients, lr, beta_1, beta_2, eps, decay):
    """`torch.optim.Adam.step` written out in numpy (float64)."""
    w = np.array(values, np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(gradients, start=1):
        g = np.asarray(g, np.float64) + decay * w
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        denominator = np.sqrt(v) / np.sqrt(1 - beta_2**t) + eps
        w = w - lr / (1 - beta_1**t) * m / denominator
    return w


@pytest.mark.parametrize("decay", [0.0, 1e-2])
def test_matches_pytorch_adam_including_tiny_gradients(decay):
    rng = np.random.default_rng(0)
    start = rng.normal(size=6).astype("float32")
    # Tiny gradients are where PyTorch's and Keras' epsilons differ.
    gradients = [
        (rng.normal(size=6) * scale).astype("float32")
        for scale in (1e-7, 1e-6, 1e-3, 1.0)
    ]
    variable = tf.Variable(start)
    optimizer = TorchAdam(1e-2, 0.5, 0.999, 1e-8, coupled_weight_decay=decay)
    for g in gradients:
        optimizer.apply([tf.constant(g)], [variable])
    expected = _torch_adam(start, gradients, 1e-2, 0.5, 0.999, 1e-8, decay)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-7)
    # Keras' Adam gives another result on the same steps (its epsilon).
    keras_variable = tf.Variable(start)
    keras_adam = keras.optimizers.Adam(1e-2, 0.5, 0.999, 1e-8)
    for g in gradients:
        keras_adam.apply([tf.constant(g)], [keras_variable])
    if decay == 0.0:
        assert np.abs(keras_variable.numpy() - expected).max() > 1e-4


def test_learning_rate_can_be_reassigned_and_config_round_trips():
    optimizer = TorchAdam(1e-3, coupled_weight_decay=1e-3, name="arch")
    optimizer.learning_rate = 2e-4
    assert float(optimizer.learning_rate) == pytest.approx(2e-4)
    clone = TorchAdam.from_config(optimizer.get_config())
    assert clone.coupled_weight_decay == 1e-3 and clone.name == "arch"


def test_rejects_decoupled_decay_and_amsgrad():
    with pytest.raises(ValueError, match="coupled_weight_decay"):
        TorchAdam(weight_decay=0.1)
    with pytest.raises(ValueError, match="amsgrad"):
        TorchAdam(amsgrad=True)
    with pytest.raises(ValueError, match=">= 0"):
        TorchAdam(coupled_weight_decay=-1.0)


def test_decay_is_added_once_with_two_replicas(make_mirrored_strategy):
    """The decay is applied on the all-reduced gradient, once."""
    strategy = make_mirrored_strategy(["/cpu:0", "/cpu:1"])
    start = np.array([1.0, -2.0, 0.5], "float32")
    with strategy.scope():
        variable = tf.Variable(start)
        optimizer = TorchAdam(0.1, 0.9, 0.999, coupled_weight_decay=0.5)
        optimizer.build([variable])

    @tf.function
    def step():
        def replica():
            # Replica contributions that sum to the global gradient.
            return optimizer.apply(
                [tf.constant([0.1, 0.2, -0.3]) / 2.0], [variable]
            )

        strategy.run(replica)

    step()
    momentum = optimizer._momentums[0].numpy()
    np.testing.assert_allclose(
        momentum, 0.1 * (np.array([0.1, 0.2, -0.3]) + 0.5 * start), rtol=1e-6
    )
    values = [x.numpy() for x in strategy.experimental_local_results(variable)]
    np.testing.assert_array_equal(values[0], values[1])
