"""The architecture-parameter file `architecture.npz` and its row layouts.

A search writes its raw architecture parameters here so that a genotype can
be re-derived later with other pruning settings (`nppnet genotype derive`).
Keys (format `nppnet-architecture/1`, docs/genotype.md):

* `format`: the string `nppnet-architecture/1`;
* `<space>/alphas`: float32 `(rows, len(ops))`, one row per candidate edge
  in the reference's row order (reference NPPNET.md 3.1), one column per op;
* `<space>/betas`: float32 `(rows,)`, the edge parameters of the same rows;
* `<space>/ops`: string `(len(ops),)`, the column order;
* `base_genotype` (optional): the genotype JSON the search was built on (the
  fixed cells of an interaction search), so that deriving from the file
  alone yields a complete genotype.

`<space>` is a genotype field name. Rows are grouped by target node, in node
order, and inside a group by source index 0, 1, ...:

| spaces | targets | sources of target t | rows |
| --- | --- | --- | --- |
| encoder interactions | stages 0..3 | 0..t | 1+2+3+4 = 10 |
| decoder interactions | steps 0..2 | 0..4+t | 5+6+7 = 18 |
| fusion cells | nodes 3..6 | 0..node-1 | 3+4+5+6 = 18 |
| encoder/decoder cells | nodes 2..5 | 0..node-1 | 2+3+4+5 = 14 |

In memory the file is a flat mapping from these keys to numpy arrays (what
`numpy.load` returns); `pack_space` builds the three keys of one space.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from nppnet_tf.search import genotype as genotype_lib
from nppnet_tf.search.primitives import (
    ALL_OPS,
    PRIMITIVES_ENCODER_DECODER,
    PRIMITIVES_INTER,
)

log = logging.getLogger(__name__)

FORMAT = "nppnet-architecture/1"
FORMAT_KEY = "format"
BASE_GENOTYPE_KEY = "base_genotype"
ARRAY_NAMES = ("alphas", "betas", "ops")

CELL_SPACES = genotype_lib.CELL_FIELDS
INTERACTION_SPACES = genotype_lib.INTERACTION_FIELDS
FUSION_SPACES = genotype_lib.FUSION_FIELDS
ALL_SPACES = genotype_lib.ALL_FIELDS

# The op list a search uses by default for each space (its column order).
DEFAULT_OPS: dict[str, tuple[str, ...]] = {
    **{space: PRIMITIVES_ENCODER_DECODER for space in CELL_SPACES},
    **{space: PRIMITIVES_INTER for space in INTERACTION_SPACES},
    **{space: PRIMITIVES_INTER for space in FUSION_SPACES},
}

ArchitectureArrays = Mapping[str, np.ndarray]


class ArchitectureFileError(ValueError):
    """Architecture parameters are malformed; names the file and the key."""


@dataclasses.dataclass(frozen=True)
class SpaceLayout:
    """Row layout of one search space.

    Attributes:
        first_target: int. Number of the first target: 0 for interaction
            stages/steps, 2 for cell nodes, 3 for fusion-cell nodes.
        sources: tuple of int. Number of candidate sources of each target,
            in target order.
    """

    first_target: int
    sources: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        """Total rows of the space's alphas and betas."""
        return sum(self.sources)

    @property
    def row_slices(self) -> tuple[slice, ...]:
        """One slice of rows per target, in target order."""
        slices, start = [], 0
        for count in self.sources:
            slices.append(slice(start, start + count))
            start += count
        return tuple(slices)

    def row_label(self, row: int) -> tuple[int, int]:
        """(target number, source index) of one row.

        Raises:
            IndexError: if `row` is outside the layout.
        """
        for t, rows in enumerate(self.row_slices):
            if rows.start <= row < rows.stop:
                return self.first_target + t, row - rows.start
        raise IndexError(f"row {row} outside 0..{self.num_rows - 1}")


