"""Fixtures shared by the genotype tests: the authors' genotype and
architecture parameters built so that derivation must reproduce it."""

from pathlib import Path

import numpy as np
import pytest

from nppnet_tf.search import architecture_file
from nppnet_tf.search.genotype import ALL_FIELDS, INTERACTION_FIELDS, Genotype

AUTHORS_GENOTYPE = (
    Path(__file__).resolve().parents[3] / "configs/genotypes/nppnet_lip.json"
)

# Weights of the kept (op, source) pairs of an interaction target, by how
# many pairs it keeps: partial sums stay below 0.7 until the last pair, and
# four pairs (0.68) stop at the cap, not the threshold.
_INTERACTION_MASSES = {
    1: (0.8,),
    2: (0.4, 0.35),
    3: (0.3, 0.25, 0.2),
    4: (0.2, 0.18, 0.16, 0.14),
}


def _parameters_for(weights: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Inverts W[j, k] = softmax(alphas[j])[k] * softmax(betas)[j] per node:
    betas = log(row sums), alphas = log(W / row sums)."""
    alphas, betas = [], []
    for matrix in weights:
        row_sums = matrix.sum(axis=1)
        alphas.append(np.log(matrix / row_sums[:, None]))
        betas.append(np.log(row_sums))
    return np.concatenate(alphas), np.concatenate(betas)


def _spread(matrix: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Fills the unfixed entries with equal shares of the remaining mass."""
    rest = 1.0 - matrix[fixed].sum()
    matrix[~fixed] = rest / (~fixed).sum()
    return matrix


def _cell_node(edges, num_sources, ops) -> np.ndarray:
    matrix = np.zeros((num_sources, len(ops)))
    fixed = np.zeros_like(matrix, dtype=bool)
    first, second = edges
    matrix[first.source, ops.index(first.op)] = 0.35
    matrix[second.source, ops.index(second.op)] = 0.25
    fixed[first.source, ops.index(first.op)] = True
    fixed[second.source, ops.index(second.op)] = True
    if "none" in ops:
        # `none` outweighs the chosen op on the second edge: derivation
        # must ignore it for the op and for the edge strength.
        matrix[second.source, ops.index("none")] = 0.3
        fixed[second.source, ops.index("none")] = True
    return _spread(matrix, fixed)


def _interaction_target(edges, num_sources, ops) -> np.ndarray:
    matrix = np.zeros((num_sources, len(ops)))
    fixed = np.zeros_like(matrix, dtype=bool)
    for edge, mass in zip(edges, _INTERACTION_MASSES[len(edges)]):
        matrix[edge.source, ops.index(edge.op)] = mass
        fixed[edge.source, ops.index(edge.op)] = True
    return _spread(matrix, fixed)


def arrays_favouring(genotype: Genotype) -> dict[str, np.ndarray]:
    """Architecture arrays of every present field of `genotype` (default op
    lists) whose derivation gives back exactly that genotype."""
    arrays = {}
    for field in ALL_FIELDS:
        value = getattr(genotype, field)
        if value is None:
            continue
        ops = architecture_file.DEFAULT_OPS[field]
        space_layout = architecture_file.layout(field)
        if field in INTERACTION_FIELDS:
            weights = [
                _interaction_target(edges, count, ops)
                for edges, count in zip(value, space_layout.sources)
            ]
        else:
            weights = [
                _cell_node(value[2 * n : 2 * n + 2], count, ops)
                for n, count in enumerate(space_layout.sources)
            ]
        alphas, betas = _parameters_for(weights)
        arrays.update(architecture_file.pack_space(field, alphas, betas, ops))
    return arrays


@pytest.fixture
def authors_genotype() -> Genotype:
    return Genotype.load(AUTHORS_GENOTYPE)


@pytest.fixture
def authors_arrays(authors_genotype) -> dict[str, np.ndarray]:
    return arrays_favouring(authors_genotype)
