"""LIP release folder -> sharded GZIP TFRecords, dead letters and a manifest.

Reads `--lip-root` (the LIP release layout, `nppnet_tf/data/lip_files.py`;
optionally the authors' JSON annotations), and writes under `--out`:

```
<out>/<split>/<split>-00000-of-000NN.tfrecord.gz   train, val, search_weights,
                                                   search_arch (, test)
<out>/dead_letter/dead_letter-00000-of-00001.jsonl one JSON object per bad record
<out>/manifest.json                                counts, config, fingerprint
```

`search_weights` and `search_arch` are the two halves of `train` (byte-equal
records), chosen by the parity of the last byte of sha1(image id).

Run it in-process (FnApiRunner, no network):

    python -m beam_jobs.lip_to_tfrecord --lip-root DIR --out DIR

or on a cluster by adding standard Beam pipeline options, e.g.
`--runner=FlinkRunner --flink_master=HOST:8081 --environment_type=LOOPBACK`
(docs/data.md has Flink, Spark and Dataflow commands). `nppnet data
preprocess` calls `preprocess` below.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from beam_jobs import lip_examples, lip_index, manifest
from nppnet_tf.config import DataConfig, section_hash, to_dict
from nppnet_tf.data import records

log = logging.getLogger(__name__)

FAILED = "failed"  # tag of the side outputs that carry dead letters
METRICS_NAMESPACE = "nppnet_lip"
SEARCH_SPLITS = ("search_weights", "search_arch")
DEAD_LETTER_DIR = "dead_letter"
COUNTS_DIR = "_counts"
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"
RECORD_SUFFIX = ".tfrecord.gz"


def search_half(image_id: str) -> str:
    """`"search_weights"` or `"search_arch"`: the bilevel search's half of
    `train` that `image_id` belongs to (even / odd last byte of its sha1)."""
    digest = hashlib.sha1(image_id.encode("utf-8")).digest()
    return SEARCH_SPLITS[digest[-1] % 2]


def _count_dead_letter(entry: dict) -> None:
    Metrics.counter(
        METRICS_NAMESPACE, f"dead_letter/{entry['stage']}/{entry['reason']}"
    ).inc()


# ---------------------------------------------------------------------------
# Transforms


class _SourcesFn(beam.DoFn):
    def __init__(self, lip_root: str, annotation_json: Mapping[str, str]):
        super().__init__()
        self.lip_root = lip_root
        self.annotation_json = dict(annotation_json)

    def process(self, split: str):
        sources = lip_index.split_sources(
            self.lip_root, split, self.annotation_json.get(split)
        )
        for image_id, source in sources:
            if image_id is None:
                yield beam.pvalue.TaggedOutput(FAILED, source)
            else:
                yield image_id, source


class _JoinFn(beam.DoFn):
    def __init__(self):
        super().__init__()
        self.input_records = Metrics.counter(METRICS_NAMESPACE, "input_records")

    def process(self, keyed):
        image_id, sources = keyed
        self.input_records.inc()
        joined = lip_index.join_sources(image_id, sources)
        if isinstance(joined, dict):
            _count_dead_letter(joined)
            yield beam.pvalue.TaggedOutput(FAILED, joined)
        else:
            yield joined


def _unkeyed_to_dead_letter(source: lip_index.Source) -> dict:
    Metrics.counter(METRICS_NAMESPACE, "input_records").inc()
    entry = lip_index.unkeyed_dead_letter(source)
    _count_dead_letter(entry)
    return entry


class ReadLIPIndex(beam.PTransform):
    """Pipeline start -> `LIPRow`s; input records that cannot become a row
    (duplicates, missing pieces, unreadable annotation rows) go to
    `.failed` as dead-letter dicts. One output per input record.

    Args:
        lip_root: the LIP release folder (local or remote path).
        splits: release splits to read ("train", "val", optionally "test").
        annotation_json: split -> authors' JSON replacing the pose CSV.
    """

    def __init__(
        self,
        lip_root: str,
        splits: Sequence[str],
        annotation_json: Mapping[str, str] | None = None,
    ):
        super().__init__()
        if not splits:
            raise ValueError("ReadLIPIndex needs at least one split")
        self.lip_root = str(lip_root)
        self.splits = tuple(splits)
        self.annotation_json = dict(annotation_json or {})

    def expand(self, pbegin):
        pieces = (
            pbegin
            | "Splits" >> beam.Create(self.splits)
            | "ListSources"
            >> beam.ParDo(
                _SourcesFn(self.lip_root, self.annotation_json)
            ).with_outputs(FAILED, main="keyed")
        )
        joined = (
            pieces.keyed
            | "GroupById" >> beam.GroupByKey()
            | "Join" >> beam.ParDo(_JoinFn()).with_outputs(FAILED, main="rows")
        )
        unkeyed = pieces[FAILED] | "Unkeyed" >> beam.Map(
            _unkeyed_to_dead_letter
        )
        failed = (
            joined[FAILED],
            unkeyed,
        ) | "AllIndexFailures" >> beam.Flatten()
        return {"rows": joined.rows, FAILED: failed}


class _EncodeFn(beam.DoFn):
    def __init__(self, data_config: DataConfig):
        super().__init__()
        self.data_config = data_config

    def process(self, row: lip_examples.LIPRow):
        try:
            image_jpeg = self._read(
                row.image_path, "decode_image", "unreadable_image_file"
            )
            label_png = None
            if row.label_path is not None:
                label_png = self._read(
                    row.label_path, "decode_label", "unreadable_label_file"
                )
            sample = lip_examples.build_sample(
                row, image_jpeg, label_png, self.data_config
            )
        except lip_examples.ExampleError as err:
            entry = lip_index.dead_letter(
                row.image_id,
                row.split,
                err.stage,
                err.reason,
                err.message,
                row.sources,
            )
            _count_dead_letter(entry)
            yield beam.pvalue.TaggedOutput(FAILED, entry)
            return
        Metrics.counter(METRICS_NAMESPACE, f"examples/{row.split}").inc()
        yield row.split, row.image_id, records.encode_example(sample)

    @staticmethod
    def _read(path: str, stage: str, reason: str) -> bytes:
        try:
            return lip_index.read_bytes(path)
        except OSError as err:  # vanished or unreadable since listing
            raise lip_examples.ExampleError(
                stage, reason, f"{path}: {err}"
            ) from None


class EncodeExamples(beam.PTransform):
    """`LIPRow` -> `(split, image_id, serialized tf.train.Example)`. Rows
    whose files fail a check go to `.failed` as dead-letter dicts; nothing
    is dropped silently.

    Args:
        data_config: crop size, heatmap stride and sigmas, edge width,
            keypoint margin.
    """

    def __init__(self, data_config: DataConfig):
        super().__init__()
        if not isinstance(data_config, DataConfig):
            raise TypeError(
                f"data_config must be a DataConfig, got {type(data_config).__name__}"
            )
        self.data_config = data_config

    def expand(self, rows):
        encode = beam.ParDo(_EncodeFn(self.data_config))
        return rows | "Encode" >> encode.with_outputs(FAILED, main="examples")


def _with_search_halves(example):
    split, image_id, serialized = example
    yield split, serialized
    if split == "train":
        yield search_half(image_id), serialized


class AssignSplits(beam.PTransform):
    """`(split, image_id, bytes)` -> `(output split, bytes)`: every example
    under its release split, and train examples also under their search
    half."""

    def expand(self, examples):
        return examples | "SearchHalves" >> beam.FlatMap(_with_search_halves)


class WriteShards(beam.PTransform):
    """Writes one split's serialized examples as GZIP TFRecord shards
    `<out_dir>/<split>/<split>-SSSSS-of-NNNNN.tfrecord.gz`.

    Args:
        out_dir: output root.
        split: output split name.
        num_shards: number of shard files (written even when empty).
    """

    def __init__(self, out_dir: str, split: str, num_shards: int):
        super().__init__()
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.out_dir = str(out_dir)
        self.split = split
        self.num_shards = num_shards

    def expand(self, assigned):
        return (
            assigned
            | "Select"
            >> beam.Filter(lambda item, split: item[0] == split, self.split)
            | "Bytes" >> beam.Map(lambda item: item[1])
            | "Write"
            >> beam.io.WriteToTFRecord(
                FileSystems.join(self.out_dir, self.split, self.split),
                file_name_suffix=RECORD_SUFFIX,
                num_shards=self.num_shards,
                shard_name_template=SHARD_TEMPLATE,
                compression_type=CompressionTypes.GZIP,
            )
        )


class WriteDeadLetters(beam.PTransform):
    """Dead-letter dicts -> `<out_dir>/dead_letter/dead_letter-*.jsonl`
    (one file, written even when empty)."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = str(out_dir)

    def expand(self, entries):
        return (
            entries
            | "ToJson"
            >> beam.Map(lambda entry: json.dumps(entry, sort_keys=True))
            | "Write"
            >> beam.io.WriteToText(
                FileSystems.join(
                    self.out_dir, DEAD_LETTER_DIR, DEAD_LETTER_DIR
                ),
                file_name_suffix=".jsonl",
                num_shards=1,
                shard_name_template=SHARD_TEMPLATE,
            )
        )


