"""The NPPNet training loss (reference NPPNET.md section 4).

Per forward stage t (1 and 2):

* pose `J_t = MSE(pose, heatmaps) + MSE(pose_aux, heatmaps_aux)`, each the
  mean over every batch x pixel x joint element (no 1/2, no target weight);
* parsing `K_t = OHEM_CE(up(parsing), labels) + WCE(up(edge), edges)`, the
  logits upsampled to the label size with bilinear align_corners=True;

and the total `sum_t exp(-a_t) J_t + a_t + exp(-b_t) K_t + b_t` with four
learnable lambdas (`UncertaintyWeights`).

Distribution semantics. Every value this module returns is a *replica
contribution*: summed over the replicas of a `tf.distribute` strategy it gives
the loss of the whole global batch, so summing the replicas' gradients (what
optimizers do under `MirroredStrategy`) gives the gradient of the global loss,
whatever the number of replicas. Means divide local sums by global counts
(`all_reduce`), the OHEM threshold is chosen over the global batch
(`all_gather`), the edge class balance is counted over the global batch, and
each lambda regulariser is added as `lambda / num_replicas`. A training step
must therefore not divide the loss by the number of replicas again. Outside
any strategy the default replica context makes all of this the plain loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from nppnet_tf.config import LossConfig
from nppnet_tf.lip import CLASS_WEIGHTS, IGNORE_LABEL, NUM_CLASSES

STAGES = (1, 2)

# Model output keys of each stage (stage 2 carries the plain names).
_OUTPUT_KEYS = {
    1: ("pose_stage1", "pose_aux_stage1", "parsing_stage1", "edge_stage1"),
    2: ("pose", "pose_aux", "parsing", "edge"),
}
_TARGET_KEYS = ("heatmaps", "heatmaps_aux", "parsing", "edge")


def _replica_context() -> tf.distribute.ReplicaContext:
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            "NPPNet losses must run in a replica context: call them inside "
            "strategy.run(...) (or outside any strategy scope), not directly "
            "in a strategy's cross-replica context."
        )
    return context


def _global_sum(value: tf.Tensor) -> tf.Tensor:
    """Sum of a float32 statistic over all replicas (no gradient)."""
    value = tf.stop_gradient(tf.cast(value, tf.float32))
    context = _replica_context()
    if context.num_replicas_in_sync == 1:
        # No synchronisation point on one replica, so that the loss can run
        # inside a nested tf.function (`search.shared_gradients`).
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _num_replicas() -> int:
    return _replica_context().num_replicas_in_sync


def resize_bilinear_align_corners(
    images: tf.Tensor, size: Sequence[int]
) -> tf.Tensor:
    """Bilinear resize with PyTorch's `align_corners=True` (reference 0.5).

    The corner pixels of input and output coincide: output row `o` samples
    input row `o * (in - 1) / (out - 1)` (row 0 when `out == 1`), the same for
    columns. `tf.image.resize` only has half-pixel centres, hence the raw op
    (the one `tf.compat.v1.image.resize_bilinear` calls, without its
    deprecation warning).

    Args:
        images: `(batch, height, width, channels)` float tensor.
        size: `(out_height, out_width)`.

    Returns:
        `(batch, out_height, out_width, channels)` float32 tensor.
    """
    images = tf.cast(images, tf.float32)
    return tf.raw_ops.ResizeBilinear(
        images=images,
        size=tf.cast(size, tf.int32),
        align_corners=True,
        half_pixel_centers=False,
    )


def _same_static_size(images: tf.Tensor, reference: tf.Tensor) -> bool:
    """True if both spatial sizes are statically known and equal (resizing
    to the same size is the identity, so unknown sizes just resize)."""
    sizes = (tuple(images.shape[1:3]), tuple(reference.shape[1:3]))
    return None not in sizes[0] and sizes[0] == sizes[1]


def pose_mse(heatmaps: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Mean squared error of heatmaps over all batch x pixel x joint elements.

    If the spatial sizes differ the prediction is resized bilinearly (half-pixel
    centres, as PyTorch's default) to the target size first (reference 4.1).

    Args:
        heatmaps: `(batch, height, width, joints)` predicted heatmaps.
        targets: `(batch, height', width', joints)` target heatmaps.

    Returns:
        Scalar replica contribution: the local sum of squared errors divided
        by the global element count.
    """
    heatmaps = tf.cast(heatmaps, tf.float32)
    targets = tf.cast(targets, tf.float32)
    if not _same_static_size(heatmaps, targets):
        heatmaps = tf.image.resize(heatmaps, tf.shape(targets)[1:3], "bilinear")
    squared = tf.reduce_sum(tf.square(heatmaps - targets))
    count = _global_sum(tf.size(targets))
    return squared / tf.maximum(count, 1.0)


