"""Tests of the bilevel search steps on the toy supernet (see
`toy_supernet.py` for why not the real one; a slow test runs the real tiny
supernets in `test_search_loop.py`)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.config import LossConfig, SearchConfig
from nppnet_tf.search.bilevel import (
    ENTROPY_FACTOR,
    BilevelSearch,
    entropy_loss,
    normalised_entropy,
)
from nppnet_tf.training.losses import NPPNetLoss
from tests.nppnet_tf.search.toy_supernet import build_toy

ONE_DEVICE = ["/cpu:0"]
TWO_DEVICES = ["/cpu:0", "/cpu:1"]
# All pixels kept by OHEM: the loss is then smooth in the weights, which
# the finite differences of the second-order test need.
SMOOTH_LOSS = LossConfig(ohem_threshold=1.0, ohem_min_kept=1)


def _batch(seed: int, size: int = 4):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(size, 64, 64, 3)).astype("float32")
    targets = {
        "heatmaps": rng.uniform(size=(size, 16, 16, 16)).astype("float32"),
        "heatmaps_aux": rng.uniform(size=(size, 16, 16, 16)).astype("float32"),
        "parsing": rng.integers(0, 20, size=(size, 64, 64)).astype("int32"),
        "edge": rng.integers(0, 2, size=(size, 64, 64)).astype("int32"),
    }
    targets["parsing"][:, :4] = 255  # some ignored pixels
    return images, targets


def _distributed(strategy, batches):
    """An iterator of distributed global batches."""
    dataset = tf.data.Dataset.from_tensor_slices(
        tf.nest.map_structure(lambda *xs: np.stack(xs), *batches)
    )
    return iter(strategy.experimental_distribute_dataset(dataset))


def _setup(
    strategy, loss_config=None, batchnorm=True, sync_batchnorm=True, **search
):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = build_toy(batchnorm=batchnorm, sync_batchnorm=sync_batchnorm)
        loss = NPPNetLoss(loss_config or LossConfig(ohem_min_kept=500))
        bilevel = BilevelSearch(model, loss, SearchConfig(**search), strategy)
    return model, loss, bilevel


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _momentum(optimizer, variables):
    """The first moments of `variables` in a TorchAdam (replica 0)."""
    return [
        np.array(optimizer._momentums[optimizer._get_variable_index(v)].numpy())
        for v in variables
    ]


def test_normalised_entropy_and_entropy_loss_by_hand():
    uniform = np.zeros((3, 7), "float32")
    peaked = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]], "float32")
    np.testing.assert_allclose(normalised_entropy(uniform), 1.0, rtol=1e-6)
    probabilities = np.exp([3.0, 0, 0]) / np.exp([3.0, 0, 0]).sum()
    first_row = -(probabilities * np.log(probabilities)).sum() / math.log(3)
    expected_peaked = (first_row + 1.0) / 2
    np.testing.assert_allclose(
        normalised_entropy(peaked), expected_peaked, rtol=1e-6
    )
    # The authors' 0.25 * 2 * (sum over alphas tensors) / (alphas + betas).
    value = entropy_loss([uniform, peaked], num_tensors=4)
    np.testing.assert_allclose(
        value, 0.5 * (1.0 + expected_peaked) / 4, rtol=1e-6
    )
    assert ENTROPY_FACTOR == 0.5


def test_entropy_of_a_fresh_supernet_is_half_its_alphas_over_all_tensors(
    make_mirrored_strategy,
):
    model, _, bilevel = _setup(make_mirrored_strategy(ONE_DEVICE))
    value = entropy_loss(bilevel.alphas, len(bilevel.architecture_variables))
    # Six uniform alphas tensors (entropy 1 each) over 12 tensors.
    np.testing.assert_allclose(value, 0.5 * 6 / 12, rtol=1e-5)


def test_weight_step_moves_weights_and_lambdas_not_architecture(
    make_mirrored_strategy,
):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    model, loss, bilevel = _setup(strategy)
    architecture = _values(bilevel.architecture_variables)
    network = _values(bilevel.network_variables)
    lambdas = _values(bilevel.lambda_variables)
    metrics = bilevel.weight_step(next(_distributed(strategy, [_batch(1)])))
    assert np.isfinite(float(metrics["weight/total"]))
    for before, after in zip(
        architecture, _values(bilevel.architecture_variables)
    ):
        np.testing.assert_array_equal(before, after)
    # Adam's first step moves every parameter by at most its learning rate
    # (nearly exactly, where the gradient is not tiny; float32 rounding of
    # the parameter values leaves a few tenths of a percent).
    steps = [
        np.abs(a - b).max()
        for a, b in zip(_values(bilevel.network_variables), network)
    ]
    assert max(steps) == pytest.approx(1e-3, rel=5e-3)
    moved = np.concatenate(
        [
            np.ravel(a - b)
            for a, b in zip(_values(bilevel.lambda_variables), lambdas)
        ]
    )
    np.testing.assert_allclose(np.abs(moved), 1e-4, rtol=5e-3)


def test_architecture_step_moves_only_architecture(make_mirrored_strategy):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    model, loss, bilevel = _setup(strategy)
    network = _values(bilevel.network_variables + bilevel.lambda_variables)
    architecture = _values(bilevel.architecture_variables)
    metrics = bilevel.architecture_step(
        next(_distributed(strategy, [_batch(2)])), entropy_weight=2.0
    )
    for before, after in zip(
        network, _values(bilevel.network_variables + bilevel.lambda_variables)
    ):
        np.testing.assert_array_equal(before, after)
    moved = [
        np.abs(a - b).max()
        for a, b in zip(_values(bilevel.architecture_variables), architecture)
    ]
    assert max(moved) == pytest.approx(1e-3, rel=1e-2)
    # objective = 2 * (L + 2 * entropy) with L the loss total.
    expected = 2.0 * (
        float(metrics["architecture/total"])
        + 2.0 * float(metrics["architecture/entropy"])
    )
    assert float(metrics["architecture/objective"]) == pytest.approx(
        expected, rel=1e-6
    )
    assert float(metrics["architecture/entropy"]) == pytest.approx(
        0.25, rel=1e-4
    )


def test_iteration_is_weight_step_then_architecture_step(
    make_mirrored_strategy,
):
    """The architecture gradient is taken at the weights the weight step
    just produced (the authors' order), not at the old ones."""
    weight_batch, architecture_batch = _batch(3), _batch(4)
    moments = {}
    for order in ("iteration", "weights_first", "architecture_first"):
        strategy = make_mirrored_strategy(ONE_DEVICE)
        _, _, bilevel = _setup(strategy)
        w = next(_distributed(strategy, [weight_batch]))
        a = next(_distributed(strategy, [architecture_batch]))
        if order == "iteration":
            bilevel.iteration(w, a, 0.0)
        elif order == "weights_first":
            bilevel.weight_step(w)
            bilevel.architecture_step(a)
        else:
            bilevel.architecture_step(a)
            bilevel.weight_step(w)
        moments[order] = _momentum(
            bilevel.architecture_optimizer, bilevel.architecture_variables
        )
    for same, other in zip(moments["iteration"], moments["weights_first"]):
        np.testing.assert_array_equal(same, other)
    difference = max(
        np.abs(x - y).max()
        for x, y in zip(moments["iteration"], moments["architecture_first"])
    )
    assert difference > 1e-9


def _replica_values(strategy, variable):
    return [
        np.array(x.numpy())
        for x in strategy.experimental_local_results(variable.value)
    ]


@pytest.mark.parametrize(
    "order",
    # The second-order step traces four passes per replica: minutes.
    ["first", pytest.param("second", marks=pytest.mark.slow)],
)
def test_two_replicas_stay_identical_and_match_one(
    make_mirrored_strategy, order
):
    """Architecture parameters are mirrored and updated from all-reduced
    gradients: identical on both replicas after every step, and 2 replicas
    on a global batch give the 1-replica result."""
    batches = [(_batch(10 + i), _batch(20 + i)) for i in range(3)]
    results = {}
    for devices in (ONE_DEVICE, TWO_DEVICES):
        strategy = make_mirrored_strategy(devices)
        model, _, bilevel = _setup(strategy, order=order)
        weights = _distributed(strategy, [w for w, _ in batches])
        architecture = _distributed(strategy, [a for _, a in batches])
        bilevel.weight_step(next(weights))  # a warm-up step
        for v in bilevel.architecture_variables + bilevel.network_variables:
            values = _replica_values(strategy, v)
            assert all(np.array_equal(values[0], x) for x in values[1:])
        for _ in range(2):
            metrics = bilevel.iteration(next(weights), next(architecture), 2.0)
            for v in bilevel.architecture_variables:
                values = _replica_values(strategy, v)
                assert len(values) == len(devices)
                assert all(np.array_equal(values[0], x) for x in values[1:]), (
                    v.name
                )
        results[len(devices)] = (
            _values(bilevel.architecture_variables),
            _values(bilevel.network_variables),
            {k: float(v) for k, v in metrics.items()},
        )
    (arch_1, net_1, metrics_1), (arch_2, net_2, metrics_2) = (
        results[1],
        results[2],
    )
    for a, b in zip(arch_1, arch_2):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for a, b in zip(net_1, net_2):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for key in metrics_1:
        assert metrics_1[key] == pytest.approx(metrics_2[key], rel=1e-4), key


def test_coupled_weight_decay_is_added_once_under_two_replicas(
    make_mirrored_strategy,
):
    """The architecture gradient the optimiser sees is the global loss
    gradient plus weight_decay * alpha, once, whatever the replicas."""
    decay = 0.5
    batch = _batch(30)
    moments, start, data_gradients = {}, None, None
    for devices in (ONE_DEVICE, TWO_DEVICES):
        strategy = make_mirrored_strategy(devices)
        model, loss, bilevel = _setup(strategy, arch_weight_decay=decay)
        if start is None:
            rng = np.random.default_rng(0)
            start = [
                rng.normal(size=v.shape).astype("float32")
                for v in bilevel.architecture_variables
            ]
        for variable, value in zip(bilevel.architecture_variables, start):
            variable.assign(value)
        if data_gradients is None:
            # The loss gradient alone, outside any strategy, at the start.
            with tf.GradientTape() as tape:
                total, _ = loss(batch[1], model(batch[0], training=True))
                objective = 2.0 * total
            data_gradients = [
                g.numpy()
                for g in tape.gradient(
                    objective, bilevel.architecture_variables
                )
            ]
        bilevel.architecture_step(next(_distributed(strategy, [batch])))
        moments[len(devices)] = _momentum(
            bilevel.architecture_optimizer, bilevel.architecture_variables
        )
    beta_1 = SearchConfig().arch_beta_1
    for index, (value, gradient) in enumerate(zip(start, data_gradients)):
        expected = (1 - beta_1) * (gradient + decay * value)
        # Decay added once per replica would give (1 - beta_1) * 2 * decay
        # * value too much under 2 replicas; the tolerance is far below.
        for replicas in (1, 2):
            np.testing.assert_allclose(
                moments[replicas][index], expected, rtol=2e-3, atol=1e-6
            )


def test_second_order_gradient_matches_direct_computation(
    make_mirrored_strategy,
):
    """The finite-difference unrolled gradient equals the exact gradient of
    `objective(w - xi * grad_w L_train(w, a), a)` by nested tapes."""
    xi, entropy_weight = 0.05, 0.5
    strategy = make_mirrored_strategy(ONE_DEVICE)
    model, loss, bilevel = _setup(
        strategy,
        loss_config=SMOOTH_LOSS,
        batchnorm=False,
        order="second",
        unrolled_lr=xi,
        arch_weight_decay=0.0,
    )
    rng = np.random.default_rng(1)
    for variable in bilevel.architecture_variables:
        variable.assign(
            rng.normal(scale=0.5, size=variable.shape).astype("float32")
        )
    weight_batch, architecture_batch = _batch(40), _batch(41)
    parameters = model.parameters()
    architecture_keys = [k for k in parameters if "/" in k]
    network_keys = [k for k in parameters if "/" not in k]
    values = {k: tf.convert_to_tensor(v) for k, v in parameters.items()}
    with tf.GradientTape() as outer:
        outer.watch([values[k] for k in architecture_keys])
        with tf.GradientTape() as inner:
            inner.watch([values[k] for k in network_keys])
            train, _ = loss(
                weight_batch[1], model.forward(values, weight_batch[0], True)
            )
        gradients = inner.gradient(train, [values[k] for k in network_keys])
        unrolled = dict(values)
        for key, gradient in zip(network_keys, gradients):
            unrolled[key] = values[key] - xi * gradient
        validation, _ = loss(
            architecture_batch[1],
            model.forward(unrolled, architecture_batch[0], True),
        )
        alphas = [
            unrolled[k] for k in architecture_keys if k.endswith("alphas")
        ]
        objective = 2.0 * (
            validation
            + entropy_weight * entropy_loss(alphas, len(architecture_keys))
        )
    direct = outer.gradient(objective, [values[k] for k in architecture_keys])
    # The same objective with the virtual step's dependence on `a` cut: the
    # first-order gradient at w'. The test must tell the two apart.
    with tf.GradientTape() as tape:
        tape.watch([values[k] for k in architecture_keys])
        frozen = {k: tf.stop_gradient(v) for k, v in unrolled.items()}
        frozen.update({k: values[k] for k in architecture_keys})
        validation, _ = loss(
            architecture_batch[1],
            model.forward(frozen, architecture_batch[0], True),
        )
        alphas = [frozen[k] for k in architecture_keys if k.endswith("alphas")]
        objective = 2.0 * (
            validation
            + entropy_weight * entropy_loss(alphas, len(architecture_keys))
        )
    partial = tape.gradient(objective, [values[k] for k in architecture_keys])
    network_before = _values(bilevel.network_variables)

    bilevel.architecture_step(
        next(_distributed(strategy, [architecture_batch])),
        next(_distributed(strategy, [weight_batch])),
        entropy_weight,
    )
    used = _momentum(
        bilevel.architecture_optimizer, bilevel.architecture_variables
    )
    beta_1 = SearchConfig().arch_beta_1
    by_key = dict(zip(architecture_keys, direct))
    scale = max(np.abs(g.numpy()).max() for g in direct)
    tolerance = 2e-4 * scale
    for variable, moment in zip(bilevel.architecture_variables, used):
        key = next(k for k in architecture_keys if parameters[k] is variable)
        np.testing.assert_allclose(
            moment / (1 - beta_1), by_key[key].numpy(), atol=tolerance
        )
    hessian_term = max(
        np.abs(d.numpy() - p.numpy()).max() for d, p in zip(direct, partial)
    )
    assert hessian_term > 10 * tolerance
    # The weights are restored after the virtual step and perturbations.
    for before, after in zip(
        network_before, _values(bilevel.network_variables)
    ):
        np.testing.assert_allclose(before, after, atol=1e-7)


def test_steps_trace_once_for_every_batch(make_mirrored_strategy):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    _, _, bilevel = _setup(strategy)
    batches = [(_batch(50 + i), _batch(60 + i)) for i in range(3)]
    weights = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(
            tf.nest.map_structure(
                lambda *xs: np.stack(xs), *[w for w, _ in batches]
            )
        )
    )
    bilevel.set_batch_spec(weights.element_spec)
    architecture = iter(
        strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(
                tf.nest.map_structure(
                    lambda *xs: np.stack(xs), *[a for _, a in batches]
                )
            )
        )
    )
    for index, w in enumerate(weights):
        bilevel.iteration(w, next(architecture), float(index))
    assert bilevel._functions["weight"].experimental_get_tracing_count() == 1
    assert (
        bilevel._functions["architecture"].experimental_get_tracing_count() == 1
    )


