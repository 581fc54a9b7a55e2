"""TF Serving's gRPC messages and warmup records, client and server side.

* `predict_request` builds a `PredictRequest` with the
  tensorflow-serving-api messages; `request_inputs` turns its
  `TensorProto`s into tensors the way the model server does
  (`tf.make_ndarray`); `predict_response` / `response_outputs` do the same
  for the reply.
* `warmup_logs` are the `PredictionLog` records the model server replays
  from `assets.extra/tf_serving_warmup_requests` before it serves a new
  version; `write_warmup` / `read_warmup` store them as a TFRecord file.

The server-side halves exist so that `nppnet serve-check` can exercise an
export the way the model server would, on machines where the server
binary cannot run. `rest.py` does the same for the REST API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from nppnet_tf.serving.module import (
    DEFAULT_SIGNATURE,
    DENSE_INPUT,
    DENSE_SIGNATURE,
    IMAGE_BYTES,
)


def predict_request(
    model_name: str,
    signature_name: str,
    inputs: Mapping[str, Any],
) -> predict_pb2.PredictRequest:
    """A gRPC `PredictRequest`.

    Args:
        model_name: the served model's name (`models.config`).
        signature_name: e.g. `serving_default`.
        inputs: input name -> array-like (`bytes` lists for strings).

    Returns:
        The request; each input is a `TensorProto` (`tf.make_tensor_proto`).
    """
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def request_inputs(
    request: predict_pb2.PredictRequest,
) -> dict[str, tf.Tensor]:
    """The tensors the model server feeds to the signature."""
    return {
        name: tf.convert_to_tensor(tf.make_ndarray(proto))
        for name, proto in request.inputs.items()
    }


def predict_response(
    outputs: Mapping[str, Any],
    model_name: str,
    signature_name: str,
    version: int | None = None,
) -> predict_pb2.PredictResponse:
    """The `PredictResponse` the model server sends for `outputs`."""
    response = predict_pb2.PredictResponse()
    response.model_spec.name = model_name
    response.model_spec.signature_name = signature_name
    if version is not None:
        response.model_spec.version.value = int(version)
    for name, value in outputs.items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
    return response


def response_outputs(
    response: predict_pb2.PredictResponse,
) -> dict[str, np.ndarray]:
    """A client's view of a `PredictResponse`: name -> numpy array."""
    return {
        name: tf.make_ndarray(proto) for name, proto in response.outputs.items()
    }


# ---------------------------------------------------------------------------
# Warmup


def warmup_logs(
    model_name: str,
    encoded_images: Sequence[bytes],
    image_size: int,
) -> list[prediction_log_pb2.PredictionLog]:
    """The warmup records of an export: `serving_default` on the first
    image alone and on all images together (different sizes in one
    batch), and `dense_maps` on one mid-grey image.

    Args:
        model_name: the served model's name.
        encoded_images: sample JPEG/PNG files (`sample_images`).
        image_size: side S of the network input.

    Returns:
        `PredictionLog`s, each holding one `PredictRequest`.

    Raises:
        ValueError: no images.
    """
    if not encoded_images:
        raise ValueError("warmup needs at least one sample image")
    requests = [
        predict_request(
            model_name, DEFAULT_SIGNATURE, {IMAGE_BYTES: [encoded_images[0]]}
        ),
        predict_request(
            model_name, DEFAULT_SIGNATURE, {IMAGE_BYTES: list(encoded_images)}
        ),
        predict_request(
            model_name,
            DENSE_SIGNATURE,
            {DENSE_INPUT: np.zeros((1, image_size, image_size, 3), np.float32)},
        ),
    ]
    logs = []
    for request in requests:
        log = prediction_log_pb2.PredictionLog()
        log.predict_log.request.CopyFrom(request)
        logs.append(log)
    return logs


def write_warmup(
    path: str | Path, logs: Sequence[prediction_log_pb2.PredictionLog]
) -> None:
    """Writes `PredictionLog`s as an uncompressed TFRecord file."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())


def read_warmup(path: str | Path) -> list[prediction_log_pb2.PredictionLog]:
    """Reads a warmup file back.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a record is not a `PredictionLog` with a predict request.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"warmup file {path} does not exist")
    logs = []
    for index, record in enumerate(tf.data.TFRecordDataset(str(path))):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        if not log.HasField("predict_log"):
            raise ValueError(
                f"record {index} of {path} is not a predict log "
                f"({log.WhichOneof('log_type')})"
            )
        logs.append(log)
    return logs