def _check_labels(labels: tf.Tensor, num_classes: int, name: str) -> tf.Tensor:
    labels = tf.cast(labels, tf.int32)
    allowed = ((labels >= 0) & (labels < num_classes)) | (
        labels == IGNORE_LABEL
    )
    check = tf.debugging.assert_equal(
        tf.reduce_all(allowed),
        True,
        message=f"{name} labels must be in [0, {num_classes}) or {IGNORE_LABEL}",
    )
    with tf.control_dependencies([check]):
        return tf.identity(labels)


def _upsample_to_labels(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    logits = tf.cast(logits, tf.float32)
    if _same_static_size(logits, labels):
        return logits
    return resize_bilinear_align_corners(logits, tf.shape(labels)[1:3])


def ohem_threshold(
    probabilities: tf.Tensor,
    valid: tf.Tensor,
    threshold: float,
    min_kept: int,
) -> tf.Tensor:
    """The OHEM probability threshold over the global batch (reference 4.2).

    `max(p_sorted[min(min_kept, n - 1)], threshold)` where `p_sorted` are the
    ground-truth probabilities of the `n` valid pixels of all replicas in
    ascending order. Each replica contributes only its `min_kept + 1` smallest
    values, which always contain the global order statistic.

    Args:
        probabilities: float32 ground-truth probability of every local pixel.
        valid: bool, same shape: the pixel is not ignored.
        threshold: the fixed probability threshold (0.9 in the paper).
        min_kept: number of hardest pixels always kept, counted over the
            global batch.

    Returns:
        Scalar float32 threshold (no gradient); `threshold` if no pixel of
        the global batch is valid.
    """
    probabilities = tf.stop_gradient(tf.reshape(probabilities, [-1]))
    valid = tf.reshape(valid, [-1])
    candidates = tf.where(valid, probabilities, float("inf"))
    local_k = tf.minimum(min_kept + 1, tf.size(candidates))
    smallest = -tf.math.top_k(-candidates, k=local_k, sorted=False).values
    context = _replica_context()
    gathered = (
        smallest
        if context.num_replicas_in_sync == 1
        else context.all_gather(smallest, axis=0)
    )
    # The sentinel keeps the gather non-empty when the global batch has no pixel.
    gathered = tf.sort(tf.concat([gathered, [float("inf")]], axis=0))
    num_valid = tf.cast(
        _global_sum(tf.reduce_sum(tf.cast(valid, tf.float32))), tf.int32
    )
    index = tf.maximum(tf.minimum(min_kept, num_valid - 1), 0)
    kth = tf.where(num_valid > 0, gathered[index], threshold)
    return tf.maximum(kth, threshold)


def ohem_cross_entropy(
    logits: tf.Tensor,
    labels: tf.Tensor,
    class_weights: Sequence[float] = CLASS_WEIGHTS,
    threshold: float = 0.9,
    min_kept: int = 131072,
) -> tf.Tensor:
    """Class-weighted online hard example mining cross-entropy (reference 4.2).

    Pixel loss `w[y] * -log softmax(logits)[y]`; pixels labelled 255 are
    ignored; of the rest, only pixels whose ground-truth probability is below
    `ohem_threshold(...)` are kept, and the loss is the plain mean of their
    weighted pixel losses (not normalised by the weights). Selection is over
    the global batch (see the module docstring); with no kept pixel the loss
    is 0 (the authors' code would produce NaN or fail).

    Args:
        logits: `(batch, height, width, classes)` logits at label size (use
            `resize_bilinear_align_corners` first).
        labels: `(batch, height, width)` int labels, 255 = ignore.
        class_weights: one weight per class.
        threshold: the fixed probability threshold.
        min_kept: minimum kept pixels over the global batch.

    Returns:
        Scalar replica contribution: local kept loss sum / global kept count.
    """
    logits = tf.cast(logits, tf.float32)
    num_classes = len(class_weights)
    labels = _check_labels(labels, num_classes, "parsing")
    valid = labels != IGNORE_LABEL
    safe_labels = tf.where(valid, labels, 0)
    pixel_losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=safe_labels, logits=logits
    )
    weights = tf.gather(tf.constant(class_weights, tf.float32), safe_labels)
    pixel_losses = weights * pixel_losses
    probabilities = tf.gather(
        tf.nn.softmax(logits, axis=-1), safe_labels[..., None], batch_dims=3
    )[..., 0]
    cut = ohem_threshold(probabilities, valid, threshold, min_kept)
    kept = valid & (tf.stop_gradient(probabilities) < cut)
    kept_sum = tf.reduce_sum(tf.where(kept, pixel_losses, 0.0))
    kept_count = _global_sum(tf.reduce_sum(tf.cast(kept, tf.float32)))
    return kept_sum / tf.maximum(kept_count, 1.0)


