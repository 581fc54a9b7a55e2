"""`nppnet genotype ...`: derive, draw and show genotypes (docs/genotype.md).

* `derive ARCH.npz --out genotype.json`: re-derives a genotype from saved
  architecture parameters (`architecture.npz`) with chosen pruning
  settings; complete when the file holds interaction spaces and a base
  genotype (stored in the file or given with `--base`), partial for an
  encoder-decoder search file.
* `draw genotype.json --out DIR`: one SVG and one PNG diagram per cell and
  per interaction (needs graphviz's `dot`).
* `show genotype.json`: a plain-text table of every edge.

Examples:
    nppnet genotype derive runs/lip/search/architecture.npz \\
        --out runs/lip/genotype.json
    nppnet genotype draw configs/genotypes/nppnet_lip.json --out runs/drawings
    nppnet genotype show configs/genotypes/nppnet_lip.json
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Adds the `genotype` command group to the `nppnet` parser.

    Args:
        subparsers: the `add_subparsers()` object of the top-level parser.
    """
    parser = subparsers.add_parser(
        "genotype",
        help="derive, draw and show genotypes (docs/genotype.md)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="genotype_command", metavar="ACTION")
    actions.required = True

    derive = actions.add_parser(
        "derive",
        help="architecture.npz -> genotype.json",
        description="Re-derive a genotype from saved architecture parameters.",
    )
    derive.add_argument("architecture", help="architecture.npz of a search")
    derive.add_argument(
        "--threshold",
        type=float,
        default=0.7,
        help="interaction pruning: stop once the kept (op, source) weights "
        "sum to this (default: 0.7, the paper's)",
    )
    derive.add_argument(
        "--max-edges",
        type=int,
        default=4,
        help="interaction pruning: most (op, source) pairs per target "
        "(default: 4, the paper's)",
    )
    derive.add_argument(
        "--base",
        help="genotype JSON for the fields the file does not search "
        "(default: the base genotype stored in the file)",
    )
    derive.add_argument("--out", required=True, help="genotype JSON to write")
    derive.set_defaults(handler=_derive)

    draw = actions.add_parser(
        "draw",
        help="genotype.json -> SVG and PNG diagrams",
        description="Draw every cell and interaction of a genotype.",
    )
    draw.add_argument("genotype", help="genotype JSON")
    draw.add_argument("--out", required=True, help="folder for the diagrams")
    draw.set_defaults(handler=_draw)

    show = actions.add_parser(
        "show",
        help="print a genotype as a table",
        description="Print every edge of a genotype as a table.",
    )
    show.add_argument("genotype", help="genotype JSON")
    show.set_defaults(handler=_show)


def _derive(args: argparse.Namespace) -> int:
    from nppnet_tf.search.architecture_file import load_architecture
    from nppnet_tf.search.derive import derive_genotype
    from nppnet_tf.search.genotype import Genotype

    arrays = load_architecture(args.architecture)
    base = Genotype.load(args.base) if args.base else None
    genotype = derive_genotype(
        arrays, threshold=args.threshold, max_edges=args.max_edges, base=base
    )
    path = genotype.save(args.out)
    kind = "complete" if genotype.is_complete else "partial (cells only)"
    log.info("derived a %s genotype from %s", kind, args.architecture)
    print(f"{path} ({kind}, sha256 {genotype.fingerprint()[:12]})")
    return 0


def _draw(args: argparse.Namespace) -> int:
    from nppnet_tf.search.draw import draw_genotype
    from nppnet_tf.search.genotype import Genotype

    written = draw_genotype(Genotype.load(args.genotype), args.out)
    print("\n".join(str(path) for path in written))
    return 0


def _show(args: argparse.Namespace) -> int:
    from nppnet_tf.search.draw import describe_genotype
    from nppnet_tf.search.genotype import Genotype

    genotype = Genotype.load(args.genotype)
    kind = "complete" if genotype.is_complete else "partial (cells only)"
    print(
        f"{args.genotype}: {kind} genotype, sha256 "
        f"{genotype.fingerprint()[:12]}\n"
    )
    print(describe_genotype(genotype), end="")
    return 0
