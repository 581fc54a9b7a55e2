"""Tests of the parsing scores against hand values and straightforward
re-implementations of the two reference definitions."""

import math

import numpy as np
import pytest

from nppnet_tf.lip import CLASS_NAMES
from nppnet_tf.metrics import mean_iou as scores


def test_hand_computed_three_class_matrix():
    # rows ground truth: class 0 has 3 pixels, class 1 has 2, class 2 none.
    confusion = np.array([[2, 1, 0], [0, 2, 0], [0, 0, 0]])
    # IoU0 = 2 / (3 + 2 - 2) = 2/3; IoU1 = 2 / (2 + 3 - 2) = 2/3; class 2 absent.
    np.testing.assert_allclose(
        scores.per_class_iou(confusion), [2 / 3, 2 / 3, 0.0]
    )
    assert scores.mean_iou(confusion) == pytest.approx(4 / 9)
    assert scores.mean_iou_present_classes(confusion) == pytest.approx(2 / 3)
    assert scores.pixel_accuracy(confusion) == pytest.approx(4 / 5)
    np.testing.assert_allclose(
        scores.per_class_accuracy(confusion),
        [2 / 3, 1.0, np.nan],
        equal_nan=True,
    )
    assert scores.mean_accuracy(confusion) == pytest.approx(5 / 6)
    assert scores.frequency_weighted_iou(confusion) == pytest.approx(
        3 / 5 * 2 / 3 + 2 / 5 * 2 / 3
    )


def test_unpredicted_pixels_count_as_misses():
    confusion = np.array([[2, 0], [0, 2]])
    unpredicted = np.array([0, 2])
    # class 1: gt 4, pred 2, tp 2 -> IoU 1/2; pixel accuracy 4/6.
    np.testing.assert_allclose(
        scores.per_class_iou(confusion, unpredicted), [1.0, 0.5]
    )
    assert scores.pixel_accuracy(confusion, unpredicted) == pytest.approx(4 / 6)
    assert scores.mean_accuracy(confusion, unpredicted) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unpredicted must have shape"):
        scores.mean_iou(confusion, np.array([1, 2, 3]))


def test_empty_matrix_gives_nan_not_warnings():
    confusion = np.zeros((20, 20))
    with np.errstate(all="raise"):
        assert scores.mean_iou(confusion) == 0.0
        assert math.isnan(scores.mean_iou_present_classes(confusion))
        assert math.isnan(scores.pixel_accuracy(confusion))
        assert math.isnan(scores.mean_accuracy(confusion))
        assert math.isnan(scores.frequency_weighted_iou(confusion))


def official_calc_miou(hist):
    """The official calc_miou.py formulas, straight."""
    with np.errstate(divide="ignore", invalid="ignore"):
        correct = np.diag(hist)
        gt = hist.sum(1)
        iou = correct / (gt + hist.sum(0) - correct)
        freq = gt / hist.sum()
        return {
            "pixel_accuracy": correct.sum() / hist.sum(),
            "mean_accuracy": np.nanmean(correct / gt),
            "mean_iou_present_classes": np.nanmean(iou),
            "frequency_weighted_iou": (freq[freq > 0] * iou[freq > 0]).sum(),
        }


def validation_miou(hist):
    """The authors' training-time validation formula (reference 7.1)."""
    tp = np.diag(hist)
    return np.mean(tp / np.maximum(1.0, hist.sum(1) + hist.sum(0) - tp))


@pytest.mark.parametrize("seed", range(5))
def test_random_matrices_with_empty_classes_match_references(seed):
    rng = np.random.default_rng(seed)
    confusion = rng.integers(0, 50, size=(20, 20)) * (
        rng.uniform(size=(20, 20)) < 0.3
    )
    empty = rng.choice(20, size=3, replace=False)
    confusion[empty, :] = 0
    confusion[:, empty[:2]] = (
        0  # two classes absent from both, one predicted only
    )
    result = scores.parsing_scores(confusion)
    reference = official_calc_miou(confusion.astype(float))
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, rel=1e-12), key
    assert result["mean_iou"] == pytest.approx(validation_miou(confusion))
    assert set(result["absent_classes"]) == {CLASS_NAMES[i] for i in empty[:2]}
    assert result["pixels"] == confusion.sum()
    assert list(result["per_class_iou"]) == list(CLASS_NAMES)


def test_parsing_scores_checks_class_names():
    with pytest.raises(ValueError, match="3 class names"):
        scores.parsing_scores(np.eye(2), class_names=("a", "b", "c"))