_ENCODER_INTERACTION = SpaceLayout(
    0, tuple(t + 1 for t in range(genotype_lib.NUM_ENCODER_STAGES))
)
_DECODER_INTERACTION = SpaceLayout(
    0,
    tuple(
        genotype_lib.NUM_ENCODER_STAGES + t + 1
        for t in range(genotype_lib.NUM_DECODER_STEPS)
    ),
)
_CELL = SpaceLayout(2, tuple(2 + n for n in range(genotype_lib.CELL_NODES)))
_FUSION = SpaceLayout(3, tuple(3 + n for n in range(genotype_lib.CELL_NODES)))


def layout(space: str) -> SpaceLayout:
    """The row layout of a search space.

    Args:
        space: str. A genotype field name.

    Returns:
        Its `SpaceLayout`.

    Raises:
        ArchitectureFileError: if `space` is not a genotype field.
    """
    if space in genotype_lib.ENCODER_INTERACTION_FIELDS:
        return _ENCODER_INTERACTION
    if space in genotype_lib.DECODER_INTERACTION_FIELDS:
        return _DECODER_INTERACTION
    if space in CELL_SPACES:
        return _CELL
    if space in FUSION_SPACES:
        return _FUSION
    raise ArchitectureFileError(
        f"unknown search space {space!r} (spaces: {', '.join(ALL_SPACES)})"
    )


def row_slices(space: str) -> tuple[slice, ...]:
    """The alphas/betas rows of each target node of `space`, in node order.

    Raises:
        ArchitectureFileError: if `space` is unknown.
    """
    return layout(space).row_slices


def num_rows(space: str) -> int:
    """Rows of the alphas and betas of `space` (10, 14 or 18).

    Raises:
        ArchitectureFileError: if `space` is unknown.
    """
    return layout(space).num_rows


@dataclasses.dataclass(frozen=True)
class SpaceParameters:
    """The validated parameters of one space (float64 copies).

    Attributes:
        space: str. The genotype field the space derives.
        alphas: `(rows, len(ops))` array.
        betas: `(rows,)` array.
        ops: tuple of str. Column order of `alphas`.
    """

    space: str
    alphas: np.ndarray
    betas: np.ndarray
    ops: tuple[str, ...]

    @property
    def layout(self) -> SpaceLayout:
        """The row layout of this space."""
        return layout(self.space)


