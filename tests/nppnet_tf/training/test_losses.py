"""Tests of the NPPNet loss: hand-computed terms, numpy references and the
1- vs 2-replica equivalence under MirroredStrategy."""

import math

import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.config import LossConfig
from nppnet_tf.lip import CLASS_WEIGHTS
from nppnet_tf.training import losses

# ---------------------------------------------------------------- references


def align_corners_matrix(in_size, out_size):
    """W[o, i] = max(0, 1 - |o (in - 1) / (out - 1) - i|)."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    source = np.arange(out_size)[:, None] * scale
    return np.maximum(0.0, 1.0 - np.abs(source - np.arange(in_size)[None, :]))


def numpy_upsample(images, size):
    rows = align_corners_matrix(images.shape[1], size[0])
    cols = align_corners_matrix(images.shape[2], size[1])
    return np.einsum("oh,bhwc,pw->bopc", rows, images, cols)


def numpy_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def numpy_ohem(logits, labels, weights, threshold, min_kept):
    """The authors' OhemCrossEntropy.forward, step by step, in numpy."""
    probs = numpy_softmax(logits.astype(np.float64))
    flat_probs = probs.reshape(-1, probs.shape[-1])
    flat_labels = labels.reshape(-1)
    valid = flat_labels != 255
    safe = np.where(valid, flat_labels, 0)
    p = flat_probs[np.arange(len(safe)), safe]
    pixel_losses = -np.log(p) * np.asarray(weights)[safe]
    p_valid = np.sort(p[valid])
    order = np.argsort(p[valid], kind="stable")
    cut = max(p_valid[min(min_kept, len(p_valid) - 1)], threshold)
    kept = pixel_losses[valid][order][p_valid < cut]
    return kept.mean(), cut, len(kept)


def numpy_edge(logits, labels):
    probs = numpy_softmax(logits.astype(np.float64)).reshape(-1, 2)
    flat = labels.reshape(-1)
    n1, n0 = np.sum(flat == 1), np.sum(flat == 0)
    class_weights = np.array([n1, n0]) / (n0 + n1)
    valid = flat != 255
    safe = np.where(valid, flat, 0)
    pixel_losses = -np.log(probs[np.arange(len(safe)), safe])
    w = class_weights[safe] * valid
    return np.sum(w * pixel_losses) / np.sum(w)


# ---------------------------------------------------------------- terms


def test_align_corners_resize_matches_interpolation_matrices():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    for size in [(9, 17), (3, 5), (1, 2), (12, 1)]:
        got = losses.resize_bilinear_align_corners(images, size).numpy()
        np.testing.assert_allclose(got, numpy_upsample(images, size), atol=1e-5)


def test_align_corners_resize_hand_values():
    # 2 -> 3 pixels: the middle output is the average, corners are kept.
    images = np.array([0.0, 4.0], np.float32).reshape(1, 1, 2, 1)
    got = losses.resize_bilinear_align_corners(images, (1, 3)).numpy()
    np.testing.assert_allclose(got.reshape(-1), [0.0, 2.0, 4.0])


def test_pose_mse_hand_values():
    heatmaps = np.ones((2, 2, 2, 3), np.float32)
    targets = np.zeros((2, 2, 2, 3), np.float32)
    targets[0, 0, 0, 0] = 1.0  # one element right, 23 wrong by 1
    assert losses.pose_mse(heatmaps, targets).numpy() == pytest.approx(23 / 24)


def test_pose_mse_resizes_prediction_bilinearly_when_sizes_differ():
    rng = np.random.default_rng(1)
    heatmaps = rng.uniform(size=(1, 2, 2, 1)).astype(np.float32)
    targets = rng.uniform(size=(1, 4, 4, 1)).astype(np.float32)
    resized = tf.image.resize(heatmaps, (4, 4), "bilinear").numpy()
    expected = np.mean((resized - targets) ** 2)
    got = losses.pose_mse(heatmaps, targets).numpy()
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != pytest.approx(np.mean((heatmaps.mean() - targets) ** 2))


