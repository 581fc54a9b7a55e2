"""Tests of `TrainStep`: parameter groups, learning rates, loss decrease,
mixed precision with loss scaling, 1 vs 2 replicas and XLA.

The fast tests train the toy network (`toy_network.py`); the slow ones run
the real tiny NPPNet (C = 8, 4 cells), whose first step traces for more
than a minute on two CPU cores.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.config import TrainConfig
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.training import schedules
from nppnet_tf.training.losses import NPPNetLoss
from nppnet_tf.training.train import build_network, dtype_policy
from nppnet_tf.training.train_step import (
    DynamicLossScale,
    TrainStep,
    parameter_groups,
    xla_mode,
)
from tests.nppnet_tf.training.toy_network import toy_network
from tests.nppnet_tf.training.train_fixtures import (
    AUTHORS_GENOTYPE,
    tiny_config,
)

ONE_DEVICE = ["/cpu:0"]
TWO_DEVICES = ["/cpu:0", "/cpu:1"]
ENCODER_PREFIXES = (
    "pose_stem",
    "parsing_stem",
    "pose_encoder",
    "parsing_encoder",
)


def _batch(seed: int, size: int = 64, batch: int = 4):
    rng = np.random.default_rng(seed)
    grid = size // 4
    labels = np.zeros((batch, size, size), "int32")
    labels[:, size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 5
    labels[:, :4] = 255
    edge = np.zeros((batch, size, size), "int32")
    edge[:, size // 4, :] = 1
    heatmaps = np.zeros((batch, grid, grid, 16), "float32")
    heatmaps[:, grid // 2, grid // 2, :] = 1.0
    return (
        rng.normal(size=(batch, size, size, 3)).astype("float32"),
        {
            "heatmaps": heatmaps,
            "heatmaps_aux": heatmaps * 0.5,
            "parsing": labels,
            "edge": edge,
        },
    )


def _setup(strategy, builder=toy_network, **train):
    config = tiny_config(**train)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        with dtype_policy(config.train.mixed_precision):
            model = builder(config, Genotype.load(AUTHORS_GENOTYPE))
        loss = NPPNetLoss(config.loss)
        step = TrainStep(model, loss, config.train, strategy)
    return model, loss, step


def _distributed(strategy, batches):
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(batches),
        output_signature=tf.nest.map_structure(
            lambda x: tf.TensorSpec(x.shape, tf.as_dtype(x.dtype)), batches[0]
        ),
    )
    return iter(strategy.experimental_distribute_dataset(dataset))


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def test_parameter_groups_of_nppnet_and_their_learning_rates(
    make_mirrored_strategy,
):
    """Stems and both encoders at 0.2 x lr, the rest at lr, the lambdas at
    1e-4 (the authors' defaults), all under the per-epoch MultiStep."""
    strategy = make_mirrored_strategy(ONE_DEVICE)
    config = dataclasses.replace(
        tiny_config(network=None),
        train=TrainConfig(init_channels=8, layers=4),
    )
    with strategy.scope():
        model = build_network(config, Genotype.load(AUTHORS_GENOTYPE))
        loss = NPPNetLoss(config.loss)
        step = TrainStep(model, loss, config.train, strategy)
    encoder, network = parameter_groups(model)
    prefix = len(model.name) + 1
    assert encoder and network
    assert all(v.path[prefix:].startswith(ENCODER_PREFIXES) for v in encoder)
    assert not any(
        v.path[prefix:].startswith(ENCODER_PREFIXES) for v in network
    )
    assert len(encoder) + len(network) == len(model.trainable_variables)
    assert any("pose_encoder_3" in v.path for v in encoder)
    assert any("parsing_stem" in v.path for v in encoder)
    assert any("encoder_parsing_to_pose_0" in v.path for v in network)
    assert step.lambda_variables == loss.uncertainty.trainable_variables
    rates = dict(
        (optimizer.name, rate) for optimizer, rate in step.base_learning_rates()
    )
    assert rates == pytest.approx(
        {"encoder_adam": 3e-4, "network_adam": 1.5e-3, "lambda_adam": 1e-4}
    )
    for epoch, factor in ((0, 1.0), (149, 1.0), (150, 0.2), (170, 0.04)):
        set_rates = schedules.apply_learning_rates(
            step.base_learning_rates(), epoch, (150, 170), 0.2
        )
        assert set_rates == pytest.approx(
            {name: rate * factor for name, rate in rates.items()}
        )
        assert float(
            step.encoder_optimizer.learning_rate.numpy()
        ) == pytest.approx(3e-4 * factor)


def test_one_step_moves_each_group_at_its_rate(make_mirrored_strategy):
    """Adam's first step moves every weight with a gradient by about its
    group's learning rate: the stems and encoders by 0.2 x lr."""
    strategy = make_mirrored_strategy(ONE_DEVICE)
    model, _, step = _setup(
        strategy, learning_rate=1e-2, lambda_lr=1e-3, adam_epsilon=1e-12
    )
    before = _values(step.variables)
    step(next(_distributed(strategy, [_batch(1)])))
    moved = [
        np.abs(after - start).max()
        for start, after in zip(before, _values(step.variables))
    ]
    groups = (
        (step.encoder_variables, 2e-3),
        (step.network_variables, 1e-2),
        (step.lambda_variables, 1e-3),
    )
    position = 0
    for variables, rate in groups:
        largest = moved[position : position + len(variables)]
        position += len(variables)
        assert max(largest) == pytest.approx(rate, rel=1e-3)


def test_a_few_steps_reduce_the_loss(make_mirrored_strategy):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    _, _, step = _setup(strategy, learning_rate=3e-3)
    batches = _distributed(strategy, [_batch(2)] * 12)
    losses = [float(step(batch)["loss/total"]) for batch in batches]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_steps_keep_float32_loss_and_variables(
    make_mirrored_strategy, policy
):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    model, _, step = _setup(strategy, mixed_precision=policy)
    half = policy.removeprefix("mixed_")
    assert model.pose_stem.compute_dtype == half
    assert all(v.dtype == "float32" for v in model.variables)
    batches = _distributed(strategy, [_batch(3)] * 8)
    metrics = [step(batch) for batch in batches]
    assert all(m["loss/total"].dtype == tf.float32 for m in metrics)
    losses = [float(m["loss/total"]) for m in metrics]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(np.isfinite(v).all() for v in _values(step.variables))
    if policy == "mixed_float16":
        # Dynamic scaling: an overflowing step is skipped and halves the
        # scale (from 2**15); most steps are applied.
        scales = [float(m["loss_scale"]) for m in metrics]
        applied = [float(m["finite"]) for m in metrics]
        assert all(np.log2(s).is_integer() and s <= 2.0**15 for s in scales)
        assert sum(applied) >= 5
        for scale, previous, finite in zip(scales, [2.0**15, *scales], applied):
            assert scale == (previous if finite else previous / 2)
    else:
        assert step.loss_scale is None and "loss_scale" not in metrics[0]


def test_float16_overflow_skips_the_update_and_halves_the_scale(
    make_mirrored_strategy,
):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    _, _, step = _setup(strategy, mixed_precision="mixed_float16")
    step.loss_scale.scale.assign(1e38)  # the scaled gradients overflow
    before = _values(step.variables)
    metrics = step(next(_distributed(strategy, [_batch(4)])))
    assert float(metrics["finite"]) == 0.0
    assert float(metrics["loss_scale"]) == pytest.approx(5e37)
    assert np.isfinite(float(metrics["loss/total"]))
    for start, after in zip(before, _values(step.variables)):
        np.testing.assert_array_equal(start, after)
    assert int(step.loss_scale.skipped_steps.numpy()) == 1
    assert int(step.encoder_optimizer.iterations.numpy()) == 0


def test_dynamic_loss_scale_rule():
    scale = DynamicLossScale(initial_scale=8.0, growth_steps=2)
    history = []
    for finite in (True, True, True, False, False, True):
        scale.update(tf.constant(finite))
        history.append(float(scale.scale.numpy()))
    assert history == [8.0, 16.0, 16.0, 8.0, 4.0, 4.0]
    assert int(scale.skipped_steps.numpy()) == 2
    one = DynamicLossScale(initial_scale=1.0)
    one.update(tf.constant(False))
    assert float(one.scale.numpy()) == 1.0  # never below 1
    with pytest.raises(ValueError, match="initial_scale"):
        DynamicLossScale(initial_scale=0.5)


def test_two_replicas_match_one_on_the_same_global_batch(
    make_mirrored_strategy,
):
    """Synchronised BatchNorm and replica-sum losses: 2 replicas on a
    global batch give the 1-replica weights, and identical copies."""
    batches = [_batch(10 + i) for i in range(2)]
    results = {}
    for devices in (ONE_DEVICE, TWO_DEVICES):
        strategy = make_mirrored_strategy(devices)
        model, _, step = _setup(strategy)
        for batch in _distributed(strategy, batches):
            metrics = step(batch)
        for variable in model.variables:
            copies = [
                np.array(x.numpy())
                for x in strategy.experimental_local_results(variable.value)
            ]
            assert len(copies) == len(devices)
            assert all(np.array_equal(copies[0], c) for c in copies[1:])
        results[len(devices)] = (
            _values(model.variables),
            float(metrics["loss/total"]),
        )
    for one, two in zip(results[1][0], results[2][0]):
        np.testing.assert_allclose(one, two, rtol=1e-4, atol=2e-6)
    assert results[1][1] == pytest.approx(results[2][1], rel=1e-5)


def test_xla_compiles_the_whole_step_on_one_replica_and_refuses_two_cpus(
    make_mirrored_strategy,
):
    results = []
    for jit in (False, True):
        strategy = make_mirrored_strategy(ONE_DEVICE)
        model, _, step = _setup(strategy, jit_compile=jit)
        assert step.xla == ("step" if jit else "off")
        for batch in _distributed(strategy, [_batch(5)] * 2):
            metrics = step(batch)
        results.append((_values(model.trainable_variables), metrics))
    for plain, compiled in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(plain, compiled, rtol=1e-3, atol=1e-5)
    assert float(results[0][1]["loss/total"]) == pytest.approx(
        float(results[1][1]["loss/total"]), rel=1e-4
    )
    two = make_mirrored_strategy(TWO_DEVICES)
    with pytest.raises(ValueError, match="merge_call"):
        xla_mode(two, True)
    assert xla_mode(two, False) == "off"


def test_requires_a_built_network_with_stems_and_encoders(
    make_mirrored_strategy,
):
    strategy = make_mirrored_strategy(ONE_DEVICE)
    config = tiny_config()
    with strategy.scope():
        loss = NPPNetLoss(config.loss)
        unbuilt = keras.Sequential([keras.layers.Dense(2)])
        with pytest.raises(ValueError, match="build the network"):
            TrainStep(unbuilt, loss, config.train, strategy)
        plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        with pytest.raises(ValueError, match="has no `pose_stem`"):
            TrainStep(plain, loss, config.train, strategy)


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy", ["float32", "mixed_bfloat16", "mixed_float16"]
)
def test_real_nppnet_steps_under_each_policy(make_mirrored_strategy, policy):
    """The tiny NPPNet (C = 8, 4 cells): float32 loss, finite gradients and
    a lower loss after a few steps on one batch, under each policy."""
    strategy = make_mirrored_strategy(ONE_DEVICE)
    model, _, step = _setup(
        strategy, builder=build_network, mixed_precision=policy, network=None
    )
    metrics = [step(batch) for batch in _distributed(strategy, [_batch(6)] * 5)]
    losses = [float(m["loss/total"]) for m in metrics]
    assert all(m["loss/total"].dtype == tf.float32 for m in metrics)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(np.isfinite(v).all() for v in _values(model.variables))


@pytest.mark.slow
def test_real_nppnet_two_replicas_match_one(make_mirrored_strategy):
    results = {}
    for devices in (ONE_DEVICE, TWO_DEVICES):
        strategy = make_mirrored_strategy(devices)
        model, _, step = _setup(strategy, builder=build_network, network=None)
        step(next(_distributed(strategy, [_batch(7)])))
        results[len(devices)] = _values(model.variables)
    # Adam's first step moves every weight by about its learning rate times
    # sign(gradient), so a weight whose gradient is float noise can land a
    # whole step apart on one and two replicas (reduction order differs).
    # Such weights must be rare (measured: 0.26% of the weights; 1% allowed)
    # and at most two steps (2 * 3e-3) apart.
    mismatched = total = 0
    for one, two in zip(results[1], results[2]):
        np.testing.assert_allclose(one, two, rtol=0, atol=2 * 3e-3 + 1e-5)
        close = np.isclose(one, two, rtol=1e-3, atol=1e-5)
        mismatched += int((~close).sum())
        total += close.size
    assert mismatched <= total // 100, (mismatched, total)
