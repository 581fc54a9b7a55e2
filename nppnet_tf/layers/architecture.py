"""Architecture parameters of one search space: `alphas` and `betas`.

A search space (named after the genotype field it decides, e.g.
`encoder_parsing_to_pose` or `pose_fusion`) has one row per candidate edge,
grouped by target node in the order of reference NPPNET.md 3.1. `alphas`
(rows x ops) weight the candidate ops of each edge; `betas` (rows) weight the
edges of each node ("edge normalisation", PC-DARTS; reference 3.2). Both
start at 1e-3 (reference 0.6), so every softmax starts uniform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
from keras import ops

INITIAL_VALUE = 1e-3


def edge_normalization(betas, node_sizes: Sequence[int]):
    """Softmax of `betas` within each node's slice (reference 3.2).

    Args:
        betas: `(sum(node_sizes),)` tensor.
        node_sizes: int per target node, its number of incoming edges.

    Returns:
        `(sum(node_sizes),)` tensor whose slices each sum to 1.
    """
    parts, start = [], 0
    for size in node_sizes:
        node_betas = betas[start : start + size]
        if size == 1:  # a single incoming edge always has weight 1
            parts.append(ops.ones_like(node_betas))
        else:
            parts.append(ops.softmax(node_betas, axis=-1))
        start += size
    return ops.concatenate(parts, axis=0)


@keras.saving.register_keras_serializable(package="nppnet")
class ArchitectureWeights(keras.layers.Layer):
    """`alphas` and `betas` of one search space (reference 3.1, 3.2).

    The variables are ordinary trainable Keras variables, created in the
    constructor: under a `tf.distribute` strategy scope they are mirrored
    like every other weight. They carry no regulariser.

    Args:
        node_sizes: sequence of int. Incoming candidate edges of each target
            node, in row order (e.g. `[1, 2, 3, 4]` for the encoder
            interaction, `[2, 3, 4, 5]` for a DARTS cell).
        primitives: sequence of str. Candidate ops, the column order.
        initial_value: float. Starting value of every alpha and beta.

    Returns (methods):
        `op_weights()`: `(rows, len(primitives))` row-wise softmax of alphas.
        `edge_weights()`: `(rows,)` per-node softmax of betas.
    """

    def __init__(
        self,
        node_sizes: Sequence[int],
        primitives: Sequence[str],
        initial_value: float = INITIAL_VALUE,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not node_sizes or any(size < 1 for size in node_sizes):
            raise ValueError(
                f"node_sizes must be positive ints, got {list(node_sizes)!r}."
            )
        if not primitives:
            raise ValueError("primitives must not be empty.")
        self.node_sizes = tuple(int(size) for size in node_sizes)
        self.primitives = tuple(primitives)
        self.initial_value = float(initial_value)
        rows = sum(self.node_sizes)
        constant = keras.initializers.Constant(self.initial_value)
        self.alphas = self.add_weight(
            shape=(rows, len(self.primitives)),
            initializer=constant,
            name="alphas",
        )
        self.betas = self.add_weight(
            shape=(rows,), initializer=constant, name="betas"
        )
        self.built = True

    @property
    def rows(self) -> int:
        return sum(self.node_sizes)

    def node_slices(self) -> list[tuple[int, int]]:
        """`(start, end)` rows of every target node."""
        slices, start = [], 0
        for size in self.node_sizes:
            slices.append((start, start + size))
            start += size
        return slices

    def op_weights(self):
        return ops.softmax(self.alphas, axis=-1)

    def edge_weights(self):
        return edge_normalization(self.betas, self.node_sizes)

    def call(self, inputs=None):
        return self.op_weights(), self.edge_weights()

    def get_config(self):
        return {
            **super().get_config(),
            "node_sizes": list(self.node_sizes),
            "primitives": list(self.primitives),
            "initial_value": self.initial_value,
        }


def architecture_arrays(
    spaces: Mapping[str, ArchitectureWeights],
) -> dict[str, np.ndarray]:
    """`{"<space>/alphas", "<space>/betas", "<space>/ops"}` of every space,
    as numpy (the layout of `search/architecture_file.py`)."""
    arrays = {}
    for name, space in spaces.items():
        arrays[f"{name}/alphas"] = np.asarray(
            ops.convert_to_numpy(space.alphas), np.float32
        )
        arrays[f"{name}/betas"] = np.asarray(
            ops.convert_to_numpy(space.betas), np.float32
        )
        arrays[f"{name}/ops"] = np.array(space.primitives)
    return arrays


def assign_architecture(
    spaces: Mapping[str, ArchitectureWeights], arrays: Mapping[str, np.ndarray]
) -> None:
    """Assigns every space's alphas and betas from `arrays`.

    Raises:
        ValueError: on a missing key, a shape mismatch or, when `arrays` has
            `<space>/ops`, other ops than the space's.
    """
    for name, space in spaces.items():
        for key in (f"{name}/alphas", f"{name}/betas"):
            if key not in arrays:
                raise ValueError(f"arrays has no {key!r}.")
        ops_key = f"{name}/ops"
        if ops_key in arrays:
            given = tuple(str(op) for op in np.asarray(arrays[ops_key]))
            if given != space.primitives:
                raise ValueError(
                    f"{ops_key} = {list(given)} differs from the model's "
                    f"{list(space.primitives)}."
                )
        for variable, key in ((space.alphas, "alphas"), (space.betas, "betas")):
            value = np.asarray(arrays[f"{name}/{key}"], dtype=np.float32)
            if value.shape != tuple(variable.shape):
                raise ValueError(
                    f"{name}/{key} has shape {value.shape}, expected "
                    f"{tuple(variable.shape)}."
                )
            variable.assign(value)
