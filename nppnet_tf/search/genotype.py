"""Genotypes: the searched architecture as plain, versioned data.

A genotype names every searched choice by its job (reference NPPNET.md,
"Naming for our implementation"). JSON layout (`nppnet-genotype/1`, see
docs/genotype.md for a full example):

```
{
  "format": "nppnet-genotype/1",
  "pose_encoder_normal":    [["std_conv_3x3", 0], ["se_connect", 1], ...],
  "pose_encoder_reduce":    [...],          # 8 edges: 2 per node 2..5
  "parsing_encoder_normal": [...],
  "parsing_encoder_reduce": [...],
  "pose_decoder":           [...],          # 8 edges: 2 per node 2..5
  "parsing_decoder":        [...],
  "encoder_parsing_to_pose": [[...], [...], [...], [...]],  # per stage 0..3
  "encoder_pose_to_parsing": [[...], [...], [...], [...]],
  "decoder_parsing_to_pose": [[...], [...], [...]],         # per step 0..2
  "decoder_pose_to_parsing": [[...], [...], [...]],
  "pose_fusion":    [...],                  # 8 edges: 2 per node 3..6
  "parsing_fusion": [...]
}
```

Each edge is `[op, source]`. Source indices:

* encoder cells: 0 = s0 (cell k-2), 1 = s1 (cell k-1), k >= 2 = node k;
* decoder cells: 0 = the deep, low-resolution input, 1 = the skip input,
  k >= 2 = node k;
* fusion cells: 0 = the cell's own auxiliary feature (pose aux A or edge E),
  1 = pose feature P, 2 = parsing feature S, k >= 3 = node k;
* encoder interaction into stage i: source stage j in 0..i;
* decoder interaction into step k: 0..3 = the other branch's encoder stages
  0..3, 4..6 = its decoder steps 0..2 (allowed up to 4 + k).

A cell node keeps two edges from two different sources (DARTS, reference
2.4); an interaction target keeps any number of distinct (op, source)
pairs, several ops on one source allowed (reference 3.4).

The interaction and fusion keys may be absent: that is the partial genotype
the encoder-decoder search writes, which the interaction search completes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nppnet_tf.search.primitives import ALL_OPS

FORMAT = "nppnet-genotype/1"

NUM_ENCODER_STAGES = 4
NUM_DECODER_STEPS = 3
CELL_NODES = 4  # intermediate nodes of every cell

CELL_FIELDS = (
    "pose_encoder_normal",
    "pose_encoder_reduce",
    "parsing_encoder_normal",
    "parsing_encoder_reduce",
    "pose_decoder",
    "parsing_decoder",
)
ENCODER_INTERACTION_FIELDS = (
    "encoder_parsing_to_pose",
    "encoder_pose_to_parsing",
)
DECODER_INTERACTION_FIELDS = (
    "decoder_parsing_to_pose",
    "decoder_pose_to_parsing",
)
INTERACTION_FIELDS = ENCODER_INTERACTION_FIELDS + DECODER_INTERACTION_FIELDS
FUSION_FIELDS = ("pose_fusion", "parsing_fusion")
SEARCHED_BY_INTERACTION = INTERACTION_FIELDS + FUSION_FIELDS
ALL_FIELDS = CELL_FIELDS + SEARCHED_BY_INTERACTION


class GenotypeError(ValueError):
    """A genotype is malformed; the message names the field and the edge."""


@dataclasses.dataclass(frozen=True)
class Edge:
    """One chosen operation on one incoming connection.

    Args:
        op: str. A name in `primitives.ALL_OPS`.
        source: int. Index of the input state; its meaning depends on the
            genotype field (module docstring). numpy integers are converted.

    Raises:
        GenotypeError: if `op` is not a string or `source` not an integer.
    """

    op: str
    source: int

    def __post_init__(self):
        if not isinstance(self.op, str):
            raise GenotypeError(f"edge op must be a string, got {self.op!r}")
        if isinstance(self.source, bool) or not isinstance(
            self.source, numbers.Integral
        ):
            raise GenotypeError(
                f"edge source must be an integer, got {self.source!r}"
            )
        # numpy integers are not JSON-serialisable; store a plain int.
        object.__setattr__(self, "source", int(self.source))


Cell = tuple[Edge, ...]  # two edges per node, in node order
Interaction = tuple[tuple[Edge, ...], ...]  # edges per target, in target order


@dataclasses.dataclass(frozen=True)
class Genotype:
    """The architecture NPPNet is built from (reference 2.4-2.9).

    Cell fields are required; the interaction-search fields may be None (a
    partial genotype). Lists are converted to tuples; every field is
    validated on construction.

    Raises:
        GenotypeError: naming the first bad field or edge.
    """

    pose_encoder_normal: Cell
    pose_encoder_reduce: Cell
    parsing_encoder_normal: Cell
    parsing_encoder_reduce: Cell
    pose_decoder: Cell
    parsing_decoder: Cell
    encoder_parsing_to_pose: Interaction | None = None
    encoder_pose_to_parsing: Interaction | None = None
    decoder_parsing_to_pose: Interaction | None = None
    decoder_pose_to_parsing: Interaction | None = None
    pose_fusion: Cell | None = None
    parsing_fusion: Cell | None = None

    def __post_init__(self):
        for name in ALL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _as_tuples(value, name))
        validate(self)

    @property
    def is_complete(self) -> bool:
        """True when interactions and fusion cells are present."""
        return all(
            getattr(self, f) is not None for f in SEARCHED_BY_INTERACTION
        )

    def require_complete(self, what: str = "the derived network") -> Genotype:
        """Returns self if every field is present.

        Args:
            what: str. The consumer named in the error message.

        Returns:
            This genotype.

        Raises:
            GenotypeError: listing the missing interaction/fusion fields.
        """
        missing = [
            f for f in SEARCHED_BY_INTERACTION if getattr(self, f) is None
        ]
        if missing:
            raise GenotypeError(
                f"{what} needs a complete genotype; missing "
                f"{', '.join(missing)} (run the interaction search on this "
                "encoder-decoder genotype)"
            )
        return self

    def replace(self, **changes: Any) -> Genotype:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def cells_only(self) -> Genotype:
        """This genotype without the interaction-search fields."""
        return self.replace(**{f: None for f in SEARCHED_BY_INTERACTION})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: `format` plus every present field."""
        out: dict[str, Any] = {"format": FORMAT}
        for name in ALL_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name in INTERACTION_FIELDS:
                out[name] = [
                    [[e.op, e.source] for e in target] for target in value
                ]
            else:
                out[name] = [[e.op, e.source] for e in value]
        return out

    def to_json(self) -> str:
        """Sorted, indented JSON with one edge (or one target) per line."""
        return _dump(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Writes `to_json()` atomically (temporary file, then rename).

        Args:
            path: str or Path. The JSON file; parent folders are created.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON (for registry tags and caching)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "<dict>"
    ) -> Genotype:
        """Parses the JSON layout of the module docstring.

        Args:
            data: mapping. Parsed JSON; `format` may be omitted.
            source: str. Where the data came from, for error messages.

        Returns:
            The validated genotype.

        Raises:
            GenotypeError: naming `source`, the field and the bad value.
        """
        if not isinstance(data, Mapping):
            raise GenotypeError(
                f"{source}: expected a JSON object, got {type(data).__name__}"
            )
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise GenotypeError(f"{source}: format {fmt!r} is not {FORMAT!r}")
        unknown = sorted(set(data) - set(ALL_FIELDS) - {"format"})
        if unknown:
            raise GenotypeError(
                f"{source}: unknown field {unknown[0]!r} "
                f"(fields: {', '.join(ALL_FIELDS)})"
            )
        missing = [f for f in CELL_FIELDS if f not in data]
        if missing:
            raise GenotypeError(f"{source}: missing field {missing[0]!r}")
        kwargs: dict[str, Any] = {}
        try:
            for name in ALL_FIELDS:
                if name not in data:
                    continue
                if name in INTERACTION_FIELDS:
                    kwargs[name] = _parse_interaction(data[name], name)
                else:
                    kwargs[name] = _parse_edges(data[name], name)
            return cls(**kwargs)
        except GenotypeError as err:
            raise GenotypeError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> Genotype:
        """Parses JSON text; see `from_dict`.

        Raises:
            GenotypeError: if the text is not JSON or not a valid genotype.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise GenotypeError(f"{source}: not JSON ({err})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        """Reads a genotype JSON file.

        Raises:
            FileNotFoundError: if `path` is not a file.
            GenotypeError: naming the file and the bad value.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"genotype file {path} does not exist")
        return cls.from_json(path.read_text(), str(path))