def balanced_edge_cross_entropy(
    logits: tf.Tensor, labels: tf.Tensor
) -> tf.Tensor:
    """Two-class edge cross-entropy balanced per batch (reference 4.2).

    With `n0` non-edge and `n1` edge pixels in the global batch (255 ignored),
    class weights are `n1 / (n0 + n1)` for non-edge and `n0 / (n0 + n1)` for
    edge, and the loss is the weighted mean `sum w_y l / sum w_y`. A batch
    without edge pixels (or without non-edge pixels) has all weight zero; the
    loss is then 0 instead of PyTorch's NaN.

    Args:
        logits: `(batch, height, width, 2)` logits at label size.
        labels: `(batch, height, width)` int, 0 non-edge, 1 edge, 255 ignore.

    Returns:
        Scalar replica contribution: local weighted sum / global weight sum.
    """
    logits = tf.cast(logits, tf.float32)
    labels = _check_labels(labels, 2, "edge")
    valid = labels != IGNORE_LABEL
    safe_labels = tf.where(valid, labels, 0)
    edge_count = _global_sum(tf.reduce_sum(tf.cast(labels == 1, tf.float32)))
    non_edge_count = _global_sum(
        tf.reduce_sum(tf.cast(labels == 0, tf.float32))
    )
    total = tf.maximum(edge_count + non_edge_count, 1.0)
    class_weights = tf.stack([edge_count / total, non_edge_count / total])
    weights = tf.where(valid, tf.gather(class_weights, safe_labels), 0.0)
    pixel_losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=safe_labels, logits=logits
    )
    weighted_sum = tf.reduce_sum(weights * pixel_losses)
    weight_total = _global_sum(tf.reduce_sum(weights))
    return tf.math.divide_no_nan(weighted_sum, weight_total)


@keras.saving.register_keras_serializable(package="nppnet")
class UncertaintyWeights(keras.layers.Layer):
    """The four learnable loss weights `lambda` (reference 4.3).

    `exp(-lambda) * L + lambda` per task and stage: `lambda = log sigma^2` of
    Kendall, Gal and Cipolla (CVPR 2018) without their 1/2 factors, as the
    authors code it. The training loop gives `trainable_variables` their own
    optimiser (lr 1e-4, no weight decay).

    Args:
        pose_init: float. Initial pose lambdas (-2.5: weight e^2.5).
        parsing_init: float. Initial parsing lambdas (2.3: weight e^-2.3).
        num_stages: int. Forward stages, one lambda per task and stage.

    Call arguments:
        pose_losses: `(num_stages,)` pose losses `J_t`.
        parsing_losses: `(num_stages,)` parsing losses `K_t`.
        regulariser_scale: float multiplying each `lambda` term; the loss
            passes `1 / num_replicas` so that the replica sum counts each
            lambda once.

    Returns:
        `(pose, parsing)`: the weighted sums over stages, scalars.
    """

    def __init__(
        self,
        pose_init: float = -2.5,
        parsing_init: float = 2.3,
        num_stages: int = 2,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}.")
        self.pose_init = float(pose_init)
        self.parsing_init = float(parsing_init)
        self.num_stages = num_stages
        self.pose_lambdas = self.add_weight(
            shape=(num_stages,),
            initializer=keras.initializers.Constant(self.pose_init),
            name="pose_lambdas",
        )
        self.parsing_lambdas = self.add_weight(
            shape=(num_stages,),
            initializer=keras.initializers.Constant(self.parsing_init),
            name="parsing_lambdas",
        )
        self.built = True

    def call(self, pose_losses, parsing_losses, regulariser_scale=1.0):
        pose = keras.ops.sum(
            keras.ops.exp(-self.pose_lambdas) * pose_losses
            + self.pose_lambdas * regulariser_scale
        )
        parsing = keras.ops.sum(
            keras.ops.exp(-self.parsing_lambdas) * parsing_losses
            + self.parsing_lambdas * regulariser_scale
        )
        return pose, parsing

    def get_config(self):
        return {
            **super().get_config(),
            "pose_init": self.pose_init,
            "parsing_init": self.parsing_init,
            "num_stages": self.num_stages,
        }