def _count_keys(assigned, dead_letters):
    splits = assigned | "SplitKeys" >> beam.Map(
        lambda item: (f"split/{item[0]}", 1)
    )
    reasons = dead_letters | "ReasonKeys" >> beam.Map(
        lambda entry: (f"dead_letter/{entry['stage']}/{entry['reason']}", 1)
    )
    return (
        (splits, reasons)
        | "CountKeys" >> beam.Flatten()
        | beam.CombinePerKey(sum)
    )


def build_pipeline(
    pipeline: beam.Pipeline,
    lip_root: str,
    out_dir: str,
    data_config: DataConfig,
    splits: Sequence[str],
    annotation_json: Mapping[str, str] | None = None,
) -> None:
    """Adds the whole job to `pipeline`: ReadLIPIndex | Reshuffle |
    EncodeExamples | AssignSplits | WriteShards, dead letters and counts
    written beside the shards."""
    index = pipeline | "ReadLIPIndex" >> ReadLIPIndex(
        lip_root, splits, annotation_json
    )
    encoded = (
        index["rows"]
        | "Reshuffle" >> beam.Reshuffle()
        | "EncodeExamples" >> EncodeExamples(data_config)
    )
    assigned = encoded.examples | "AssignSplits" >> AssignSplits()
    output_splits = list(splits) + (
        list(SEARCH_SPLITS) if "train" in splits else []
    )
    for split in output_splits:
        assigned | f"Write_{split}" >> WriteShards(
            out_dir, split, data_config.shards
        )
    dead_letters = (
        index[FAILED],
        encoded[FAILED],
    ) | "DeadLetters" >> beam.Flatten()
    dead_letters | "WriteDeadLetters" >> WriteDeadLetters(out_dir)
    (
        _count_keys(assigned, dead_letters)
        | "CountsJson"
        >> beam.Map(lambda kv: json.dumps({"key": kv[0], "count": kv[1]}))
        | "WriteCounts"
        >> beam.io.WriteToText(
            FileSystems.join(out_dir, COUNTS_DIR, "counts"),
            file_name_suffix=".jsonl",
            num_shards=1,
            shard_name_template="",
        )
    )