def test_requires_a_built_supernet_with_architecture(make_mirrored_strategy):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    with strategy.scope():
        unbuilt = build_toy()
        unbuilt.built = False
        with pytest.raises(ValueError, match="build the supernet"):
            BilevelSearch(unbuilt, NPPNetLoss(), SearchConfig(), strategy)
        derived = build_toy(stage="interaction")
        derived.architecture = {}
        with pytest.raises(ValueError, match="no architecture parameters"):
            BilevelSearch(derived, NPPNetLoss(), SearchConfig(), strategy)
    _, _, bilevel = _setup(strategy, order="second")
    with pytest.raises(ValueError, match="weight batch"):
        bilevel.architecture_step(next(_distributed(strategy, [_batch(1)])))


@pytest.mark.parametrize("devices", [ONE_DEVICE, TWO_DEVICES])
def test_shared_gradients_give_the_same_search(make_mirrored_strategy, devices):
    """`search.shared_gradients`: the same updates and metrics as separate
    weight and architecture steps, with one traced function for both steps
    (on one replica and on two, with synchronised BatchNorm)."""
    batches = [(_batch(30 + i), _batch(40 + i)) for i in range(2)]
    results = {}
    for shared in (False, True):
        strategy = make_mirrored_strategy(devices)
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = build_toy(batchnorm=True, sync_batchnorm=len(devices) > 1)
            loss = NPPNetLoss(LossConfig(ohem_min_kept=500))
            bilevel = BilevelSearch(
                model, loss, SearchConfig(shared_gradients=shared), strategy
            )
        weights = _distributed(strategy, [w for w, _ in batches])
        architecture = _distributed(strategy, [a for _, a in batches])
        bilevel.weight_step(next(weights))
        metrics = bilevel.iteration(next(weights), next(architecture), 2.0)
        results[shared] = (
            _values(
                bilevel.architecture_variables
                + bilevel.network_variables
                + bilevel.lambda_variables
            ),
            {k: float(v) for k, v in metrics.items()},
            [int(o.iterations.numpy()) for o in bilevel.optimizers.values()],
        )
        if shared:
            function = bilevel._functions["shared"]
            assert function.experimental_get_tracing_count() == 1
            assert "weight" not in bilevel._functions
            assert "architecture" not in bilevel._functions
        else:
            assert "shared" not in bilevel._functions
    separate, separate_metrics, separate_steps = results[False]
    together, together_metrics, together_steps = results[True]
    assert separate_steps == together_steps == [2, 2, 1]
    assert separate_metrics.keys() == together_metrics.keys()
    _assert_same_search(
        (separate, separate_metrics), (together, together_metrics), 1e-5, 1e-6
    )


