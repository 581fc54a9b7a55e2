"""Tests of the per-epoch MultiStep schedule."""

import pytest

from nppnet_tf.training.optimizers import TorchAdam
from nppnet_tf.training.schedules import apply_learning_rates, multistep_factor


@pytest.mark.parametrize(
    "epoch, factor",
    [(0, 1.0), (69, 1.0), (70, 0.2), (99, 0.2), (100, 0.04), (119, 0.04)],
)
def test_multistep_matches_pytorch_multisteplr_per_epoch(epoch, factor):
    # torch MultiStepLR(milestones=[70, 100], gamma=0.2) after `epoch` steps.
    assert multistep_factor(epoch, (70, 100), 0.2) == pytest.approx(factor)


def test_apply_learning_rates_assigns_every_group():
    weights, lambdas = TorchAdam(1e-3, name="w"), TorchAdam(1e-4, name="l")
    rates = apply_learning_rates(
        [(weights, 1e-3), (lambdas, 1e-4)], 100, (70, 100), 0.2
    )
    assert rates == pytest.approx({"w": 4e-5, "l": 4e-6})
    assert float(weights.learning_rate) == pytest.approx(4e-5)
    assert float(lambdas.learning_rate) == pytest.approx(4e-6)
    apply_learning_rates({weights: 1e-3}, 0, (70, 100), 0.2)
    assert float(weights.learning_rate) == pytest.approx(1e-3)


def test_bad_epochs_and_milestones_fail():
    with pytest.raises(ValueError, match="epoch"):
        multistep_factor(-1, (70,), 0.2)
    with pytest.raises(ValueError, match="increase"):
        multistep_factor(3, (100, 70), 0.2)
