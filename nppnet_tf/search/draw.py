"""Pictures and tables of genotypes and architecture parameters.

* `draw_genotype`: one graphviz diagram per cell and per interaction (SVG
  and PNG; needs the `dot` executable);
* `describe_genotype`: a plain-text table (`nppnet genotype show`);
* `plot_architecture_weights`: a matplotlib heatmap of the (source, op)
  weights of every space, which the search logs each epoch.

Node names follow the source-index conventions of `genotype.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import graphviz
import numpy as np

from nppnet_tf.search import architecture_file
from nppnet_tf.search.architecture_file import ArchitectureArrays
from nppnet_tf.search.derive import node_weights
from nppnet_tf.search.genotype import (
    ALL_FIELDS,
    CELL_FIELDS,
    DECODER_INTERACTION_FIELDS,
    FUSION_FIELDS,
    INTERACTION_FIELDS,
    NUM_DECODER_STEPS,
    NUM_ENCODER_STAGES,
    Edge,
    Genotype,
)

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "pose_encoder_normal": "pose encoder, normal cell",
    "pose_encoder_reduce": "pose encoder, reduction cell "
    "(ops on s0 and s1 have stride 2)",
    "parsing_encoder_normal": "parsing encoder, normal cell",
    "parsing_encoder_reduce": "parsing encoder, reduction cell "
    "(ops on s0 and s1 have stride 2)",
    "pose_decoder": "pose decoder cell (ops on s0 are followed by x2 upsampling)",
    "parsing_decoder": "parsing decoder cell "
    "(ops on s0 are followed by x2 upsampling)",
    "encoder_parsing_to_pose": "encoder interaction: parsing stages "
    "into pose stages",
    "encoder_pose_to_parsing": "encoder interaction: pose stages "
    "into parsing stages",
    "decoder_parsing_to_pose": "decoder interaction: parsing features "
    "into pose decoder steps",
    "decoder_pose_to_parsing": "decoder interaction: pose features "
    "into parsing decoder steps",
    "pose_fusion": "pose fusion cell: new P = concat(nodes 3-6), "
    "new A = concat(A, P, S)",
    "parsing_fusion": "parsing fusion cell: new S = concat(nodes 3-6), "
    "new E = concat(E, P, S)",
}

# One colour per interaction target, so that an edge's label can be matched.
_COLOURS = ("#1b6ca8", "#c0392b", "#1e8449", "#7d3c98")

_FUSION_INPUTS = {
    "pose_fusion": ("A (pose aux)", "P (pose)", "S (parsing)"),
    "parsing_fusion": ("E (edge)", "P (pose)", "S (parsing)"),
}


def _branches(field: str) -> tuple[str, str]:
    """(source branch, target branch) of an interaction field."""
    return (
        ("parsing", "pose")
        if "parsing_to_pose" in field
        else ("pose", "parsing")
    )


def num_inputs(field: str) -> int:
    """Input states of a cell field: 3 for fusion cells, else 2."""
    return 3 if field in FUSION_FIELDS else 2


def target_name(field: str, target: int) -> str:
    """Readable name of a target: a cell node number or an interaction index.

    Args:
        field: str. A genotype field name.
        target: int. Node number (cells: 2..5, fusion: 3..6) or interaction
            target index (encoder stage 0..3, decoder step 0..2).

    Returns:
        E.g. "node 3", "pose stage 2", "parsing decoder step 1".

    Raises:
        ValueError: if `field` is not a genotype field.
    """
    if field in INTERACTION_FIELDS:
        _, own = _branches(field)
        if field in DECODER_INTERACTION_FIELDS:
            return f"{own} decoder step {target}"
        return f"{own} stage {target}"
    if field in ALL_FIELDS:
        return f"node {target}"
    raise ValueError(f"unknown genotype field {field!r}")


def source_name(field: str, source: int) -> str:
    """Readable name of a source index (conventions of `genotype.py`).

    Args:
        field: str. A genotype field name.
        source: int. The edge's source index.

    Returns:
        E.g. "s0 (cell k-2)", "S (parsing)", "parsing encoder stage 1".

    Raises:
        ValueError: if `field` is not a genotype field.
    """
    if field in INTERACTION_FIELDS:
        other, _ = _branches(field)
        if field not in DECODER_INTERACTION_FIELDS:
            return f"{other} stage {source}"
        if source < NUM_ENCODER_STAGES:
            return f"{other} encoder stage {source}"
        return f"{other} decoder step {source - NUM_ENCODER_STAGES}"
    if field in FUSION_FIELDS:
        names = _FUSION_INPUTS[field]
        return names[source] if source < len(names) else f"node {source}"
    if field in CELL_FIELDS:
        if source >= 2:
            return f"node {source}"
        if "decoder" in field:
            return ("s0 (deep input)", "s1 (skip input)")[source]
        return ("s0 (cell k-2)", "s1 (cell k-1)")[source]
    raise ValueError(f"unknown genotype field {field!r}")


def _targets(genotype: Genotype, field: str) -> list[tuple[int, list[Edge]]]:
    """(target number, its edges) of a present field, in target order."""
    value = getattr(genotype, field)
    if field in INTERACTION_FIELDS:
        return [(t, list(edges)) for t, edges in enumerate(value)]
    first = num_inputs(field)
    return [
        (first + n, list(value[2 * n : 2 * n + 2]))
        for n in range(len(value) // 2)
    ]


def describe_genotype(genotype: Genotype) -> str:
    """A plain-text table of every field: target, op, source.

    Args:
        genotype: Genotype. Complete or partial.

    Returns:
        Multi-line text; absent fields are listed as not searched yet.
    """
    lines = []
    for field in ALL_FIELDS:
        lines.append(f"{field}: {DESCRIPTIONS[field]}")
        if getattr(genotype, field) is None:
            lines.append("  (absent: not searched yet)")
            lines.append("")
            continue
        rows = [("target", "op", "source")]
        for target, edges in _targets(genotype, field):
            label = target_name(field, target)
            if not edges:
                rows.append((label, "(no edge)", ""))
            for i, edge in enumerate(edges):
                source = f"{edge.source}  {source_name(field, edge.source)}"
                rows.append((label if i == 0 else "", edge.op, source))
        widths = [max(len(row[c]) for row in rows) for c in range(2)]
        for row in rows:
            text = f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}"
            lines.append(text.rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _digraph(field: str) -> graphviz.Digraph:
    graph = graphviz.Digraph(name=field)
    graph.attr(
        rankdir="LR",
        label=f"{field}\n{DESCRIPTIONS[field]}",
        labelloc="t",
        fontname="Helvetica",
        fontsize="16",
    )
    graph.attr("node", fontname="Helvetica", fontsize="12", style="filled")
    graph.attr("edge", fontname="Helvetica", fontsize="11")
    return graph


def cell_graph(genotype: Genotype, field: str) -> graphviz.Digraph:
    """Diagram of one cell or fusion cell: inputs, nodes, op-labelled edges.

    Args:
        genotype: Genotype. Must contain `field`.
        field: str. A cell or fusion field name.

    Returns:
        An unrendered `graphviz.Digraph`.

    Raises:
        ValueError: if `field` is not a cell field or absent.
    """
    if field not in CELL_FIELDS + FUSION_FIELDS:
        raise ValueError(f"{field!r} is not a cell or fusion field")
    if getattr(genotype, field) is None:
        raise ValueError(f"the genotype has no {field!r}")
    graph = _digraph(field)
    first = num_inputs(field)
    with graph.subgraph(name="inputs") as inputs:
        inputs.attr(rank="same")
        for i in range(first):
            inputs.node(
                f"s{i}",
                source_name(field, i),
                shape="box",
                fillcolor="darkseagreen2",
            )
        for i in range(first - 1):
            inputs.edge(f"s{i}", f"s{i + 1}", style="invis")
    targets = _targets(genotype, field)
    for node, edges in targets:
        graph.node(
            f"s{node}", f"node {node}", shape="box", fillcolor="lightblue"
        )
        for edge in edges:
            graph.edge(f"s{edge.source}", f"s{node}", label=edge.op)
    graph.node(
        "output",
        f"output\nconcat(nodes {first}-{first + 3})",
        shape="box",
        fillcolor="palegoldenrod",
    )
    for node, _ in targets:
        graph.edge(f"s{node}", "output", style="dashed", color="gray40")
    return graph


def interaction_graph(genotype: Genotype, field: str) -> graphviz.Digraph:
    """Diagram of one interaction: the other branch's features on the left,
    this branch's targets on the right, one op-labelled edge per pair.

    Args:
        genotype: Genotype. Must contain `field`.
        field: str. An interaction field name.

    Returns:
        An unrendered `graphviz.Digraph`.

    Raises:
        ValueError: if `field` is not an interaction field or absent.
    """
    if field not in INTERACTION_FIELDS:
        raise ValueError(f"{field!r} is not an interaction field")
    value = getattr(genotype, field)
    if value is None:
        raise ValueError(f"the genotype has no {field!r}")
    graph = _digraph(field)
    graph.attr(ranksep="2.5")
    other, own = _branches(field)
    decoder = field in DECODER_INTERACTION_FIELDS
    num_sources = NUM_ENCODER_STAGES + (NUM_DECODER_STEPS if decoder else 0)
    used = {edge.source for edges in value for edge in edges}
    columns = (
        ("source", f"{other} branch", num_sources),
        ("target", f"{own} branch", len(value)),
    )
    for prefix, header, count in columns:
        # A rank=same column ordered top-down by invisible flat edges
        # (clusters would let dot reorder the nodes).
        with graph.subgraph(name=f"{prefix}s") as column:
            column.attr(rank="same")
            column.node(
                f"{prefix}_header",
                header,
                shape="plaintext",
                style="",
                fontsize="14",
            )
            for i in range(count):
                if prefix == "source":
                    text = source_name(field, i)
                    fill = "darkseagreen2" if i in used else "gray92"
                else:
                    text = target_name(field, i)
                    fill = "lightblue"
                column.node(f"{prefix}{i}", text, shape="box", fillcolor=fill)
            chain = [f"{prefix}_header"] + [
                f"{prefix}{i}" for i in range(count)
            ]
            for upper, lower in zip(chain, chain[1:]):
                column.edge(upper, lower, style="invis")
    for t, edges in enumerate(value):
        colour = _COLOURS[t % len(_COLOURS)]
        for edge in edges:
            graph.edge(
                f"source{edge.source}",
                f"target{t}",
                label=edge.op,
                color=colour,
                fontcolor=colour,
            )
    return graph


def draw_genotype(
    genotype: Genotype,
    out_dir: str | Path,
    formats: Sequence[str] = ("svg", "png"),
) -> list[Path]:
    """Renders one diagram per present field into `out_dir`.

    Args:
        genotype: Genotype. Complete or partial.
        out_dir: str or Path. Created if needed; files are named
            `<field>.<format>`.
        formats: sequence of str. graphviz output formats.

    Returns:
        The files written, in field then format order.

    Raises:
        FileNotFoundError: if the graphviz `dot` executable is missing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for field in ALL_FIELDS:
        if getattr(genotype, field) is None:
            continue
        if field in INTERACTION_FIELDS:
            graph = interaction_graph(genotype, field)
        else:
            graph = cell_graph(genotype, field)
        for fmt in formats:
            path = out_dir / f"{field}.{fmt}"
            try:
                path.write_bytes(graph.pipe(format=fmt))
            except graphviz.ExecutableNotFound:
                raise FileNotFoundError(
                    "graphviz's 'dot' executable was not found; install "
                    "graphviz (e.g. apt-get install graphviz) to draw genotypes"
                ) from None
            written.append(path)
    log.info("drew %d files into %s", len(written), out_dir)
    return written


