"""`check_export`: an export served the way TF Serving would serve it.

On a machine without the model server binary, this is the closest check
of an export before it ships:

1. layout: `saved_model.pb`, variables, `assets.extra` (warmup requests,
   the source Keras model, metadata), the stored model's SHA-256;
2. only core TensorFlow ops in every graph and function (`ops.py`);
3. `tf.saved_model.load(..., tags=["serve"])` and the two signatures with
   the expected inputs and outputs;
4. every warmup record replayed through its signature (`PredictionLog` ->
   `PredictRequest` -> tensors -> signature -> `PredictResponse`);
5. a gRPC `PredictRequest` and REST bodies (row and columnar, images as
   `{"b64": ...}`) carrying a JPEG and a PNG of different sizes, decoded
   as the server decodes them, answered and decoded as a client would;
   keypoints, parsing and image sizes compared with the Keras model's
   predictions by the evaluation code (`reference.predict_official`):
   keypoints within `tolerance_px` original pixels, scores within
   `score_tolerance`, parsing pixels agreeing on at least
   `min_agreement`;
6. `dense_maps` against `model(images, training=False)`;
7. bad requests (bytes that are not an image, an empty string, an empty
   batch, an empty REST `instances` list) rejected with a readable
   `InvalidArgumentError` (or, for REST, the server's 400 error) while the
   process goes on.

Every check runs even if an earlier one failed (when it can); the report
lists each with its outcome and numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from nppnet_tf.data.augment import normalize_image
from nppnet_tf.data.geometry import warp_image
from nppnet_tf.evaluation.official import official_crop
from nppnet_tf.export import file_sha256, load_keras_model
from nppnet_tf.serving import protocol, rest
from nppnet_tf.serving.layout import (
    ASSETS_EXTRA,
    KERAS_MODEL_FILE,
    MODEL_NAME,
    WARMUP_FILE,
    find_version_dir,
    read_metadata,
)
from nppnet_tf.serving.module import (
    DEFAULT_SIGNATURE,
    DENSE_INPUT,
    DENSE_OUTPUTS,
    DENSE_SIGNATURE,
    IMAGE_BYTES,
    IMAGE_SIZE,
    KEYPOINTS,
    PARSING_PNG,
    SIGNATURE_INPUTS,
    SIGNATURE_OUTPUTS,
    error_message,
)
from nppnet_tf.serving.ops import non_core_ops, saved_model_ops
from nppnet_tf.serving.reference import predict_official
from nppnet_tf.serving.samples import DEFAULT_SAMPLES, sample_images

log = logging.getLogger(__name__)

TOLERANCE_PX = 1.0
SCORE_TOLERANCE = 1e-3
MIN_AGREEMENT = 0.999
DENSE_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Check:
    """One check: its name, outcome and what it found."""

    name: str
    passed: bool
    detail: str


@dataclasses.dataclass
class CheckReport:
    """All checks of one export.

    Attributes:
        version_dir: the SavedModel checked.
        keras_model: the Keras model compared with.
        checks: in the order they ran.
    """

    version_dir: Path
    keras_model: Path | None
    checks: list[Check] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version_dir": str(self.version_dir),
            "keras_model": None
            if self.keras_model is None
            else str(self.keras_model),
            "passed": self.passed,
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }

    def format(self) -> str:
        """A readable report, one line per check."""
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [f"serve-check {self.version_dir}"]
        if self.keras_model is not None:
            lines.append(f"compared with Keras model {self.keras_model}")
        for check in self.checks:
            mark = "PASS" if check.passed else "FAIL"
            lines.append(f"  {mark}  {check.name:<{width}}  {check.detail}")
        failed = sum(not c.passed for c in self.checks)
        lines.append(
            f"{len(self.checks) - failed}/{len(self.checks)} checks passed"
            + ("" if failed == 0 else f", {failed} FAILED")
        )
        return "\n".join(lines)


def _run(report: CheckReport, name: str, check: Callable[[], str]) -> bool:
    """Runs one check; an exception is a failure with its message."""
    try:
        detail = check()
    except _CheckFailed as failure:
        report.checks.append(Check(name, False, str(failure)))
    except tf.errors.OpError as err:
        report.checks.append(
            Check(name, False, f"{type(err).__name__}: {error_message(err)}")
        )
    except (ValueError, KeyError, OSError) as err:
        report.checks.append(Check(name, False, f"{type(err).__name__}: {err}"))
    else:
        report.checks.append(Check(name, True, detail))
        return True
    log.warning("%s failed: %s", name, report.checks[-1].detail)
    return False


class _CheckFailed(Exception):
    """A check ran and found a mismatch."""


def compare_predictions(
    served: dict[str, Any],
    reference: Sequence[dict[str, np.ndarray]],
    tolerance_px: float = TOLERANCE_PX,
    score_tolerance: float = SCORE_TOLERANCE,
    min_agreement: float = MIN_AGREEMENT,
) -> str:
    """Compares `serving_default` outputs with `predict_official`'s.

    Args:
        served: `keypoints` `(batch, 16, 3)`, `parsing_png_bytes` (PNG
            bytes per image), `image_size` `(batch, 2)`, as a client
            decodes them.
        reference: one dict per image (`predict_official`).
        tolerance_px: largest keypoint distance allowed per axis, original
            pixels.
        score_tolerance: largest score difference allowed.
        min_agreement: smallest fraction of equal parsing pixels allowed.

    Returns:
        A summary of the largest differences.

    Raises:
        _CheckFailed: a difference beyond the tolerances or a shape
            mismatch.
    """
    keypoints = np.asarray(served[KEYPOINTS], np.float32)
    sizes = np.asarray(served[IMAGE_SIZE], np.int64)
    pngs = list(served[PARSING_PNG])
    if not (len(keypoints) == len(sizes) == len(pngs) == len(reference)):
        raise _CheckFailed(
            f"batch sizes differ: {len(keypoints)} keypoints, {len(sizes)} "
            f"sizes, {len(pngs)} PNGs for {len(reference)} images"
        )
    worst_px = worst_score = 0.0
    worst_agreement = 1.0
    problems = []
    for index, expected in enumerate(reference):
        if tuple(sizes[index]) != tuple(expected["image_size"]):
            problems.append(
                f"image {index}: image_size {sizes[index].tolist()} != "
                f"{expected['image_size'].tolist()}"
            )
            continue
        labels = tf.io.decode_png(pngs[index]).numpy()
        if labels.shape != (*expected["labels"].shape, 1):
            problems.append(
                f"image {index}: parsing PNG shape {labels.shape[:2]} != "
                f"{expected['labels'].shape}"
            )
            continue
        agreement = float(np.mean(labels[..., 0] == expected["labels"]))
        distance = float(
            np.max(
                np.abs(keypoints[index, :, :2] - expected["keypoints"][:, :2])
            )
        )
        score = float(
            np.max(np.abs(keypoints[index, :, 2] - expected["keypoints"][:, 2]))
        )
        worst_px = max(worst_px, distance)
        worst_score = max(worst_score, score)
        worst_agreement = min(worst_agreement, agreement)
    summary = (
        f"{len(reference)} images: keypoints max |d| {worst_px:.3g} px, "
        f"score max |d| {worst_score:.3g}, parsing agreement "
        f"{100 * worst_agreement:.3f}%"
    )
    if worst_px > tolerance_px:
        problems.append(
            f"keypoints differ by {worst_px:.3g} > {tolerance_px} px"
        )
    if worst_score > score_tolerance:
        problems.append(
            f"scores differ by {worst_score:.3g} > {score_tolerance}"
        )
    if worst_agreement < min_agreement:
        problems.append(
            f"parsing agreement {100 * worst_agreement:.3f}% < "
            f"{100 * min_agreement:.3f}%"
        )
    if problems:
        raise _CheckFailed(f"{summary}; MISMATCH: " + "; ".join(problems))
    return summary


def _input_dtypes(signatures) -> dict[str, dict[str, tf.DType]]:
    return {
        name: {
            key: spec.dtype
            for key, spec in function.structured_input_signature[1].items()
        }
        for name, function in signatures.items()
    }


def _expect_rejected(call: Callable[[], Any], what: str) -> str:
    try:
        call()
    except tf.errors.InvalidArgumentError as err:
        return f"{what}: InvalidArgumentError: {error_message(err)}"
    except rest.RestRequestError as err:
        return f"{what}: rejected (HTTP 400): {err}"
    raise _CheckFailed(f"{what} was accepted; expected an error")


def _letterboxed(encoded_images: Sequence[bytes], image_size: int) -> tf.Tensor:
    crops = []
    for data in encoded_images:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        crop = official_crop(image.shape[0], image.shape[1], image_size)
        crops.append(
            normalize_image(warp_image(image, crop["matrix"], image_size))
        )
    return tf.stack(crops)


def check_export(
    path: str | Path,
    keras_model: str | Path | None = None,
    images: Sequence[tuple[str, bytes]] | None = None,
    model_name: str = MODEL_NAME,
    version: int | None = None,
    tolerance_px: float = TOLERANCE_PX,
    score_tolerance: float = SCORE_TOLERANCE,
    min_agreement: float = MIN_AGREEMENT,
) -> CheckReport:
    """Runs every check of the module doc on an export.

    Args:
        path: an export base, model base path or version directory.
        keras_model: the `.keras` model to compare with; None uses the
            copy stored in the export (`assets.extra/model.keras`).
        images: `(name, encoded bytes)` pairs sent in the requests; None
            uses a JPEG and a PNG sample of different odd sizes.
        model_name: the served model's name.
        version: the version to check; None checks the latest.
        tolerance_px, score_tolerance, min_agreement: see
            `compare_predictions`.

    Returns:
        A `CheckReport` (`passed` tells the outcome).

    Raises:
        FileNotFoundError: no SavedModel at `path`, or no Keras model.
        ValueError: no metadata to read the input size from.
    """
    version_dir = find_version_dir(path, model_name, version)
    metadata = read_metadata(version_dir)
    missing = [key for key in ("image_size", "flip") if key not in metadata]
    if missing:
        raise ValueError(
            f"{version_dir}/{ASSETS_EXTRA}/export_metadata.json lacks "
            f"{missing}; re-export the model with `nppnet export`"
        )
    image_size = int(metadata["image_size"])
    flip = bool(metadata["flip"])
    stored_model = version_dir / ASSETS_EXTRA / KERAS_MODEL_FILE
    keras_path = Path(keras_model) if keras_model is not None else stored_model
    if not keras_path.is_file():
        raise FileNotFoundError(f"Keras model {keras_path} does not exist")
    if images is None:
        images = [
            (f"sample {h}x{w}.{fmt}", data)
            for (h, w, fmt), data in zip(DEFAULT_SAMPLES, sample_images())
        ]
    if not images:
        raise ValueError("check_export needs at least one image")
    encoded = [data for _, data in images]
    report = CheckReport(version_dir, keras_path)

    def layout() -> str:
        missing = [
            name
            for name in (
                "saved_model.pb",
                "variables/variables.index",
                f"{ASSETS_EXTRA}/{WARMUP_FILE}",
                f"{ASSETS_EXTRA}/{KERAS_MODEL_FILE}",
            )
            if not (version_dir / name).is_file()
        ]
        if missing:
            raise _CheckFailed(f"missing {missing}")
        return f"version {version_dir.name}, S={image_size}, flip {flip}"

    def fingerprint() -> str:
        actual = file_sha256(stored_model)
        expected = metadata.get("keras_model_sha256")
        if actual != expected:
            raise _CheckFailed(
                f"{stored_model.name} sha256 {actual[:12]}... != metadata "
                f"{str(expected)[:12]}..."
            )
        return f"sha256 {actual[:12]}... as recorded"

    def core_ops() -> str:
        extra = non_core_ops(version_dir)
        if extra:
            raise _CheckFailed(f"ops not in tf.raw_ops: {extra}")
        return (
            f"{len(saved_model_ops(version_dir))} op types, all in tf.raw_ops"
        )

    _run(report, "layout", layout)
    _run(report, "stored model sha256", fingerprint)
    _run(report, "core ops only", core_ops)

    loaded = tf.saved_model.load(str(version_dir), tags=["serve"])
    signatures = loaded.signatures

    def signature_check() -> str:
        problems = []
        for name, outputs in SIGNATURE_OUTPUTS.items():
            if name not in signatures:
                problems.append(f"no signature {name!r}")
                continue
            function = signatures[name]
            inputs = set(function.structured_input_signature[1])
            if inputs != {SIGNATURE_INPUTS[name]}:
                problems.append(f"{name} inputs {sorted(inputs)}")
            if set(function.structured_outputs) != set(outputs):
                problems.append(
                    f"{name} outputs {sorted(function.structured_outputs)}"
                )
        if problems:
            raise _CheckFailed("; ".join(problems))
        return ", ".join(sorted(signatures))

    if not _run(report, "signatures", signature_check):
        return report

    def warmup() -> str:
        logs = protocol.read_warmup(version_dir / ASSETS_EXTRA / WARMUP_FILE)
        if not logs:
            raise _CheckFailed("the warmup file holds no records")
        counts: dict[str, int] = {}
        for log_record in logs:
            request = log_record.predict_log.request
            name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            outputs = signatures[name](**protocol.request_inputs(request))
            response = protocol.predict_response(outputs, model_name, name)
            decoded = protocol.response_outputs(response)
            batch = next(iter(protocol.request_inputs(request).values())).shape[
                0
            ]
            if set(decoded) != set(SIGNATURE_OUTPUTS[name]) or any(
                value.shape[0] != batch for value in decoded.values()
            ):
                raise _CheckFailed(
                    f"{name} answered {sorted(decoded)} with batch sizes "
                    f"{[v.shape[0] for v in decoded.values()]} for {batch}"
                )
            counts[name] = counts.get(name, 0) + 1
        return f"{len(logs)} records replayed: " + ", ".join(
            f"{n} x{c}" for n, c in sorted(counts.items())
        )

    _run(report, "warmup replay", warmup)

    model = load_keras_model(keras_path)
    reference = predict_official(model, encoded, image_size, flip)
    names = ", ".join(name for name, _ in images)
    serve = signatures[DEFAULT_SIGNATURE]

    def grpc() -> str:
        request = protocol.predict_request(
            model_name, DEFAULT_SIGNATURE, {IMAGE_BYTES: encoded}
        )
        wire = predict_pb2.PredictRequest.FromString(
            request.SerializeToString()
        )
        outputs = serve(**protocol.request_inputs(wire))
        response = protocol.predict_response(
            outputs, model_name, DEFAULT_SIGNATURE, int(version_dir.name)
        )
        received = predict_pb2.PredictResponse.FromString(
            response.SerializeToString()
        )
        served = protocol.response_outputs(received)
        return (
            compare_predictions(
                served, reference, tolerance_px, score_tolerance, min_agreement
            )
            + f" ({names})"
        )

    def rest_check(request_format: str) -> Callable[[], str]:
        def run() -> str:
            body = rest.rest_request(
                {IMAGE_BYTES: encoded}, DEFAULT_SIGNATURE, request_format
            )
            name, inputs, found_format = rest.parse_rest_request(
                body, _input_dtypes(signatures)
            )
            outputs = signatures[name](**inputs)
            reply = rest.rest_response(
                {k: v.numpy() for k, v in outputs.items()}, found_format
            )
            served = rest.parse_rest_response(reply)
            return compare_predictions(
                served, reference, tolerance_px, score_tolerance, min_agreement
            )

        return run

    def dense() -> str:
        batch = _letterboxed(encoded, image_size)
        served = signatures[DENSE_SIGNATURE](**{DENSE_INPUT: batch})
        expected = model(batch, training=False)
        worst = 0.0
        for key in DENSE_OUTPUTS:
            difference = np.abs(
                served[key].numpy() - np.asarray(expected[key], np.float32)
            )
            scale = 1.0 + np.abs(np.asarray(expected[key]))
            worst = max(worst, float(np.max(difference / scale)))
        if worst > DENSE_TOLERANCE:
            raise _CheckFailed(
                f"dense maps differ from model(images): max relative "
                f"{worst:.3g} > {DENSE_TOLERANCE}"
            )
        return f"pose, parsing equal model(images) (max rel. |d| {worst:.2g})"

    _run(report, "gRPC PredictRequest vs Keras", grpc)
    _run(report, "REST row (instances, b64) vs Keras", rest_check(rest.ROW))
    _run(report, "REST columnar (inputs, b64)", rest_check(rest.COLUMNAR))
    _run(report, "dense_maps vs model(images)", dense)

    def bad_requests() -> str:
        results = [
            _expect_rejected(
                lambda: serve(**{IMAGE_BYTES: tf.constant([b"not an image"])}),
                "non-image bytes",
            ),
            _expect_rejected(
                lambda: serve(**{IMAGE_BYTES: tf.constant([encoded[0], b""])}),
                "empty string",
            ),
            _expect_rejected(
                lambda: serve(**{IMAGE_BYTES: tf.zeros([0], tf.string)}),
                "empty batch",
            ),
            _expect_rejected(
                lambda: rest.parse_rest_request(
                    '{"instances": []}', _input_dtypes(signatures)
                ),
                "REST empty instances",
            ),
        ]
        # The process must still serve after the errors.
        after = serve(**{IMAGE_BYTES: tf.constant(encoded[:1])})
        if after[KEYPOINTS].shape[0] != 1:
            raise _CheckFailed("no answer after the bad requests")
        return " | ".join(results) + " | still serving"

    _run(report, "bad requests rejected", bad_requests)
    return report
