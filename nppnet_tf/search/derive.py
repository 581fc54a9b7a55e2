"""Architecture parameters -> genotype (pure numpy; reference NPPNET.md 3).

Every target node (cell node, fusion node, interaction stage or step) gets
one matrix of edge weights over (source, op):
`W[j, k] = softmax(alphas[j])[k] * softmax(betas of the node's rows)[j]`,
the product of the op weights (DARTS, softmax over the row) and the edge
weights (PC-DARTS edge normalisation). `none` columns are never chosen.

* Cells and fusion cells (`top_two_edges`, reference 3.3): keep the two
  sources with the largest `max_k W[j, k]`, each with its best op, the
  stronger edge first.
* Interactions (`greedy_edges`, the supplementary's Algorithm 1 as the
  authors' `_parse3` implements it, reference 3.4): take (op, source) pairs
  in decreasing `W` until their sum reaches `threshold` or `max_edges` pairs
  are taken. Unlike the authors' code only the chosen entry is removed, so
  exact ties give distinct pairs (reference 10.3 item 2).

Ties are broken by the lowest index, sources before ops: the order numpy's
stable sorts and first-occurrence argmax give, and the order the authors'
code gives wherever it is not broken. Values are compared in float64.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from nppnet_tf.search import architecture_file
from nppnet_tf.search.architecture_file import (
    ArchitectureArrays,
    SpaceParameters,
)
from nppnet_tf.search.genotype import (
    ALL_FIELDS,
    CELL_FIELDS,
    INTERACTION_FIELDS,
    Edge,
    Genotype,
    GenotypeError,
)
from nppnet_tf.search.primitives import PARAMETER_FREE_OPS

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.7  # Algorithm 1's cumulative weight
DEFAULT_MAX_EDGES = 4  # Algorithm 1's cap on pairs per target


def softmax(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64.

    Args:
        values: array-like of numbers.
        axis: int. The axis that sums to one.

    Returns:
        A float64 array of the same shape.
    """
    values = np.asarray(values, dtype=np.float64)
    shifted = np.exp(values - values.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def edge_weight_matrix(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """The (source, op) weights of one target node (reference 3.2).

    Args:
        alphas: `(sources, ops)` raw op parameters of the node's rows.
        betas: `(sources,)` raw edge parameters of the same rows.

    Returns:
        `(sources, ops)` float64 matrix
        `softmax(alphas[j])[k] * softmax(betas)[j]`; it sums to one.

    Raises:
        ValueError: if the shapes disagree.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    if alphas.ndim != 2 or betas.shape != (alphas.shape[0],):
        raise ValueError(
            f"alphas must be (sources, ops) and betas (sources,), got "
            f"{alphas.shape} and {betas.shape}"
        )
    return softmax(alphas, axis=1) * softmax(betas)[:, None]


def _choosable(ops: tuple[str, ...]) -> np.ndarray:
    """Boolean column mask: every op except `none`."""
    mask = np.array([op != "none" for op in ops], dtype=bool)
    if not mask.any():
        raise ValueError(f"no op besides 'none' in {list(ops)}")
    return mask


def top_two_edges(weights: np.ndarray, ops: tuple[str, ...]) -> list[Edge]:
    """DARTS parse of one cell node (reference 3.3).

    Args:
        weights: `(sources, len(ops))` matrix from `edge_weight_matrix`.
        ops: tuple of str. Column names; `none` is never chosen.

    Returns:
        Two edges on two different sources (one if the node has a single
        source), strongest first; ties go to the lower source index, and
        inside a row to the lower op index.

    Raises:
        ValueError: if the shapes disagree or only `none` is available.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(ops):
        raise ValueError(
            f"weights must be (sources, {len(ops)}), got {weights.shape}"
        )
    columns = np.flatnonzero(_choosable(ops))
    candidates = weights[:, columns]
    best = candidates.argmax(axis=1)  # first maximum: lowest op index
    strength = candidates[np.arange(len(candidates)), best]
    order = np.argsort(-strength, kind="stable")[:2]  # ties: lowest source
    return [Edge(ops[columns[best[j]]], int(j)) for j in order]


def greedy_edges(
    weights: np.ndarray,
    ops: tuple[str, ...],
    threshold: float = DEFAULT_THRESHOLD,
    max_edges: int = DEFAULT_MAX_EDGES,
) -> list[Edge]:
    """Algorithm 1 on one interaction target (reference 3.4, tie fix 10.3).

    Takes the largest remaining entry of `weights`, appends (op, source),
    adds the entry to a running sum and removes only that entry; stops when
    the sum is >= `threshold`, `max_edges` pairs are taken, or no entry is
    left.

    Args:
        weights: `(sources, len(ops))` matrix from `edge_weight_matrix`.
        ops: tuple of str. Column names; `none` is never chosen.
        threshold: float. Cumulative weight that ends the selection.
        max_edges: int. Most pairs kept.

    Returns:
        Distinct edges in the order taken (largest weight first; ties to
        the lower source, then the lower op index).

    Raises:
        ValueError: if the arguments are out of range or shapes disagree.
    """
    _check_pruning(threshold, max_edges)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(ops):
        raise ValueError(
            f"weights must be (sources, {len(ops)}), got {weights.shape}"
        )
    remaining = np.where(_choosable(ops)[None, :], weights, -np.inf)
    chosen: list[Edge] = []
    total = 0.0
    while len(chosen) < max_edges and np.isfinite(remaining).any():
        source, op = np.unravel_index(np.argmax(remaining), remaining.shape)
        total += remaining[source, op]
        remaining[source, op] = -np.inf  # only this entry (tie fix)
        chosen.append(Edge(ops[op], int(source)))
        if total >= threshold:
            break
    return chosen


def _check_pruning(threshold: float, max_edges: int) -> None:
    if not (isinstance(threshold, (int, float)) and 0 < threshold):
        raise ValueError(f"threshold must be a number > 0, got {threshold!r}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    if isinstance(max_edges, bool) or not isinstance(max_edges, int):
        raise ValueError(f"max_edges must be an integer, got {max_edges!r}")
    if max_edges < 1:
        raise ValueError(f"max_edges must be >= 1, got {max_edges}")


def node_weights(parameters: SpaceParameters) -> list[np.ndarray]:
    """`edge_weight_matrix` of every target node of a space, in node order.

    Args:
        parameters: SpaceParameters. One validated space.

    Returns:
        One `(sources, ops)` matrix per target.
    """
    return [
        edge_weight_matrix(parameters.alphas[rows], parameters.betas[rows])
        for rows in parameters.layout.row_slices
    ]


def derive_space(
    parameters: SpaceParameters,
    threshold: float = DEFAULT_THRESHOLD,
    max_edges: int = DEFAULT_MAX_EDGES,
) -> tuple:
    """The genotype field value of one space.

    Args:
        parameters: SpaceParameters. One validated space.
        threshold: float. Algorithm 1's cumulative weight (interactions).
        max_edges: int. Algorithm 1's cap (interactions).

    Returns:
        For a cell or fusion space, a tuple of 8 edges (2 per node, node
        order); for an interaction space, a tuple of per-target tuples.
    """
    per_node = node_weights(parameters)
    if parameters.space in INTERACTION_FIELDS:
        return tuple(
            tuple(greedy_edges(w, parameters.ops, threshold, max_edges))
            for w in per_node
        )
    return tuple(
        edge for w in per_node for edge in top_two_edges(w, parameters.ops)
    )


def derive_genotype(
    arrays: ArchitectureArrays,
    threshold: float = DEFAULT_THRESHOLD,
    max_edges: int = DEFAULT_MAX_EDGES,
    base: Genotype | None = None,
) -> Genotype:
    """Derives every space in `arrays` and fills the rest from a base.

    Args:
        arrays: mapping. Flat architecture arrays (`architecture_file`).
        threshold: float. Algorithm 1's cumulative weight.
        max_edges: int. Algorithm 1's cap on pairs per interaction target.
        base: Genotype. Supplies the fields `arrays` does not search;
            default: the `base_genotype` stored in `arrays`, if any.

    Returns:
        A genotype whose searched fields are derived and whose other fields
        come from the base: complete for an interaction search with a base,
        partial (cells only) for an encoder-decoder search without one.

    Raises:
        ArchitectureFileError: if `arrays` is malformed.
        GenotypeError: if a cell field is neither searched nor in a base.
        ValueError: if `threshold` or `max_edges` is out of range.
    """
    _check_pruning(threshold, max_edges)
    spaces, stored_base = architecture_file.parse_arrays(arrays)
    if base is None:
        base = stored_base
    elif stored_base is not None and stored_base != base:
        log.info("using the given base genotype, not the one in the arrays")
    fields = {}
    if base is not None:
        for name in ALL_FIELDS:
            if getattr(base, name) is not None:
                fields[name] = getattr(base, name)
    for space, parameters in spaces.items():
        fields[space] = derive_space(parameters, threshold, max_edges)
    missing = [name for name in CELL_FIELDS if name not in fields]
    if missing:
        raise GenotypeError(
            f"the architecture parameters search {', '.join(spaces)} but no "
            f"base genotype gives {', '.join(missing)}; pass a base genotype"
        )
    return Genotype(**fields)


def mean_normalised_entropy(arrays: ArchitectureArrays) -> dict[str, float]:
    """Per space: mean over rows of `H(softmax(alphas row)) / ln(num_ops)`.

    1.0 means uniform op weights (undecided), 0.0 one-hot. The search's
    entropy regulariser (reference 3.5) averages the same quantity.

    Args:
        arrays: mapping. Flat architecture arrays.

    Returns:
        Space name -> mean normalised entropy, in genotype field order.

    Raises:
        ArchitectureFileError: if `arrays` is malformed.
    """
    spaces, _ = architecture_file.parse_arrays(arrays)
    out = {}
    for space, parameters in spaces.items():
        num_ops = len(parameters.ops)
        if num_ops == 1:
            out[space] = 0.0
            continue
        probabilities = softmax(parameters.alphas, axis=1)
        logs = np.log(np.where(probabilities > 0, probabilities, 1.0))
        entropy = -(probabilities * logs).sum(axis=1)
        out[space] = float(entropy.mean() / math.log(num_ops))
    return out


def parameter_free_share(
    arrays: ArchitectureArrays,
    threshold: float = DEFAULT_THRESHOLD,
    max_edges: int = DEFAULT_MAX_EDGES,
) -> dict[str, float]:
    """Per space: share of derived edges whose op has no weights.

    A collapse towards pooling and skip connections (a known DARTS failure)
    shows up as this share rising during the search.

    Args:
        arrays: mapping. Flat architecture arrays.
        threshold: float. Algorithm 1's cumulative weight.
        max_edges: int. Algorithm 1's cap.

    Returns:
        Space name -> share in [0, 1] of `primitives.PARAMETER_FREE_OPS`
        among the space's derived edges, in genotype field order.

    Raises:
        ArchitectureFileError: if `arrays` is malformed.
    """
    spaces, _ = architecture_file.parse_arrays(arrays)
    out = {}
    for space, parameters in spaces.items():
        value = derive_space(parameters, threshold, max_edges)
        if space in INTERACTION_FIELDS:
            chosen = [edge for target in value for edge in target]
        else:
            chosen = list(value)
        free = sum(edge.op in PARAMETER_FREE_OPS for edge in chosen)
        out[space] = free / len(chosen)
    return out
