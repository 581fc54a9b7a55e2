"""Markdown and HTML renderings of an evaluation report dict.

The report dict is the one `prediction_files.evaluate_prediction_files`
returns (scores in percent; `parsing` and `pose` sections each optional).
Tables: a summary, per-class IoU and accuracy, the PCKh groups (the authors'
printed table), per-joint PCKh, the counts, and optional overlay images.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

from nppnet_tf.lip import CLASS_NAMES, LIP_JOINT_NAMES

# The authors' printed PCKh table, in their column order.
PCKH_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Head", "head"),
    ("Shoulder", "shoulder"),
    ("Elbow", "elbow"),
    ("Wrist", "wrist"),
    ("Hip", "hip"),
    ("Knee", "knee"),
    ("Ankle", "ankle"),
)

# How many ids of a list (e.g. missing predictions) the rendering shows.
MAX_LISTED_IDS = 20


def format_score(value: float | None) -> str:
    """`58.561` -> `"58.56"`; None or NaN (undefined) -> `"n/a"`."""
    if value is None or value != value:
        return "n/a"
    return f"{value:.2f}"


def _ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:MAX_LISTED_IDS])
    more = len(ids) - MAX_LISTED_IDS
    return shown + (f" and {more} more" if more > 0 else "")


def report_tables(
    report: Mapping,
) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as `(title, header, rows)` tables of strings, the common
    source of the Markdown and HTML renderings."""
    tables = []
    summary = []
    parsing = report.get("parsing")
    pose = report.get("pose")
    if parsing:
        summary += [
            [
                "mIoU (all 20 classes; selection value)",
                format_score(parsing["mean_iou"]),
            ],
            [
                "mIoU (classes present; official calc_miou.py)",
                format_score(parsing["mean_iou_present_classes"]),
            ],
            ["pixel accuracy", format_score(parsing["pixel_accuracy"])],
            ["mean accuracy", format_score(parsing["mean_accuracy"])],
            [
                "frequency-weighted IoU",
                format_score(parsing["frequency_weighted_iou"]),
            ],
        ]
    if pose:
        summary += [
            ["PCKh@0.5 Avg (selection value)", format_score(pose["average"])],
            ["PCKh@0.5 U.Body", format_score(pose["upper_body"])],
        ]
    tables.append(("Summary (percent)", ["score", "value"], summary))
    if parsing:
        rows = [
            [
                name,
                format_score(parsing["per_class_iou"].get(name)),
                format_score(parsing["per_class_accuracy"].get(name)),
            ]
            for name in CLASS_NAMES
        ]
        tables.append(
            ("Parsing per class (percent)", ["class", "IoU", "accuracy"], rows)
        )
    if pose:
        header = [label for label, _ in PCKH_COLUMNS] + ["U.Body", "Avg"]
        row = [format_score(pose["groups"].get(key)) for _, key in PCKH_COLUMNS]
        row += [format_score(pose["upper_body"]), format_score(pose["average"])]
        tables.append(("PCKh@0.5 (percent)", header, [row]))
        rows = [
            [
                str(index),
                name,
                format_score(pose["per_joint"].get(name)),
                str(pose["counted_per_joint"].get(name, 0)),
            ]
            for index, name in enumerate(LIP_JOINT_NAMES)
        ]
        tables.append(
            (
                "PCKh@0.5 per joint (LIP order)",
                ["LIP index", "joint", "PCKh", "counted"],
                rows,
            )
        )
    counts = [["images in the split", str(report.get("images", "n/a"))]]
    if parsing:
        counts += [
            ["parsing: images scored", str(parsing["images_scored"])],
            [
                "parsing: images missing predictions (all pixels missed)",
                str(parsing["images_missing_predictions"]),
            ],
            [
                "parsing: predictions resized (nearest)",
                str(parsing["resized_predictions"]),
            ],
            ["parsing: pixels counted", str(parsing["pixels"])],
            [
                "parsing: pixels ignored (label 255)",
                str(parsing["ignored_pixels"]),
            ],
        ]
        if parsing["missing_prediction_ids"]:
            counts.append(
                [
                    "parsing: missing prediction ids",
                    _ids(parsing["missing_prediction_ids"]),
                ]
            )
        if parsing["resized_prediction_ids"]:
            counts.append(
                [
                    "parsing: resized ids",
                    _ids(parsing["resized_prediction_ids"]),
                ]
            )
        if parsing["unmatched_prediction_files"]:
            counts.append(
                [
                    "parsing: prediction files of other images (ignored)",
                    _ids(parsing["unmatched_prediction_files"]),
                ]
            )
    if pose:
        counts += [
            ["pose: images scored", str(pose["images_scored"])],
            [
                "pose: images excluded (no head size)",
                str(pose["images_excluded_head_size"]),
            ],
            [
                "pose: images missing predictions (all joints wrong)",
                str(pose["images_missing_predictions"]),
            ],
            ["pose: joints counted (Avg)", str(pose["joints_counted"])],
        ]
        if pose["missing_prediction_ids"]:
            counts.append(
                [
                    "pose: missing prediction ids",
                    _ids(pose["missing_prediction_ids"]),
                ]
            )
        if pose["unmatched_prediction_ids"]:
            counts.append(
                [
                    "pose: predictions of other images (ignored)",
                    _ids(pose["unmatched_prediction_ids"]),
                ]
            )
    tables.append(("Counts", ["what", "count"], counts))
    baseline = report.get("baseline")
    if baseline:
        tables.insert(
            1,
            (
                "Trained vs untrained (same network, initial weights)",
                ["metric", "trained", "untrained", "gain (points)"],
                [
                    [
                        "mIoU",
                        format_score(parsing["mean_iou"] if parsing else None),
                        format_score(baseline.get("miou")),
                        format_score(baseline.get("miou_gain")),
                    ],
                    [
                        "PCKh",
                        format_score(pose["average"] if pose else None),
                        format_score(baseline.get("pckh")),
                        format_score(baseline.get("pckh_gain")),
                    ],
                ],
            ),
        )
    return tables