def _ohem_hand_case():
    # Two classes, one image of 1 x 5 pixels; ground-truth probabilities
    # 0.5, 0.75, 0.96, 0.2 (label 1) and one ignored pixel.
    logits = np.array(
        [[0, 0], [math.log(3), 0], [math.log(24), 0], [math.log(4), 0], [9, 0]],
        np.float32,
    ).reshape(1, 1, 5, 2)
    labels = np.array([0, 0, 0, 1, 255], np.int32).reshape(1, 1, 5)
    return logits, labels


def test_ohem_threshold_branch_hand_values():
    logits, labels = _ohem_hand_case()
    # p sorted: 0.2, 0.5, 0.75, 0.96; min_kept 1 -> 0.5 < 0.9: threshold 0.9.
    got = losses.ohem_cross_entropy(
        logits, labels, class_weights=(2.0, 1.0), threshold=0.9, min_kept=1
    )
    expected = (2 * math.log(2) + 2 * math.log(4 / 3) + math.log(5)) / 3
    assert got.numpy() == pytest.approx(expected, rel=1e-5)


def test_ohem_min_kept_branch_hand_values():
    logits, labels = _ohem_hand_case()
    # min_kept 3 -> p_sorted[3] = 0.96 > 0.6: keep p < 0.96 (three pixels).
    got = losses.ohem_cross_entropy(
        logits, labels, class_weights=(2.0, 1.0), threshold=0.6, min_kept=3
    )
    expected = (2 * math.log(2) + 2 * math.log(4 / 3) + math.log(5)) / 3
    assert got.numpy() == pytest.approx(expected, rel=1e-5)
    # min_kept 1 -> p_sorted[1] = 0.5 < 0.6: threshold 0.6 keeps 0.2 and 0.5.
    got = losses.ohem_cross_entropy(
        logits, labels, class_weights=(2.0, 1.0), threshold=0.6, min_kept=1
    )
    assert got.numpy() == pytest.approx(
        (2 * math.log(2) + math.log(5)) / 2, rel=1e-5
    )


def test_ohem_min_kept_above_pixel_count_drops_the_easiest_pixel():
    # The authors index p_sorted[min(min_kept, n - 1)] and keep p < it, so
    # the easiest pixel is dropped even when min_kept exceeds n.
    logits, labels = _ohem_hand_case()
    got = losses.ohem_cross_entropy(
        logits, labels, class_weights=(1.0, 1.0), threshold=0.1, min_kept=100
    )
    expected = (math.log(2) + math.log(4 / 3) + math.log(5)) / 3
    assert got.numpy() == pytest.approx(expected, rel=1e-5)


def test_ohem_all_ignored_is_zero_not_nan():
    logits = np.zeros((1, 2, 2, 20), np.float32)
    labels = np.full((1, 2, 2), 255, np.int32)
    assert losses.ohem_cross_entropy(logits, labels).numpy() == 0.0


def test_ohem_rejects_labels_outside_classes():
    logits = np.zeros((1, 1, 2, 20), np.float32)
    labels = np.array([[[3, 20]]], np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="parsing labels"):
        losses.ohem_cross_entropy(logits, labels)


@pytest.mark.parametrize("min_kept", [5, 300, 5000])
def test_ohem_matches_numpy_reference(min_kept):
    rng = np.random.default_rng(min_kept)
    labels = rng.integers(0, 20, size=(2, 16, 16)).astype(np.int32)
    labels[0, :3] = 255
    logits = rng.normal(scale=3.0, size=(2, 16, 16, 20)).astype(np.float32)
    # Make about half of the pixels confident so both branches can occur.
    confident = rng.uniform(size=labels.shape) < 0.5
    np.put_along_axis(
        logits, np.where(labels == 255, 0, labels)[..., None], 0.0, -1
    )
    boost = np.where(confident, 12.0, 0.0)[..., None]
    onehot = np.eye(20)[np.where(labels == 255, 0, labels)]
    logits = (logits + boost * onehot).astype(np.float32)
    expected, cut, kept = numpy_ohem(
        logits, labels, CLASS_WEIGHTS, 0.9, min_kept
    )
    got = losses.ohem_cross_entropy(logits, labels, min_kept=min_kept)
    assert got.numpy() == pytest.approx(expected, rel=1e-5)
    num_valid = int(np.sum(labels != 255))
    if min_kept == 5:  # the threshold branch
        assert cut == 0.9
    elif min_kept == 300:  # the min_kept branch
        assert cut > 0.9 and kept <= 300
    else:  # min_kept beyond the pixel count: all but the easiest pixel
        assert kept == num_valid - 1