def plot_architecture_weights(
    arrays: ArchitectureArrays, out_path: str | Path
) -> Path:
    """Heatmap per space of `softmax(alphas) x softmax(betas per node)`.

    Rows are the candidate edges ("target <- source", file row order),
    columns the space's ops; each target's block sums to one. Uses the Agg
    canvas directly, so no display and no pyplot state are involved.

    Args:
        arrays: mapping. Flat architecture arrays (`architecture_file`).
        out_path: str or Path. Image file; the suffix picks the format
            (.png, .svg, .pdf).

    Returns:
        The path written.

    Raises:
        ArchitectureFileError: if `arrays` is malformed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spaces, _ = architecture_file.parse_arrays(arrays)
    columns = 2 if len(spaces) > 1 else 1
    grid_rows = -(-len(spaces) // columns)
    tallest = max(parameters.alphas.shape[0] for parameters in spaces.values())
    panel_height = 1.6 + 0.28 * tallest
    figure = Figure(figsize=(7.5 * columns, panel_height * grid_rows))
    FigureCanvasAgg(figure)
    for n, (space, parameters) in enumerate(spaces.items()):
        axes = figure.add_subplot(grid_rows, columns, n + 1)
        weights = np.concatenate(node_weights(parameters), axis=0)
        image = axes.imshow(weights, cmap="viridis", vmin=0.0, aspect="auto")
        figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
        space_layout = parameters.layout
        labels = []
        for row in range(space_layout.num_rows):
            target, source = space_layout.row_label(row)
            labels.append(f"{_short_target(space, target)} <- {source}")
        axes.set_yticks(range(len(labels)), labels, fontsize=7)
        axes.set_xticks(
            range(len(parameters.ops)),
            parameters.ops,
            rotation=40,
            ha="right",
            fontsize=7,
        )
        for rows in space_layout.row_slices[1:]:
            axes.axhline(rows.start - 0.5, color="white", linewidth=1.5)
        # Only each row's strongest op is written out: a number in every
        # cell makes the figure unreadable and slow to draw.
        best = weights.max()
        for row, column in enumerate(weights.argmax(axis=1)):
            value = weights[row, column]
            axes.text(
                column,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="black" if value > 0.6 * best else "white",
            )
        axes.set_title(space, fontsize=10)
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    return out_path


def _short_target(space: str, target: int) -> str:
    if space in DECODER_INTERACTION_FIELDS:
        return f"step {target}"
    if space in INTERACTION_FIELDS:
        return f"stage {target}"
    return f"node {target}"