def _as_tuples(value: Any, name: str) -> tuple:
    """Lists -> tuples (so genotypes hash and compare), Edge types checked."""
    if not isinstance(value, (list, tuple)):
        raise GenotypeError(f"{name}: expected a sequence, got {value!r}")
    nested = name in INTERACTION_FIELDS
    out = []
    for i, item in enumerate(value):
        if nested:
            out.append(_as_tuples_of_edges(item, f"{name}[{i}]"))
        else:
            out.append(_check_edge_type(item, f"{name}[{i}]"))
    return tuple(out)


def _as_tuples_of_edges(value: Any, where: str) -> tuple[Edge, ...]:
    if not isinstance(value, (list, tuple)):
        raise GenotypeError(
            f"{where}: expected a sequence of edges, got {value!r}"
        )
    return tuple(
        _check_edge_type(item, f"{where}[{i}]") for i, item in enumerate(value)
    )


def _check_edge_type(item: Any, where: str) -> Edge:
    if not isinstance(item, Edge):
        raise GenotypeError(f"{where}: expected an Edge, got {item!r}")
    return item


def _parse_edge(item: Any, where: str) -> Edge:
    if (
        not isinstance(item, (list, tuple))
        or len(item) != 2
        or not isinstance(item[0], str)
        or isinstance(item[1], bool)
        or not isinstance(item[1], int)
    ):
        raise GenotypeError(
            f"{where}: expected [op_name, source_index], got {item!r}"
        )
    return Edge(op=item[0], source=item[1])