def test_edge_hand_values():
    # Three non-edge pixels (two with loss log 2 at zero logits, one certain)
    # and one edge pixel with p = 3/4; one ignored pixel.
    logits = np.array(
        [[0, 0], [0, 0], [30, 0], [0, math.log(3)], [0, 50]], np.float32
    ).reshape(1, 1, 5, 2)
    labels = np.array([0, 0, 0, 1, 255], np.int32).reshape(1, 1, 5)
    # weights: non-edge n1/(n0+n1) = 1/4, edge n0/(n0+n1) = 3/4.
    numerator = 0.25 * 2 * math.log(2) + 0.75 * math.log(4 / 3)
    expected = numerator / (3 * 0.25 + 0.75)
    got = losses.balanced_edge_cross_entropy(logits, labels)
    assert got.numpy() == pytest.approx(expected, rel=1e-5)
    assert got.numpy() == pytest.approx(numpy_edge(logits, labels), rel=1e-5)


def test_edge_without_edge_pixels_is_zero():
    logits = np.zeros((1, 2, 2, 2), np.float32)
    labels = np.zeros((1, 2, 2), np.int32)
    assert losses.balanced_edge_cross_entropy(logits, labels).numpy() == 0.0


def test_edge_matches_numpy_reference_random():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 8, 8, 2)).astype(np.float32)
    labels = rng.choice([0, 0, 0, 1, 255], size=(2, 8, 8)).astype(np.int32)
    got = losses.balanced_edge_cross_entropy(logits, labels).numpy()
    assert got == pytest.approx(numpy_edge(logits, labels), rel=1e-5)


# ---------------------------------------------------------------- the total


def _kernels(seed=1):
    rng = np.random.default_rng(seed)
    widths = {"pose": 16, "pose_aux": 16, "parsing": 20, "edge": 2}
    kernels = {}
    for stage_suffix in ("", "_stage1"):
        for name, width in widths.items():
            scale = 3.0 if name == "parsing" else 0.3
            kernels[name + stage_suffix] = rng.normal(
                scale=scale, size=(6, width)
            ).astype(np.float32)
    return kernels


def _batch(batch=4, size=16, seed=0):
    """Targets and features; the parsing labels agree with the stage-2
    prediction on about 60% of the pixels, so many pixels are confident
    (p > 0.9) and the OHEM min_kept branch can be reached."""
    rng = np.random.default_rng(seed)
    small = size // 4
    features = rng.normal(size=(batch, small, small, 6)).astype(np.float32)
    logits = numpy_upsample(features @ _kernels()["parsing"], (size, size))
    parsing = rng.integers(0, 20, size=(batch, size, size))
    agree = rng.uniform(size=parsing.shape) < 0.6
    parsing = np.where(agree, logits.argmax(-1), parsing).astype(np.int32)
    targets = {
        "heatmaps": rng.uniform(size=(batch, small, small, 16)).astype(
            np.float32
        ),
        "heatmaps_aux": rng.uniform(size=(batch, small, small, 16)).astype(
            np.float32
        ),
        "parsing": parsing,
        "edge": rng.choice([0, 0, 0, 1], size=(batch, size, size)).astype(
            np.int32
        ),
    }
    targets["parsing"][:, :2] = 255
    targets["edge"][:, :2] = 255
    return targets, features


def _outputs(features, variables):
    return {
        name: tf.einsum("bhwf,fc->bhwc", features, kernel)
        for name, kernel in variables.items()
    }