def pack_space(
    space: str,
    alphas: np.ndarray,
    betas: np.ndarray,
    ops: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The three keys of one space, ready for `save_architecture`.

    Args:
        space: str. A genotype field name.
        alphas: array-like `(rows, len(ops))`.
        betas: array-like `(rows,)`.
        ops: sequence of str. Column order; default `DEFAULT_OPS[space]`.

    Returns:
        `{"<space>/alphas": float32, "<space>/betas": float32,
        "<space>/ops": str array}`, validated.

    Raises:
        ArchitectureFileError: naming the bad key.
    """
    layout(space)  # fails early on an unknown space
    ops = DEFAULT_OPS[space] if ops is None else ops
    arrays = {
        f"{space}/alphas": np.asarray(alphas, dtype=np.float32),
        f"{space}/betas": np.asarray(betas, dtype=np.float32),
        f"{space}/ops": np.asarray(list(ops), dtype=str),
    }
    _check_space(space, arrays, "<pack_space>")
    return arrays


def uniform_arrays(
    spaces: Iterable[str], value: float = 1e-3
) -> dict[str, np.ndarray]:
    """Every parameter of `spaces` set to `value` (the search's start, 3.1).

    Args:
        spaces: iterable of genotype field names.
        value: float. The initial value of every alpha and beta.

    Returns:
        Flat arrays as `pack_space` returns them, for all spaces.
    """
    arrays: dict[str, np.ndarray] = {}
    for space in spaces:
        rows = num_rows(space)
        ops = DEFAULT_OPS[space]
        alphas = np.full((rows, len(ops)), value)
        arrays.update(pack_space(space, alphas, np.full((rows,), value), ops))
    return arrays


def spaces_in(arrays: ArchitectureArrays) -> tuple[str, ...]:
    """The spaces with parameters in `arrays`, in genotype field order."""
    present = {key.split("/", 1)[0] for key in arrays if "/" in key}
    return tuple(space for space in ALL_SPACES if space in present)


def parse_arrays(
    arrays: ArchitectureArrays, source: str = "<arrays>"
) -> tuple[dict[str, SpaceParameters], genotype_lib.Genotype | None]:
    """Validates flat arrays and splits them per space.

    Args:
        arrays: mapping. Flat keys as in the module docstring; `format` is
            optional in memory but must be right when present.
        source: str. The file (or other origin) named in error messages.

    Returns:
        (space name -> `SpaceParameters`, the base genotype or None).

    Raises:
        ArchitectureFileError: naming `source`, the key and the bad value.
    """
    if not isinstance(arrays, Mapping):
        raise ArchitectureFileError(
            f"{source}: expected a mapping of arrays, got "
            f"{type(arrays).__name__}"
        )
    if FORMAT_KEY in arrays:
        fmt = _scalar_string(arrays[FORMAT_KEY], FORMAT_KEY, source)
        if fmt != FORMAT:
            raise ArchitectureFileError(
                f"{source}: key {FORMAT_KEY!r}: format {fmt!r} is not "
                f"{FORMAT!r}"
            )
    for key in arrays:
        if key in (FORMAT_KEY, BASE_GENOTYPE_KEY):
            continue
        space, _, name = key.partition("/")
        if space not in ALL_SPACES or name not in ARRAY_NAMES:
            raise ArchitectureFileError(
                f"{source}: unknown key {key!r} (expected '<space>/alphas', "
                f"'<space>/betas', '<space>/ops', {FORMAT_KEY!r} or "
                f"{BASE_GENOTYPE_KEY!r}; spaces: {', '.join(ALL_SPACES)})"
            )
    spaces = {
        space: _check_space(space, arrays, source)
        for space in spaces_in(arrays)
    }
    if not spaces:
        raise ArchitectureFileError(
            f"{source}: no search space (no '<space>/alphas' key)"
        )
    base = None
    if BASE_GENOTYPE_KEY in arrays:
        text = _scalar_string(
            arrays[BASE_GENOTYPE_KEY], BASE_GENOTYPE_KEY, source
        )
        try:
            base = genotype_lib.Genotype.from_json(
                text, f"{source}: key {BASE_GENOTYPE_KEY!r}"
            )
        except genotype_lib.GenotypeError as err:
            raise ArchitectureFileError(str(err)) from None
    return spaces, base


def _check_space(
    space: str, arrays: ArchitectureArrays, source: str
) -> SpaceParameters:
    for name in ARRAY_NAMES:
        if f"{space}/{name}" not in arrays:
            raise ArchitectureFileError(
                f"{source}: space {space!r} has no key {space + '/' + name!r}"
            )
    rows = layout(space).num_rows
    ops_key = f"{space}/ops"
    ops_array = np.asarray(arrays[ops_key])
    if ops_array.ndim != 1 or ops_array.dtype.kind not in "US":
        raise ArchitectureFileError(
            f"{source}: key {ops_key!r}: expected a 1-D string array, got "
            f"dtype {ops_array.dtype} shape {ops_array.shape}"
        )
    ops = tuple(str(op) for op in ops_array.tolist())
    for op in ops:
        if op not in ALL_OPS:
            raise ArchitectureFileError(
                f"{source}: key {ops_key!r}: unknown op {op!r} "
                f"(known: {', '.join(ALL_OPS)})"
            )
    if len(set(ops)) != len(ops):
        repeated = next(op for op in ops if ops.count(op) > 1)
        raise ArchitectureFileError(
            f"{source}: key {ops_key!r}: op {repeated!r} listed twice"
        )
    if not any(op != "none" for op in ops):
        raise ArchitectureFileError(
            f"{source}: key {ops_key!r}: needs at least one op besides "
            f"'none', got {list(ops)}"
        )
    alphas = _float_array(arrays, f"{space}/alphas", (rows, len(ops)), source)
    betas = _float_array(arrays, f"{space}/betas", (rows,), source)
    return SpaceParameters(space, alphas, betas, ops)


def _float_array(
    arrays: ArchitectureArrays,
    key: str,
    shape: tuple[int, ...],
    source: str,
) -> np.ndarray:
    array = np.asarray(arrays[key])
    if array.dtype.kind not in "fiu":
        raise ArchitectureFileError(
            f"{source}: key {key!r}: expected numbers, got dtype {array.dtype}"
        )
    if array.shape != shape:
        raise ArchitectureFileError(
            f"{source}: key {key!r}: expected shape {shape}, got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ArchitectureFileError(
            f"{source}: key {key!r}: value {array[bad]} at {bad} is not finite"
        )
    return array.astype(np.float64)


def _scalar_string(value: np.ndarray, key: str, source: str) -> str:
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "US":
        raise ArchitectureFileError(
            f"{source}: key {key!r}: expected a single string, got dtype "
            f"{array.dtype} shape {array.shape}"
        )
    return str(array)


def save_architecture(
    path: str | Path,
    arrays: ArchitectureArrays,
    base_genotype: genotype_lib.Genotype | None = None,
) -> Path:
    """Validates and writes `architecture.npz` atomically.

    Args:
        path: str or Path. The file to write (parents are created).
        arrays: mapping. Flat keys (see `pack_space`); a `base_genotype`
            key already in `arrays` is kept unless `base_genotype` is given.
        base_genotype: Genotype. Stored as JSON text under `base_genotype`.

    Returns:
        The path written.

    Raises:
        ArchitectureFileError: naming the bad key.
    """
    path = Path(path)
    spaces, base = parse_arrays(arrays, str(path))
    if base_genotype is not None:
        base = base_genotype
    out: dict[str, np.ndarray] = {FORMAT_KEY: np.asarray(FORMAT)}
    for space, parameters in spaces.items():
        out[f"{space}/alphas"] = parameters.alphas.astype(np.float32)
        out[f"{space}/betas"] = parameters.betas.astype(np.float32)
        out[f"{space}/ops"] = np.asarray(parameters.ops, dtype=str)
    if base is not None:
        out[BASE_GENOTYPE_KEY] = np.asarray(base.to_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    log.debug("wrote %s: spaces %s", path, ", ".join(spaces))
    return path


def load_architecture(path: str | Path) -> dict[str, np.ndarray]:
    """Reads and validates `architecture.npz`.

    Args:
        path: str or Path. A file written by `save_architecture`.

    Returns:
        The flat mapping of keys to arrays (`format` included).

    Raises:
        FileNotFoundError: if `path` is not a file.
        ArchitectureFileError: if it is not an npz file, lacks `format`, or
            a key is malformed (the message names the file and the key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"architecture file {path} does not exist")
    with path.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":  # npz files are zip archives
            raise ArchitectureFileError(f"{path}: not an npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: _read_key(data, key, path) for key in data.files}
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ArchitectureFileError(
            f"{path}: not a readable npz archive ({err})"
        ) from None
    if FORMAT_KEY not in arrays:
        raise ArchitectureFileError(
            f"{path}: no {FORMAT_KEY!r} key (expected {FORMAT!r})"
        )
    parse_arrays(arrays, str(path))
    return arrays


def _read_key(data: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except ValueError as err:  # e.g. an object array that needs pickle
        raise ArchitectureFileError(
            f"{path}: key {key!r}: unreadable array ({err})"
        ) from None