def _parse_edges(items: Any, name: str) -> Cell:
    if not isinstance(items, (list, tuple)):
        raise GenotypeError(f"{name}: expected a list of edges, got {items!r}")
    return tuple(
        _parse_edge(item, f"{name}[{i}]") for i, item in enumerate(items)
    )


def _parse_interaction(items: Any, name: str) -> Interaction:
    if not isinstance(items, (list, tuple)):
        raise GenotypeError(
            f"{name}: expected a list of edge lists, got {items!r}"
        )
    return tuple(
        _parse_edges(target, f"{name}[{t}]") for t, target in enumerate(items)
    )


def _check_op(edge: Edge, where: str) -> None:
    if edge.op not in ALL_OPS:
        raise GenotypeError(
            f"{where}: unknown op {edge.op!r} (known: {', '.join(ALL_OPS)})"
        )
    if edge.op == "none":
        raise GenotypeError(f"{where}: 'none' cannot be a chosen op")


def _validate_cell(edges: Cell, name: str, num_inputs: int) -> None:
    if len(edges) != 2 * CELL_NODES:
        raise GenotypeError(
            f"{name}: expected {2 * CELL_NODES} edges (2 per node), "
            f"got {len(edges)}"
        )
    for i, edge in enumerate(edges):
        where = f"{name}[{i}]"
        _check_op(edge, where)
        node = num_inputs + i // 2
        if not 0 <= edge.source < node:
            raise GenotypeError(
                f"{where}: source {edge.source} out of range for node {node} "
                f"(must be 0..{node - 1})"
            )
        if i % 2 == 1 and edge.source == edges[i - 1].source:
            raise GenotypeError(
                f"{where}: node {node} takes source {edge.source} twice; a "
                "cell node keeps two edges from two different sources"
            )


def _validate_interaction(
    targets: Interaction, name: str, encoder: bool
) -> None:
    count = NUM_ENCODER_STAGES if encoder else NUM_DECODER_STEPS
    if len(targets) != count:
        raise GenotypeError(
            f"{name}: expected {count} targets, got {len(targets)}"
        )
    for t, edges in enumerate(targets):
        last = t if encoder else NUM_ENCODER_STAGES + t
        seen = set()
        for i, edge in enumerate(edges):
            where = f"{name}[{t}][{i}]"
            _check_op(edge, where)
            if not 0 <= edge.source <= last:
                raise GenotypeError(
                    f"{where}: source {edge.source} out of range "
                    f"(must be 0..{last})"
                )
            if (edge.op, edge.source) in seen:
                raise GenotypeError(
                    f"{where}: duplicate edge {[edge.op, edge.source]}"
                )
            seen.add((edge.op, edge.source))


def validate(genotype: Genotype) -> None:
    """Checks every field (called on construction).

    Args:
        genotype: Genotype. The genotype to check.

    Raises:
        GenotypeError: naming the first bad field and edge.
    """
    for name in CELL_FIELDS:
        _validate_cell(getattr(genotype, name), name, num_inputs=2)
    for name in FUSION_FIELDS:
        value = getattr(genotype, name)
        if value is not None:
            _validate_cell(value, name, num_inputs=3)
    for name in INTERACTION_FIELDS:
        value = getattr(genotype, name)
        if value is not None:
            _validate_interaction(
                value, name, encoder=name in ENCODER_INTERACTION_FIELDS
            )


def _dump(data: Mapping[str, Any]) -> str:
    """Indented JSON, keys sorted, one edge per line (diff-friendly).

    Cell fields list one edge per line; interaction fields one target (a
    list of edges) per line.
    """
    lines = ["{"]
    keys = sorted(data)
    for n, key in enumerate(keys):
        value = data[key]
        comma = "," if n < len(keys) - 1 else ""
        if not isinstance(value, list):
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
            continue
        lines.append(f"  {json.dumps(key)}: [")
        for i, item in enumerate(value):
            item_comma = "," if i < len(value) - 1 else ""
            if key in INTERACTION_FIELDS:
                inner = ", ".join(json.dumps(edge) for edge in item)
                lines.append(f"    [{inner}]{item_comma}")
            else:
                lines.append(f"    {json.dumps(item)}{item_comma}")
        lines.append(f"  ]{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def edges(pairs: Sequence[tuple[str, int]]) -> Cell:
    """`[("std_conv_3x3", 0), ...]` -> a tuple of `Edge` (for tests and code).

    Args:
        pairs: sequence of (op, source) pairs.

    Returns:
        A tuple of `Edge`, in the given order.
    """
    return tuple(Edge(op, source) for op, source in pairs)