def test_total_combines_stages_with_uncertainty_weights():
    targets, features = _batch()
    kernels = _kernels()
    outputs = {k: v.numpy() for k, v in _outputs(features, kernels).items()}
    config = LossConfig(ohem_min_kept=100)
    total, parts = losses.NPPNetLoss(config)(targets, outputs)
    expected_total = 0.0
    for stage, suffix in ((1, "_stage1"), (2, "")):
        pose = np.mean((outputs["pose" + suffix] - targets["heatmaps"]) ** 2)
        aux = np.mean(
            (outputs["pose_aux" + suffix] - targets["heatmaps_aux"]) ** 2
        )
        parsing_logits = numpy_upsample(outputs["parsing" + suffix], (16, 16))
        ohem, _, _ = numpy_ohem(
            parsing_logits, targets["parsing"], CLASS_WEIGHTS, 0.9, 100
        )
        edge = numpy_edge(
            numpy_upsample(outputs["edge" + suffix], (16, 16)), targets["edge"]
        )
        assert parts[f"pose_heatmap_stage{stage}"].numpy() == pytest.approx(
            pose, rel=1e-5
        )
        assert parts[f"pose_aux_stage{stage}"].numpy() == pytest.approx(
            aux, rel=1e-5
        )
        assert parts[f"parsing_ohem_stage{stage}"].numpy() == pytest.approx(
            ohem, rel=1e-5
        )
        assert parts[f"edge_stage{stage}"].numpy() == pytest.approx(
            edge, rel=1e-5
        )
        expected_total += math.exp(2.5) * (pose + aux) - 2.5
        expected_total += math.exp(-2.3) * (ohem + edge) + 2.3
    assert total.numpy() == pytest.approx(expected_total, rel=1e-5)
    assert parts["total"].numpy() == total.numpy()
    assert parts["pose"].numpy() + parts["parsing"].numpy() == pytest.approx(
        total.numpy()
    )


def test_missing_output_is_named():
    targets, features = _batch()
    outputs = _outputs(features, _kernels())
    del outputs["edge_stage1"]
    with pytest.raises(KeyError, match="edge_stage1"):
        losses.NPPNetLoss()(targets, outputs)


def test_uncertainty_weights_gradient_and_config_round_trip():
    layer = losses.UncertaintyWeights(pose_init=-1.0, parsing_init=0.5)
    with tf.GradientTape() as tape:
        pose, parsing = layer(tf.constant([2.0, 3.0]), tf.constant([1.0, 4.0]))
        total = pose + parsing
    grads = tape.gradient(total, [layer.pose_lambdas, layer.parsing_lambdas])
    # d/da [exp(-a) L + a] = 1 - exp(-a) L
    np.testing.assert_allclose(
        grads[0], 1 - math.e * np.array([2.0, 3.0]), rtol=1e-6
    )
    np.testing.assert_allclose(
        grads[1], 1 - math.exp(-0.5) * np.array([1.0, 4.0]), rtol=1e-6
    )
    assert len(layer.trainable_variables) == 2
    clone = losses.UncertaintyWeights.from_config(layer.get_config())
    np.testing.assert_allclose(clone.pose_lambdas.numpy(), [-1.0, -1.0])
    np.testing.assert_allclose(clone.parsing_lambdas.numpy(), [0.5, 0.5])


def test_loss_runs_inside_tf_function():
    targets, features = _batch()
    outputs = _outputs(features, _kernels())
    loss = losses.NPPNetLoss(LossConfig(ohem_min_kept=100))
    eager, _ = loss(targets, outputs)
    graph, _ = tf.function(loss.__call__)(targets, outputs)
    assert graph.numpy() == pytest.approx(eager.numpy(), rel=1e-6)


# ---------------------------------------------------------------- distribution


def mirrored_strategy(num_replicas):
    """A MirroredStrategy on logical CPUs 0..n-1 with collective keys of its
    own: strategies created in one process otherwise share group and
    instance keys, and a collective whose shape differs between two of them
    aborts with "Shape mismatch in the collective instance" (TensorFlow's own
    tests bump the same private counter)."""
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_replicas)]
    )


@pytest.fixture(scope="module")
def strategies():
    return {1: mirrored_strategy(1), 2: mirrored_strategy(2)}


