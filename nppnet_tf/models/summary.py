"""Parameter and multiply-add counts of NPPNet models, per part.

Parameters are read from the built model's variables. Multiply-adds are
counted like the authors' hook-based summary (reference NPPNET.md 9): every
convolution contributes `kernel elements x output positions`; they are read
from the ops of the model's forward graph traced at a given image size
(batch 1), so they are what TF actually executes. Two consequences: the
strided dilated depthwise convs of reduction cells, evaluated at stride 1 and
subsampled (reference 0.4), count at full resolution (+0.014 G for the
authors' genotype at C = 64, 384 x 384); resizes, pooling and BatchNorm are
not counted, as the authors do not count them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from nppnet_tf.layers.operations import SEConnect

# Reference 9's rows, in order; a top-level layer name minus its index is
# its part ("pose_encoder_3" -> "pose_encoder").
PARTS = (
    "stems",
    "pose_encoder",
    "parsing_encoder",
    "encoder_parsing_to_pose",
    "encoder_pose_to_parsing",
    "pose_decoder",
    "parsing_decoder",
    "decoder_parsing_to_pose",
    "decoder_pose_to_parsing",
    "projections",
    "pose_fusion",
    "parsing_fusion",
    "pose_head",
    "pose_aux_head",
    "parsing_head",
    "edge_head",
    "architecture",
)
_CONV_OPS = ("Conv2D", "DepthwiseConv2dNative")


def part_of(layer_name: str) -> str:
    """Part of reference 9 that a top-level layer (or TF scope) belongs to."""
    base = re.sub(r"(_\d+)+$", "", layer_name)
    if base in ("pose_stem", "parsing_stem"):
        return "stems"
    if base.endswith("_projection"):
        return "projections"
    if base.endswith("_architecture"):
        return "architecture"
    return base


def _count(variables: Iterable) -> int:
    return int(sum(np.prod(v.shape, dtype=np.int64) for v in variables))


def unused_batchnorm_parameters(model: keras.Model) -> int:
    """Parameters of the BatchNorm the authors' stride-1 `se_connect` owns
    but never applies (omitted here; reference 9): 2 x channels per op."""
    # `_flatten_layers` is Keras' own recursive walk; there is no public one.
    return sum(
        2 * layer.channels
        for layer in model._flatten_layers()
        if isinstance(layer, SEConnect) and layer.stride == 1
    )


def parameter_counts(model: keras.Model) -> dict:
    """Trainable, non-trainable and architecture parameters, total and per
    part. The model must be built."""
    parts = {}
    for layer in model.layers:
        part = parts.setdefault(
            part_of(layer.name), {"parameters": 0, "non_trainable": 0}
        )
        part["parameters"] += _count(layer.trainable_weights)
        part["non_trainable"] += _count(layer.non_trainable_weights)
    architecture = _count(model.architecture_variables())
    trainable = _count(model.trainable_weights)
    unused = unused_batchnorm_parameters(model)
    return {
        "trainable_parameters": trainable,
        "network_parameters": trainable - architecture,
        "architecture_parameters": architecture,
        "non_trainable_parameters": _count(model.non_trainable_weights),
        "unused_se_batchnorm_parameters": unused,
        # The authors' own count (their modules own the unused BN).
        "authors_network_parameters": trainable - architecture + unused,
        "authors_trainable_parameters": trainable + unused,
        "parts": parts,
    }


def multiply_adds(model: keras.Model, image_size: int) -> dict[str, int]:
    """Convolution multiply-adds per part for one `image_size` image.

    Traces `model(images, training=False)` once with a static
    `(1, image_size, image_size, 3)` input and sums, over every `Conv2D` and
    `DepthwiseConv2dNative` op, kernel elements x output positions (batch
    included: TF runs dilated depthwise convs on space-to-batch tensors).
    `tf` is needed here to inspect the traced graph.
    """
    if image_size < 32 or image_size % 32:
        raise ValueError(
            f"image_size must be a positive multiple of 32, got {image_size}."
        )
    top_level = {part_of(layer.name) for layer in model.layers}
    forward = tf.function(lambda images: model(images, training=False))
    spec = tf.TensorSpec([1, image_size, image_size, 3], tf.float32)
    graph = forward.get_concrete_function(spec).graph
    counts: dict[str, int] = {}
    for op in graph.get_operations():
        if op.type not in _CONV_OPS:
            continue
        kernel = np.prod(op.inputs[1].shape.as_list(), dtype=np.int64)
        output = op.outputs[0].shape.as_list()
        positions = np.prod(output[:-1], dtype=np.int64)
        part = next(
            (
                part_of(scope)
                for scope in op.name.split("/")
                if part_of(scope) in top_level
            ),
            "other",
        )
        counts[part] = counts.get(part, 0) + int(kernel * positions)
    return counts


def summarize(model: keras.Model, image_size: int) -> dict:
    """Parameters and multiply-adds, total and per part (reference 9 rows).

    The model is built for `image_size` if it is not built yet.
    """
    if not model.built:
        model.build((None, image_size, image_size, 3))
    summary = parameter_counts(model)
    macs = multiply_adds(model, image_size)
    summary["image_size"] = image_size
    summary["multiply_adds"] = int(sum(macs.values()))
    parts = summary["parts"]
    for part, value in macs.items():
        parts.setdefault(part, {"parameters": 0, "non_trainable": 0})
        parts[part]["multiply_adds"] = value
    order = {name: i for i, name in enumerate(PARTS)}
    summary["parts"] = {
        name: {"multiply_adds": 0, **parts[name]}
        for name in sorted(parts, key=lambda n: order.get(n, len(order)))
    }
    return summary