class NPPNetLoss:
    """The whole NPPNet loss: both tasks, both stages, uncertainty weighted.

    Create it inside the distribution strategy's scope (the lambdas are
    variables) and call it inside the replica function (`strategy.run`) or
    with no strategy at all.

    Args:
        config: `LossConfig` (OHEM threshold and min kept, lambda inits).
            `ohem_min_kept` counts pixels of the global batch, all replicas
            together (the authors count per GPU; see docs/evaluation.md).
        class_weights: parsing class weights, LIP's by default.

    Attributes:
        uncertainty: the `UncertaintyWeights` layer holding the 4 lambdas.
    """

    def __init__(
        self,
        config: LossConfig | None = None,
        class_weights: Sequence[float] = CLASS_WEIGHTS,
    ):
        self.config = config if config is not None else LossConfig()
        if len(class_weights) != NUM_CLASSES:
            raise ValueError(
                f"class_weights must have {NUM_CLASSES} entries, got {len(class_weights)}."
            )
        self.class_weights = tuple(float(w) for w in class_weights)
        self.uncertainty = UncertaintyWeights(
            pose_init=self.config.pose_lambda_init,
            parsing_init=self.config.parsing_lambda_init,
            num_stages=len(STAGES),
            name="uncertainty_weights",
        )

    def __call__(
        self,
        targets: Mapping[str, tf.Tensor],
        outputs: Mapping[str, tf.Tensor],
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Computes the loss of one (replica) batch.

        Args:
            targets: `heatmaps`, `heatmaps_aux` `(batch, h, w, 16)`, `parsing`
                and `edge` `(batch, H, W)` int with 255 = ignore.
            outputs: the model's dict: `pose`, `pose_aux`, `parsing`, `edge`
                and their `_stage1` versions.

        Returns:
            `(total, components)`: the total replica contribution and a dict
            of every term, each also a replica contribution (reduce them with
            `ReduceOp.SUM` to log global values): `pose_heatmap_stage{t}`,
            `pose_aux_stage{t}`, `pose_stage{t}` (J_t), `parsing_ohem_stage{t}`,
            `edge_stage{t}`, `parsing_stage{t}` (K_t), `pose` and `parsing`
            (uncertainty weighted, with regulariser) and `total`.

        Raises:
            KeyError: a target or output is missing.
        """
        _require(targets, _TARGET_KEYS, "targets")
        _require(
            outputs, [k for s in STAGES for k in _OUTPUT_KEYS[s]], "outputs"
        )
        components: dict[str, tf.Tensor] = {}
        pose_losses, parsing_losses = [], []
        for stage in STAGES:
            pose_key, aux_key, parsing_key, edge_key = _OUTPUT_KEYS[stage]
            heatmap = pose_mse(outputs[pose_key], targets["heatmaps"])
            aux = pose_mse(outputs[aux_key], targets["heatmaps_aux"])
            ohem = ohem_cross_entropy(
                _upsample_to_labels(outputs[parsing_key], targets["parsing"]),
                targets["parsing"],
                self.class_weights,
                self.config.ohem_threshold,
                self.config.ohem_min_kept,
            )
            edge = balanced_edge_cross_entropy(
                _upsample_to_labels(outputs[edge_key], targets["edge"]),
                targets["edge"],
            )
            components[f"pose_heatmap_stage{stage}"] = heatmap
            components[f"pose_aux_stage{stage}"] = aux
            components[f"pose_stage{stage}"] = heatmap + aux
            components[f"parsing_ohem_stage{stage}"] = ohem
            components[f"edge_stage{stage}"] = edge
            components[f"parsing_stage{stage}"] = ohem + edge
            pose_losses.append(heatmap + aux)
            parsing_losses.append(ohem + edge)
        pose, parsing = self.uncertainty(
            tf.stack(pose_losses),
            tf.stack(parsing_losses),
            regulariser_scale=1.0 / _num_replicas(),
        )
        components["pose"] = pose
        components["parsing"] = parsing
        components["total"] = pose + parsing
        return components["total"], components


def _require(
    mapping: Mapping[str, tf.Tensor], keys: Sequence[str], what: str
) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise KeyError(f"{what} lack {missing}; got keys {sorted(mapping)}")
