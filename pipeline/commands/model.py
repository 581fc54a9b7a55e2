"""`nppnet model summary`: parameters and multiply-adds of NPPNet models.

Builds the derived network (or a supernet) and prints its trainable,
non-trainable and architecture parameters and its convolution multiply-adds
at one image size, in total and per part (the rows of reference NPPNET.md
section 9). Reads a genotype JSON; writes nothing.

    nppnet model summary --genotype configs/genotypes/nppnet_lip.json \\
        --init-channels 64 --layers 16 --image-size 384 [--json]
    nppnet model summary --supernet interaction --init-channels 32
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)

SUPERNETS = ("interaction", "encoder-decoder")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "model",
        help="inspect NPPNet models (parameters, multiply-adds)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="model_action", metavar="ACTION")
    actions.required = True
    summary = actions.add_parser(
        "summary",
        help="parameters and multiply-adds per part (reference section 9)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    summary.add_argument(
        "--genotype",
        default="configs/genotypes/nppnet_lip.json",
        help="genotype JSON (the interaction supernet uses only its cells)",
    )
    summary.add_argument("--init-channels", type=int, default=64)
    summary.add_argument(
        "--layers", type=int, default=16, help="cells per encoder"
    )
    summary.add_argument("--image-size", type=int, default=384)
    summary.add_argument("--num-classes", type=int, default=20)
    summary.add_argument("--num-joints", type=int, default=16)
    summary.add_argument(
        "--supernet",
        choices=SUPERNETS,
        help="summarise a search supernet instead of the derived network",
    )
    summary.add_argument(
        "--partial-channels",
        type=int,
        help="supernet partial-channel proportion K (default: the model's)",
    )
    summary.add_argument(
        "--json", action="store_true", help="print JSON instead of a table"
    )
    summary.set_defaults(handler=_summary)


def build_model(args: argparse.Namespace):
    """The model that `args` describe (unbuilt)."""
    from nppnet_tf.models.encoder_decoder_supernet import (
        EncoderDecoderSupernet,
    )
    from nppnet_tf.models.interaction_supernet import InteractionSupernet
    from nppnet_tf.models.nppnet import NPPNet
    from nppnet_tf.search.genotype import Genotype

    sizes = dict(
        init_channels=args.init_channels,
        num_cells=args.layers,
        num_classes=args.num_classes,
        num_joints=args.num_joints,
    )
    if args.partial_channels is not None:
        if args.supernet is None:
            raise ValueError("--partial-channels needs --supernet.")
        sizes["partial_channels"] = args.partial_channels
    if args.supernet == "encoder-decoder":
        return EncoderDecoderSupernet(**sizes)
    genotype = Genotype.load(args.genotype)
    if args.supernet == "interaction":
        return InteractionSupernet(genotype, **sizes)
    return NPPNet(genotype, **sizes)


def _summary(args: argparse.Namespace) -> int:
    from nppnet_tf.models.summary import summarize

    model = build_model(args)
    log.info(
        "building %s (init_channels=%d, layers=%d) at %d x %d",
        type(model).__name__,
        args.init_channels,
        args.layers,
        args.image_size,
        args.image_size,
    )
    summary = summarize(model, args.image_size)
    summary = {
        "model": type(model).__name__,
        "init_channels": args.init_channels,
        "layers": args.layers,
        **summary,
    }
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


def format_table(summary: dict) -> str:
    """The summary as a Markdown table plus totals."""
    lines = [
        f"{summary['model']}: init_channels {summary['init_channels']}, "
        f"layers {summary['layers']}, {summary['image_size']} x "
        f"{summary['image_size']}",
        "",
        "| part | parameters | non-trainable | G multiply-adds |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, part in summary["parts"].items():
        lines.append(
            f"| {name} | {part['parameters']:,} | {part['non_trainable']:,} "
            f"| {part['multiply_adds'] / 1e9:.2f} |"
        )
    lines += [
        "",
        f"trainable parameters:     {summary['trainable_parameters']:,}",
        f"  network weights:        {summary['network_parameters']:,}",
        f"  architecture:           {summary['architecture_parameters']:,}",
        f"non-trainable (BN stats): {summary['non_trainable_parameters']:,}",
        f"multiply-adds:            {summary['multiply_adds'] / 1e9:.2f} G "
        f"({summary['multiply_adds'] / 2**30:.1f} 'G' in the paper's binary "
        "units)",
        "unused stride-1 se_connect BN parameters in the authors' code "
        f"(omitted here): {summary['unused_se_batchnorm_parameters']:,}",
        "as the authors count them (unused BN included): network weights "
        f"{summary['authors_network_parameters']:,}, in all "
        f"{summary['authors_trainable_parameters']:,}",
    ]
    return "\n".join(lines)
