"""TFDV gate on the preprocessed records: statistics, schema, anomalies, skew.

Reads `<records>/<split>/*.tfrecord.gz` (the output of
`beam_jobs/lip_to_tfrecord.py`) and writes under `<records>/validation/`:

```
stats_<split>.pb / .pbtxt   TFDV DatasetFeatureStatisticsList per split
anomalies_<split>.pbtxt     anomalies of the split against the schema
anomalies_skew.pbtxt        train/val skew on the scalar features
report.json, report.txt     every anomaly, readable
summary.html                offline HTML table of the statistics
facets.html                 TFDV's Facets Overview (loads its viewer from
                            the internet when opened)
```

The schema is the curated one kept in the repository (ValidateConfig.schema,
configs/schema/lip_records.pbtxt); when it does not exist it is inferred
from the train statistics and written there, to be curated by hand.

Run it in-process (FnApiRunner) or on any Beam runner:

    python -m beam_jobs.validate_records --records DIR [--schema PATH] [beam flags]

`nppnet data validate` calls `validate` and exits with code 3 when the
report has anomalies.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_jobs import manifest as manifest_io
from beam_jobs.lip_index import read_bytes
from beam_jobs.lip_to_tfrecord import (
    RECORD_SUFFIX,
    output_splits,
    pipeline_options,
)
from nppnet_tf.config import ValidateConfig

log = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
# Scalar features whose train and val distributions are compared (skew), as
# categorical distributions with the L-infinity distance (the schema marks
# them categorical so that their statistics hold value frequencies).
SKEW_FEATURES = (
    "stats/num_present_keypoints",
    "stats/num_keypoints_in_crop",
    "stats/num_classes_present",
)


def _split_pattern(records_dir: str, split: str) -> str:
    return FileSystems.join(records_dir, split, f"{split}-*{RECORD_SUFFIX}")


def record_splits(records_dir: str) -> dict[str, int | None]:
    """Split -> example count (from the manifest), for splits with shards.

    Raises:
        FileNotFoundError: `records_dir` holds no record shards.
    """
    manifest = manifest_io.read_manifest(records_dir)
    if manifest is not None:
        names = output_splits(manifest["splits"])
        counts = manifest.get("counts", {})
    else:
        names = ["train", "val", "test", "search_weights", "search_arch"]
        counts = {}
    found = {}
    for split in names:
        if FileSystems.match([_split_pattern(records_dir, split)])[
            0
        ].metadata_list:
            found[split] = counts.get(split)
    if not found:
        raise FileNotFoundError(
            f"{records_dir}: no <split>/<split>-*{RECORD_SUFFIX} shards "
            f"(run `nppnet data preprocess` first)"
        )
    return found


def generate_statistics(
    records_dir: str,
    splits: Sequence[str],
    out_dir: str,
    pipeline_args: Sequence[str] = (),
    schema=None,
) -> dict[str, str]:
    """One Beam pipeline computing TFDV statistics of every split.

    Args:
        records_dir: the preprocessing output folder.
        splits: splits to describe.
        out_dir: where the statistics files go.
        pipeline_args: standard Beam flags.
        schema: optional schema; its categorical int features get value
            frequencies (needed for the L-infinity skew check).

    Returns:
        split -> path of its binary statistics file.
    """
    import tensorflow_data_validation as tfdv
    from tfx_bsl.public import tfxio

    options, runner = pipeline_options(pipeline_args)
    paths = {s: FileSystems.join(out_dir, f"stats_{s}.pb") for s in splits}
    stats_options = tfdv.StatsOptions(
        schema=schema, num_top_values=20, num_rank_histogram_buckets=20
    )
    with beam.Pipeline(runner=runner, options=options) as pipeline:
        for split in splits:
            source = tfxio.TFExampleRecord(_split_pattern(records_dir, split))
            _ = (
                pipeline
                | f"Read_{split}" >> source.BeamSource()
                | f"Stats_{split}" >> tfdv.GenerateStatistics(stats_options)
                | f"Write_{split}"
                >> tfdv.WriteStatisticsToBinaryFile(paths[split])
            )
    return paths


def _anomaly_list(anomalies, split: str) -> list[dict[str, Any]]:
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    out = []
    for feature, info in sorted(anomalies.anomaly_info.items()):
        out.append(
            {
                "split": split,
                "feature": feature,
                "severity": anomalies_pb2.AnomalyInfo.Severity.Name(
                    info.severity
                ),
                "short_description": info.short_description,
                "description": info.description,
                "reasons": [
                    anomalies_pb2.AnomalyInfo.Type.Name(reason.type)
                    for reason in info.reason
                ],
            }
        )
    if anomalies.HasField("dataset_anomaly_info"):
        info = anomalies.dataset_anomaly_info
        out.append(
            {
                "split": split,
                "feature": "(dataset)",
                "severity": anomalies_pb2.AnomalyInfo.Severity.Name(
                    info.severity
                ),
                "short_description": info.short_description,
                "description": info.description,
            }
        )
    return out


def _with_skew_comparators(schema, threshold: float):
    """A copy of `schema` comparing the scalar features of train and val."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = schema_pb2.Schema.FromString(schema.SerializeToString())
    for feature in schema.feature:
        if feature.name in SKEW_FEATURES:
            feature.skew_comparator.infinity_norm.threshold = threshold
    return schema


