"""Per-epoch learning-rate schedules (reference 5.4, 6.1).

The authors step PyTorch's `MultiStepLR` once per epoch: during epoch `e`
(0-based) every group runs at `base * gamma ** (number of milestones <= e)`.
Our loops assign that value to the optimisers' learning-rate variables at
the start of every epoch (`apply_learning_rates`); the variables are part
of the optimiser state, so a checkpoint taken mid-epoch restores them too.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import keras


def multistep_factor(
    epoch: int, milestones: Sequence[int], gamma: float
) -> float:
    """`gamma ** (number of milestones <= epoch)`, PyTorch's `MultiStepLR`.

    Args:
        epoch: 0-based epoch.
        milestones: increasing epochs at which the rate drops.
        gamma: the factor applied at each milestone.

    Returns:
        The factor of the base learning rate during `epoch`.

    Raises:
        ValueError: a negative epoch or milestones that do not increase.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}.")
    if list(milestones) != sorted(set(milestones)):
        raise ValueError(f"milestones must increase, got {list(milestones)}.")
    return float(gamma) ** bisect.bisect_right(list(milestones), epoch)


def apply_learning_rates(
    base_rates: Mapping[keras.optimizers.Optimizer, float]
    | Sequence[tuple[keras.optimizers.Optimizer, float]],
    epoch: int,
    milestones: Sequence[int],
    gamma: float,
) -> dict[str, float]:
    """Sets every optimiser's learning rate for `epoch` (MultiStep).

    Args:
        base_rates: `(optimizer, base learning rate)` pairs.
        epoch: 0-based epoch about to run.
        milestones: MultiStep milestones.
        gamma: MultiStep factor.

    Returns:
        `{optimizer name: learning rate}` as set.

    Raises:
        ValueError: see `multistep_factor`.
        TypeError: an optimiser built with a `LearningRateSchedule` (Keras
            cannot assign it a value).
    """
    pairs = (
        base_rates.items() if isinstance(base_rates, Mapping) else base_rates
    )
    factor = multistep_factor(epoch, milestones, gamma)
    rates = {}
    for optimizer, base in pairs:
        value = float(base) * factor
        # Assigns the optimiser's learning-rate variable (Keras raises a
        # TypeError if the optimiser was built with a schedule object).
        optimizer.learning_rate = value
        rates[optimizer.name] = value
    return rates