def _distributed_loss_and_gradients(strategy, split, min_kept):
    """Loss and gradients of one global batch, split over replicas as `split`
    (images per replica), summed over replicas."""
    targets, features = _batch()
    starts = np.cumsum([0] + list(split))
    with strategy.scope():
        variables = {k: tf.Variable(v, name=k) for k, v in _kernels().items()}
        loss = losses.NPPNetLoss(LossConfig(ohem_min_kept=min_kept))

    def slice_for(context):
        index = context.replica_id_in_sync_group
        part = slice(starts[index], starts[index + 1])
        return {k: v[part] for k, v in targets.items()}, features[part]

    inputs = strategy.experimental_distribute_values_from_function(slice_for)
    trainable = list(variables.values()) + loss.uncertainty.trainable_variables

    @tf.function
    def step(batch):
        def replica_step(batch):
            replica_targets, replica_features = batch
            with tf.GradientTape() as tape:
                total, parts = loss(
                    replica_targets, _outputs(replica_features, variables)
                )
            grads = tape.gradient(total, trainable)
            context = tf.distribute.get_replica_context()
            return parts, context.all_reduce("sum", grads)

        parts, grads = strategy.run(replica_step, args=(batch,))
        parts = {
            k: strategy.reduce("sum", v, axis=None) for k, v in parts.items()
        }
        grads = [strategy.experimental_local_results(g)[0] for g in grads]
        return parts, grads

    parts, grads = step(inputs)
    return {k: v.numpy() for k, v in parts.items()}, [g.numpy() for g in grads]


@pytest.mark.parametrize("min_kept", [50, 2000])
def test_one_and_two_replicas_give_the_same_loss_and_gradients(
    strategies, min_kept
):
    single_parts, single_grads = _distributed_loss_and_gradients(
        strategies[1], [4], min_kept
    )
    for split in ([2, 2], [3, 1]):
        parts, grads = _distributed_loss_and_gradients(
            strategies[2], split, min_kept
        )
        for key, value in single_parts.items():
            assert value == pytest.approx(parts[key], rel=1e-5, abs=1e-6), key
        for single, double in zip(single_grads, grads, strict=True):
            np.testing.assert_allclose(single, double, rtol=1e-4, atol=1e-6)
    # min_kept 50 is the threshold branch, 2000 (of 3584 valid pixels) the
    # min_kept branch of the OHEM selection.
    targets, features = _batch()
    logits = numpy_upsample(features @ _kernels()["parsing"], (16, 16))
    _, cut, _ = numpy_ohem(
        logits, targets["parsing"], CLASS_WEIGHTS, 0.9, min_kept
    )
    assert (cut > 0.9) == (min_kept == 2000)


def test_ohem_threshold_is_global_under_two_replicas(strategies):
    # Replica 0 holds only easy pixels, replica 1 only hard ones: a per-replica
    # threshold with min_kept 2 would keep two easy pixels on replica 0; the
    # global threshold keeps the two hardest pixels of the whole batch.
    logits = np.zeros((2, 1, 4, 2), np.float32)
    logits[0, 0, :, 0] = [5.0, 6.0, 7.0, 8.0]  # easy: p near 1
    logits[1, 0, :, 0] = [-3.0, -2.0, 1.0, 2.0]  # hard
    labels = np.zeros((2, 1, 4), np.int32)
    expected, cut, kept = numpy_ohem(logits, labels, (1.0, 1.0), 0.05, 2)
    assert kept == 2 and cut > 0.05
    strategy = strategies[2]
    inputs = strategy.experimental_distribute_values_from_function(
        lambda c: (
            logits[c.replica_id_in_sync_group : c.replica_id_in_sync_group + 1],
            labels[c.replica_id_in_sync_group : c.replica_id_in_sync_group + 1],
        )
    )

    @tf.function
    def step(batch):
        value = strategy.run(
            lambda b: losses.ohem_cross_entropy(
                b[0], b[1], (1.0, 1.0), 0.05, 2
            ),
            args=(batch,),
        )
        return strategy.reduce("sum", value, axis=None)

    assert step(inputs).numpy() == pytest.approx(expected, rel=1e-5)


def test_cross_replica_context_is_refused(strategies):
    with (
        strategies[1].scope(),
        pytest.raises(RuntimeError, match="replica context"),
    ):
        losses.pose_mse(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1)))