def _write_text(path: str, text: str) -> None:
    with FileSystems.create(path) as handle:
        handle.write(text.encode("utf-8"))


def _feature_rows(stats) -> list[tuple[str, str, str, str]]:
    """(name, type, presence, summary) per feature of one split's stats."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    dataset = stats.datasets[0]
    rows = []
    for feature in sorted(dataset.features, key=lambda f: f.path.step[-1]):
        name = "/".join(feature.path.step)
        kind = statistics_pb2.FeatureNameStatistics.Type.Name(feature.type)
        if feature.HasField("num_stats"):
            num = feature.num_stats
            common = num.common_stats
            summary = (
                f"min {num.min:.4g}, mean {num.mean:.4g}, max {num.max:.4g}, "
                f"std {num.std_dev:.3g}, zeros {num.num_zeros}"
            )
        elif feature.HasField("bytes_stats"):
            common = feature.bytes_stats.common_stats
            summary = (
                f"bytes: min {feature.bytes_stats.min_num_bytes:.0f}, "
                f"avg {feature.bytes_stats.avg_num_bytes:.0f}, "
                f"max {feature.bytes_stats.max_num_bytes:.0f}"
            )
        else:
            common = feature.string_stats.common_stats
            strings = feature.string_stats
            top = ", ".join(
                f"{v.value} ({v.frequency:.0f})"
                for v in strings.top_values[:5]
                if v.value != "__BYTES_VALUE__"  # binary: no readable value
            )
            summary = (
                f"unique {strings.unique}, avg length {strings.avg_length:.0f}"
                + (f"; top {top}" if top else "")
            )
        presence = (
            f"{common.num_non_missing}/{common.num_non_missing + common.num_missing}, "
            f"values {common.min_num_values}..{common.max_num_values}"
        )
        rows.append((name, kind, presence, summary))
    return rows


def summary_html(
    all_stats: dict[str, Any], anomalies: list[dict[str, Any]]
) -> str:
    """A self-contained HTML page: anomalies, then one statistics table per
    split (no scripts, opens offline)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>LIP record statistics</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}"
        ".bad{color:#b00}.ok{color:#070}</style></head><body>",
        "<h1>LIP record statistics (TFDV)</h1>",
    ]
    if anomalies:
        parts.append(f"<h2 class='bad'>{len(anomalies)} anomalies</h2><table>")
        parts.append(
            "<tr><th>split</th><th>feature</th><th>severity</th><th>description</th></tr>"
        )
        for item in anomalies:
            parts.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(str(item[k]))}</td>"
                    for k in ("split", "feature", "severity", "description")
                )
                + "</tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<h2 class='ok'>No anomalies</h2>")
    for split, stats in all_stats.items():
        count = stats.datasets[0].num_examples
        parts.append(f"<h2>{html.escape(split)}: {count} examples</h2><table>")
        parts.append(
            "<tr><th>feature</th><th>type</th><th>present</th><th>summary</th></tr>"
        )
        for row in _feature_rows(stats):
            parts.append(
                "<tr>"
                + "".join(f"<td>{html.escape(v)}</td>" for v in row)
                + "</tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report_text(report: dict[str, Any]) -> str:
    """The report as a few readable lines (what the CLI prints)."""
    lines = [
        f"records: {report['records_dir']}",
        f"schema: {report['schema']}"
        + (" (inferred now: curate it)" if report["schema_inferred"] else ""),
        "examples: "
        + ", ".join(f"{k} {v}" for k, v in report["num_examples"].items()),
        "train/val skew: "
        + (
            f"skipped ({report['skew']['skipped']})"
            if "skipped" in report["skew"]
            else f"L-infinity <= {report['skew']['threshold']} on "
            + ", ".join(report["skew"]["features"])
        ),
    ]
    if not report["anomalies"]:
        lines.append("anomalies: none")
    else:
        lines.append(f"anomalies: {len(report['anomalies'])}")
        for item in report["anomalies"]:
            lines.append(
                f"  [{item['split']}] {item['feature']}: {item['short_description']} "
                f"({item['severity']}): {item['description']}"
            )
    lines.append(f"statistics and report: {report['statistics_dir']}")
    return "\n".join(lines) + "\n"


def validate(
    records_dir: str,
    schema_path: str,
    skew_threshold: float,
    pipeline_args: Sequence[str] = (),
    skew_min_examples: int = ValidateConfig().skew_min_examples,
) -> dict[str, Any]:
    """Statistics per split, schema (inferred if absent), anomalies, skew.

    Args:
        records_dir: the preprocessing output folder.
        schema_path: the curated schema (text proto); written from the train
            statistics when it does not exist yet.
        skew_threshold: train/val skew threshold on the scalar features.
        pipeline_args: standard Beam flags for the statistics pipeline.
        skew_min_examples: skip the skew check (and say so in the report)
            when train or val has fewer records.

    Returns:
        The report: `anomalies` (list of dicts with split, feature,
        severity, short_description, description), `num_examples` per
        split, `schema`, `schema_inferred`, `statistics_dir`, `outputs`. Anomalies
        raise nothing; callers decide (the CLI exits with code 3).

    Raises:
        FileNotFoundError: no record shards in `records_dir`.
    """
    import tensorflow_data_validation as tfdv
    from tensorflow_data_validation.utils import display_util

    records_dir = str(records_dir).rstrip("/")
    splits = record_splits(records_dir)
    out_dir = FileSystems.join(records_dir, VALIDATION_DIR)
    if not FileSystems.exists(out_dir):
        FileSystems.mkdirs(out_dir)
    started = time.time()
    log.info(
        "computing TFDV statistics of %s (%s)", records_dir, ", ".join(splits)
    )
    inferred = not FileSystems.exists(schema_path)
    schema = None if inferred else tfdv.load_schema_text(schema_path)
    stats_paths = generate_statistics(
        records_dir, list(splits), out_dir, pipeline_args, schema
    )
    all_stats = {s: tfdv.load_stats_binary(p) for s, p in stats_paths.items()}
    outputs = {f"stats_{s}": p for s, p in stats_paths.items()}
    for split, stats in all_stats.items():
        path = FileSystems.join(out_dir, f"stats_{split}.pbtxt")
        tfdv.write_stats_text(stats, path)

    reference = "train" if "train" in all_stats else next(iter(all_stats))
    if inferred:
        schema = tfdv.infer_schema(all_stats[reference])
        parent = os.path.dirname(schema_path)
        if parent and not FileSystems.exists(parent):
            FileSystems.mkdirs(parent)
        tfdv.write_schema_text(schema, schema_path)
        log.warning(
            "no schema at %s: inferred one from %s and wrote it; curate it "
            "(docs/data.md)",
            schema_path,
            reference,
        )

    anomalies: list[dict[str, Any]] = []
    num_examples = {
        s: int(st.datasets[0].num_examples) for s, st in all_stats.items()
    }
    for split, stats in all_stats.items():
        result = tfdv.validate_statistics(stats, schema)
        path = FileSystems.join(out_dir, f"anomalies_{split}.pbtxt")
        tfdv.write_anomalies_text(result, path)
        outputs[f"anomalies_{split}"] = path
        anomalies += _anomaly_list(result, split)
        expected = splits[split]
        if expected is not None and expected != num_examples[split]:
            anomalies.append(
                {
                    "split": split,
                    "feature": "(dataset)",
                    "severity": "ERROR",
                    "short_description": "Count differs from manifest",
                    "description": f"{num_examples[split]} records, manifest says {expected}",
                }
            )
    skew = {"features": list(SKEW_FEATURES), "threshold": skew_threshold}
    if "train" not in all_stats or "val" not in all_stats:
        skew["skipped"] = "needs both train and val records"
    elif min(num_examples["train"], num_examples["val"]) < skew_min_examples:
        skew["skipped"] = (
            f"train {num_examples['train']} / val {num_examples['val']} records, "
            f"fewer than validate.skew_min_examples = {skew_min_examples}"
        )
    if "skipped" in skew:
        log.info("train/val skew check skipped: %s", skew["skipped"])
    else:
        skew_schema = _with_skew_comparators(schema, skew_threshold)
        result = tfdv.validate_statistics(
            all_stats["train"], skew_schema, serving_statistics=all_stats["val"]
        )
        path = FileSystems.join(out_dir, "anomalies_skew.pbtxt")
        tfdv.write_anomalies_text(result, path)
        outputs["anomalies_skew"] = path
        anomalies += [
            item
            for item in _anomaly_list(result, "train/val")
            # Only the comparisons: schema anomalies of train are reported above.
            if any(r.startswith("COMPARATOR_") for r in item.get("reasons", []))
        ]
    if "search_weights" in num_examples and "train" in num_examples:
        halves = num_examples["search_weights"] + num_examples.get(
            "search_arch", 0
        )
        if halves != num_examples["train"]:
            anomalies.append(
                {
                    "split": "search_weights+search_arch",
                    "feature": "(dataset)",
                    "severity": "ERROR",
                    "short_description": "Search halves do not add up to train",
                    "description": f"{halves} records in the halves, {num_examples['train']} in train",
                }
            )

    summary_path = FileSystems.join(out_dir, "summary.html")
    _write_text(summary_path, summary_html(all_stats, anomalies))
    outputs["summary_html"] = summary_path
    # TFDV's Facets view is a plain HTML string (no IPython needed to build
    # it); the page loads the Facets viewer from the internet when opened.
    facets_path = FileSystems.join(out_dir, "facets.html")
    rhs = all_stats.get("val") if reference == "train" else None
    facets = display_util.get_statistics_html(
        all_stats[reference], rhs, lhs_name=reference, rhs_name="val"
    )
    _write_text(
        facets_path, f"<!doctype html><html><body>{facets}</body></html>"
    )
    outputs["facets_html"] = facets_path
    report = {
        "records_dir": records_dir,
        "statistics_dir": out_dir,
        "schema": str(schema_path),
        "schema_inferred": inferred,
        "num_examples": num_examples,
        "skew": skew,
        "anomalies": anomalies,
        "outputs": outputs,
        "seconds": round(time.time() - started, 2),
    }
    report_path = FileSystems.join(out_dir, "report.json")
    _write_text(
        report_path, json.dumps(report, indent=2, sort_keys=True) + "\n"
    )
    _write_text(FileSystems.join(out_dir, "report.txt"), report_text(report))
    log.info(
        "validated %s: %d anomalies in %.1f s; report %s",
        records_dir, len(anomalies), report["seconds"], report_path,
    )  # fmt: skip
    return report


def load_report(records_dir: str) -> dict[str, Any]:
    """The last report written under `<records_dir>/validation/`."""
    path = FileSystems.join(records_dir, VALIDATION_DIR, "report.json")
    return json.loads(read_bytes(path).decode())


def run(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; unknown flags are Beam pipeline options.
    Returns 3 when the gate fails (anomalies), else 0."""
    defaults = ValidateConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", required=True)
    parser.add_argument("--schema", default=defaults.schema)
    parser.add_argument(
        "--skew-threshold", type=float, default=defaults.skew_threshold
    )
    parser.add_argument(
        "--skew-min-examples", type=int, default=defaults.skew_min_examples
    )
    args, pipeline_args = parser.parse_known_args(argv)
    report = validate(
        args.records,
        args.schema,
        args.skew_threshold,
        pipeline_args,
        args.skew_min_examples,
    )
    sys.stdout.write(report_text(report))
    return 3 if report["anomalies"] else 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(run())