# ---------------------------------------------------------------------------
# Runner and driver


def pipeline_options(
    pipeline_args: Sequence[str] = (), direct_num_workers: int = 1
) -> tuple[PipelineOptions, Any]:
    """Beam options from standard flags, and the runner to use.

    Without `--runner` the job runs in-process on the FnApiRunner (no
    download, no network). With 2+ workers it runs them as threads
    (`multi_threading`, the faster mode here: TensorFlow and zlib release
    the GIL) unless `--direct_running_mode=multi_processing` asks for local
    subprocesses. With `--runner` the named runner (FlinkRunner,
    SparkRunner, DataflowRunner, ...) is used with the flags as given.

    Returns:
        `(options, runner)`; runner is a runner instance or None (the
        options name it).
    """
    options = PipelineOptions(list(pipeline_args))
    if options.view_as(StandardOptions).runner:
        return options, None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    direct = options.view_as(DirectOptions)
    direct.direct_num_workers = direct_num_workers
    mode_given = any(
        a.startswith("--direct_running_mode") for a in pipeline_args
    )
    if direct_num_workers > 1 and not mode_given:
        direct.direct_running_mode = "multi_threading"
    if direct.direct_running_mode == "multi_processing":
        # Subprocess workers must import nppnet_tf and beam_jobs even when
        # the project is not pip-installed.
        root = str(Path(__file__).resolve().parents[1])
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [root, *filter(None, paths)]
            )
    return options, FnApiRunner()


def output_splits(splits: Sequence[str]) -> list[str]:
    out = list(splits)
    if "train" in splits:
        out += list(SEARCH_SPLITS)
    return out