def _assert_same_search(expected, actual, rtol, atol):
    """Two searches' (variable values, metrics) agree within tolerances."""
    (expected_values, expected_metrics), (values, metrics) = expected, actual
    for key in expected_metrics:
        assert metrics[key] == pytest.approx(
            expected_metrics[key], rel=rtol, abs=atol
        ), key
    for a, b in zip(expected_values, values):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_xla_search_iteration_matches_the_graph_one(make_mirrored_strategy):
    """`search.jit_compile`: the weight and architecture passes compiled by
    XLA give the same updates as without (the variable lists are captured
    by the compiled functions, which cannot take Keras variables)."""
    batches = (_batch(50), _batch(51))
    results = {}
    for jit in (False, True):
        strategy = make_mirrored_strategy(ONE_DEVICE)
        # One replica: fused BatchNorm, as the search builds it.
        _, _, bilevel = _setup(strategy, sync_batchnorm=False, jit_compile=jit)
        weights = _distributed(strategy, [batches[0]])
        architecture = _distributed(strategy, [batches[1]])
        metrics = bilevel.iteration(next(weights), next(architecture), 2.0)
        results[jit] = (
            _values(bilevel.architecture_variables + bilevel.network_variables),
            {k: float(v) for k, v in metrics.items()},
        )
        if jit:
            assert len(bilevel._compiled) == 2  # weight and architecture
    _assert_same_search(results[False], results[True], 1e-4, 1e-5)


def test_xla_refuses_synchronised_batchnorm(make_mirrored_strategy):
    with pytest.raises(ValueError, match="sync_batchnorm=True"):
        _setup(make_mirrored_strategy(ONE_DEVICE), jit_compile=True)