def _title(report: Mapping) -> str:
    return f"LIP {report.get('split', '?')} evaluation"


# Fields of a model evaluation that say how the numbers were obtained.
_SETUP_FIELDS = (
    ("protocol", "protocol"),
    ("resolution", "resolution"),
    ("image_size", "input size"),
    ("scales", "scales"),
    ("flip", "flip test"),
    ("model", "model"),
    ("records_dir", "records"),
)


def setup_lines(report: Mapping) -> list[str]:
    """`name: value` lines for the setup fields present in `report`
    (protocol, scales, flip, ...); LIP root first."""
    lines = [f"LIP root: {report.get('lip_root', '?')}"]
    for key, label in _SETUP_FIELDS:
        if key in report and report[key] is not None:
            value = report[key]
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            lines.append(f"{label}: {value}")
    return lines


def render_markdown(report: Mapping, overlays: Sequence[str] = ()) -> str:
    """The report as Markdown.

    Args:
        report: an evaluation report dict.
        overlays: overlay image paths relative to the Markdown file.

    Returns:
        Markdown text.
    """
    lines = [f"# {_title(report)}", ""]
    for line in setup_lines(report):
        label, _, value = line.partition(": ")
        lines.append(f"- {label}: `{value}`")
    lines.append("")
    for title, header, rows in report_tables(report):
        lines += [f"## {title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(" --- " for _ in header) + "|")
        for row in rows:
            cells = [cell.replace("|", "\\|") for cell in row]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if overlays:
        lines += ["## Overlays (ground truth | prediction)", ""]
        lines += [f"![{Path(path).stem}]({path})" for path in overlays]
        lines.append("")
    return "\n".join(lines)


def render_html(report: Mapping, overlays: Sequence[str] = ()) -> str:
    """The report as a standalone HTML page (no scripts, inline style).

    Args:
        report: an evaluation report dict.
        overlays: overlay image paths relative to the HTML file.

    Returns:
        HTML text.
    """
    escape = html.escape
    title = escape(_title(report))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title>",
        "<style>body{font-family:sans-serif;margin:2em}"
        "table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #999;padding:2px 8px;text-align:left}"
        "th{background:#eee}img{max-width:100%;margin:4px 0}</style>",
        "</head><body>",
        f"<h1>{title}</h1>",
        "<ul>",
    ]
    for line in setup_lines(report):
        label, _, value = line.partition(": ")
        parts.append(f"<li>{escape(label)}: <code>{escape(value)}</code></li>")
    parts.append("</ul>")
    for table_title, header, rows in report_tables(report):
        parts.append(f"<h2>{escape(table_title)}</h2>")
        parts.append("<table>")
        parts.append(
            "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"
        )
        for row in rows:
            parts.append(
                "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
            )
        parts.append("</table>")
    if overlays:
        parts.append("<h2>Overlays (ground truth | prediction)</h2>")
        for path in overlays:
            source = escape(str(path), quote=True)
            alt = escape(Path(path).stem, quote=True)
            parts.append(f'<div><img src="{source}" alt="{alt}"></div>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report_files(
    report: Mapping, report_dir: str | Path, overlays: Sequence[Path] = ()
) -> tuple[Path, Path]:
    """Writes `report.md` and `report.html` into `report_dir`.

    Args:
        report: an evaluation report dict.
        report_dir: created if needed.
        overlays: overlay image files (linked relative to `report_dir`).

    Returns:
        `(markdown_path, html_path)`.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    relative = [
        Path(path).resolve().relative_to(report_dir.resolve()).as_posix()
        for path in overlays
    ]
    markdown_path = report_dir / "report.md"
    html_path = report_dir / "report.html"
    markdown_path.write_text(render_markdown(report, relative))
    html_path.write_text(render_html(report, relative))
    return markdown_path, html_path