def _job_key(
    data_config: DataConfig,
    splits: Sequence[str],
    annotation_json: Mapping[str, str],
) -> str:
    text = json.dumps(
        {
            "format_version": records.FORMAT_VERSION,
            "data": section_hash(data_config),
            "splits": list(splits),
            "annotation_json": dict(sorted(annotation_json.items())),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _outputs_present(out_dir: str, previous: Mapping[str, Any]) -> bool:
    patterns = list(previous.get("outputs", {}).values())
    if not patterns:
        return False
    for pattern in patterns:
        if not FileSystems.match([pattern])[0].metadata_list:
            return False
    return True


def _clear_outputs(out_dir: str, splits: Sequence[str]) -> None:
    """Deletes what a previous run wrote (manifest first, so an interrupted
    rebuild never looks complete)."""
    paths = []
    if FileSystems.exists(manifest.manifest_path(out_dir)):
        paths.append(manifest.manifest_path(out_dir))
    for sub in [
        *output_splits(splits),
        "test",
        DEAD_LETTER_DIR,
        COUNTS_DIR,
        "validation",
    ]:
        pattern = FileSystems.join(out_dir, sub, "*")
        paths += [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if paths:
        FileSystems.delete(sorted(set(paths)))


def _read_counts(out_dir: str) -> dict[str, int]:
    path = FileSystems.join(out_dir, COUNTS_DIR, "counts.jsonl")
    counts = {}
    for line in lip_index.read_text(path).splitlines():
        if line.strip():
            item = json.loads(line)
            counts[item["key"]] = int(item["count"])
    return counts


def _metrics(result) -> dict[str, int]:
    try:
        query = result.metrics().query(
            MetricsFilter().with_namespace(METRICS_NAMESPACE)
        )
    except (NotImplementedError, AttributeError):  # some runners have none
        return {}
    return {
        c.key.metric.name: int(c.committed or c.attempted or 0)
        for c in query["counters"]
    }


def _total_bytes(pattern: str) -> int:
    return sum(
        m.size_in_bytes for m in FileSystems.match([pattern])[0].metadata_list
    )


def available_splits(lip_root: str, include_test: bool) -> list[str]:
    """train and val, plus test when asked for and present."""
    splits = ["train", "val"]
    if include_test:
        paths = lip_index.layout_paths(lip_root, "test")
        if FileSystems.exists(paths["id_file"]):
            splits.append("test")
        else:
            log.warning(
                "include_test: %s not found; no test split", paths["id_file"]
            )
    return splits


def preprocess(
    lip_root: str,
    out_dir: str,
    data_config: DataConfig,
    pipeline_args: Sequence[str] = (),
    direct_num_workers: int = 1,
    force: bool = False,
    annotation_json: Mapping[str, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the preprocessing job unless its outputs are up to date.

    Args:
        lip_root: LIP release folder.
        out_dir: output root (created).
        data_config: the `data` section of the run config.
        pipeline_args: standard Beam pipeline flags (`--runner=...`).
        direct_num_workers: workers of the in-process runner.
        force: rebuild even if the manifest says the outputs are current.
        annotation_json: split -> authors' JSON file (reference 8.2), used
            instead of that split's pose CSV.
        progress: show a progress bar while fingerprinting the inputs.

    Returns:
        The manifest dict; `skipped` is True when nothing had to be done.

    Raises:
        FileNotFoundError: `lip_root` lacks part of the release layout, or
            an annotation JSON does not exist.
        ValueError: an annotation JSON for an unknown split.
    """
    lip_root = str(lip_root).rstrip("/")
    out_dir = str(out_dir).rstrip("/")
    annotation_json = {k: str(v) for k, v in (annotation_json or {}).items()}
    for split, path in annotation_json.items():
        if split not in lip_index.ANNOTATED_SPLITS:
            raise ValueError(
                f"annotation JSON for unknown split {split!r} (train or val)"
            )
        if not FileSystems.exists(path):
            raise FileNotFoundError(
                f"annotation JSON for {split}: {path} does not exist"
            )
    splits = available_splits(lip_root, data_config.include_test)
    for split in splits:
        paths = lip_index.layout_paths(lip_root, split)
        for name, path in paths.items():
            if name == "pose_csv" and split in annotation_json:
                continue
            if not FileSystems.exists(path):
                raise FileNotFoundError(
                    f"LIP root {lip_root}: missing {path} (expected the LIP release "
                    f"layout, see docs/data.md)"
                )
    files = manifest.input_files(lip_root, splits, annotation_json)
    log.info("fingerprinting %d input files under %s", len(files), lip_root)
    fingerprint = manifest.fingerprint(lip_root, files, progress=progress)
    job_key = _job_key(data_config, splits, annotation_json)
    previous = manifest.read_manifest(out_dir)
    if (
        not force
        and previous is not None
        and previous.get("input_fingerprint") == fingerprint
        and previous.get("job_key") == job_key
        and _outputs_present(out_dir, previous)
    ):
        log.info(
            "%s is up to date (same inputs and config); nothing to do", out_dir
        )
        return {**previous, "skipped": True}

    _clear_outputs(out_dir, splits)
    options, runner = pipeline_options(pipeline_args, direct_num_workers)
    runner_name = (
        type(runner).__name__
        if runner
        else options.view_as(StandardOptions).runner
    )
    log.info(
        "preprocessing %s -> %s on %s (%d input files, splits %s)",
        lip_root, out_dir, runner_name, len(files), ", ".join(splits),
    )  # fmt: skip
    started = time.time()
    pipeline = beam.Pipeline(runner=runner, options=options)
    build_pipeline(
        pipeline, lip_root, out_dir, data_config, splits, annotation_json
    )
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.time() - started

    counts = _read_counts(out_dir)
    split_counts = {
        s: counts.get(f"split/{s}", 0) for s in output_splits(splits)
    }
    reasons = {
        key.split("/", 1)[1]: value
        for key, value in sorted(counts.items())
        if key.startswith("dead_letter/")
    }
    num_examples = sum(split_counts[s] for s in splits)
    num_dead = sum(reasons.values())
    metrics = _metrics(result)
    outputs = {
        s: FileSystems.join(out_dir, s, f"{s}-*{RECORD_SUFFIX}")
        for s in output_splits(splits)
    }
    outputs["dead_letter"] = FileSystems.join(
        out_dir, DEAD_LETTER_DIR, "*.jsonl"
    )
    record_bytes = sum(_total_bytes(outputs[s]) for s in splits)
    info = {
        "format_version": records.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "lip_root": lip_root,
        "out_dir": out_dir,
        "splits": splits,
        "annotation_json": annotation_json,
        "config": to_dict(data_config),
        "input_fingerprint": fingerprint,
        "num_input_files": len(files),
        "job_key": job_key,
        "runner": runner_name,
        "pipeline_args": list(pipeline_args),
        "direct_num_workers": direct_num_workers,
        "seconds": round(seconds, 2),
        "counts": split_counts,
        "num_examples": num_examples,
        "num_dead_letters": num_dead,
        "dead_letter_counts": reasons,
        "input_records": metrics.get("input_records", num_examples + num_dead),
        "metrics": metrics,
        "outputs": outputs,
        "record_bytes": record_bytes,
        "bytes_per_example": round(record_bytes / num_examples, 1)
        if num_examples
        else None,
    }
    if split_counts.get("train", 0) != sum(
        split_counts.get(s, 0) for s in SEARCH_SPLITS
    ) and ("train" in splits):
        raise RuntimeError(
            f"search halves do not add up to train: {split_counts}"
        )
    if metrics and metrics.get("input_records") != num_examples + num_dead:
        raise RuntimeError(
            f"{metrics.get('input_records')} input records but {num_examples} examples "
            f"+ {num_dead} dead letters"
        )
    manifest.write_manifest(out_dir, info)
    log.info(
        "wrote %d examples (%s), %d dead letters in %.1f s; manifest %s",
        num_examples,
        ", ".join(f"{k} {v}" for k, v in split_counts.items()),
        num_dead,
        seconds,
        manifest.manifest_path(out_dir),
    )
    return {**info, "skipped": False}


def parse_annotation_json_flags(values: Sequence[str]) -> dict[str, str]:
    """`["train=a.json", "val=b.json"]` -> `{"train": "a.json", ...}`.

    Raises:
        ValueError: a value without `=`.
    """
    out = {}
    for value in values:
        split, sep, path = value.partition("=")
        if not sep or not path:
            raise ValueError(
                f"--annotation-json {value!r}: expected SPLIT=PATH"
            )
        out[split] = path
    return out


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; flags this module does not know are Beam
    pipeline options."""
    from nppnet_tf.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lip-root", required=True, help="LIP release folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--config", help="run config YAML (its data and beam sections)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE"
    )
    parser.add_argument(
        "--annotation-json", action="append", default=[], metavar="SPLIT=PATH"
    )
    parser.add_argument("--direct-num-workers", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    args, pipeline_args = parser.parse_known_args(argv)
    data_config, beam_args, workers = DataConfig(), [], 1
    if args.config:
        config = load_config(args.config, args.set)
        data_config = config.data
        beam_args = list(config.beam.pipeline_args)
        workers = config.beam.direct_num_workers
    return preprocess(
        args.lip_root,
        args.out,
        data_config,
        pipeline_args=[*beam_args, *pipeline_args],
        direct_num_workers=args.direct_num_workers or workers,
        force=args.force,
        annotation_json=parse_annotation_json_flags(args.annotation_json),
    )


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    summary = run()
    sys.stdout.write(
        json.dumps(
            {k: summary[k] for k in ("counts", "dead_letter_counts", "skipped")}
        )
        + "\n"
    )
