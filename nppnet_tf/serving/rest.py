"""TF Serving's REST predict API, client and server side.

`rest_request` writes the JSON body a client POSTs to
`/v1/models/<name>:predict` (row format `instances` or columnar `inputs`,
binary strings as `{"b64": ...}`); `parse_rest_request` reads it as the
model server does (`tensorflow_serving/util/json_tensor.cc`,
`FillPredictRequestFromJson`); `rest_response` writes the reply as the
server does (strings base64-encoded only for outputs whose name ends in
`_bytes`) and `parse_rest_response` reads it back as a client.

The server-side halves exist so that `nppnet serve-check` can exercise an
export the way the model server would, on machines where the server
binary cannot run.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from nppnet_tf.serving.module import DEFAULT_SIGNATURE

ROW = "row"
COLUMNAR = "columnar"
BYTES_SUFFIX = "_bytes"  # TF Serving's REST marker of binary string outputs
B64 = "b64"


class RestRequestError(ValueError):
    """A REST body the model server would reject before running the model
    (it answers HTTP 400 with `{"error": ...}`)."""


def rest_request(
    inputs: Mapping[str, Sequence[Any]],
    signature_name: str = DEFAULT_SIGNATURE,
    request_format: str = ROW,
) -> str:
    """The JSON body of a REST predict request.

    Args:
        inputs: input name -> a batch (list) of values; `bytes` values are
            written as `{"b64": ...}`, numpy arrays as nested lists.
        signature_name: the signature to call.
        request_format: `"row"` (`instances`, one object per example) or
            `"columnar"` (`inputs`, one list per input).

    Returns:
        The JSON text.

    Raises:
        ValueError: an unknown format or inputs of different batch sizes.
    """
    encoded = {
        name: [_to_json(v) for v in batch] for name, batch in inputs.items()
    }
    if request_format == ROW:
        sizes = {len(batch) for batch in encoded.values()}
        if len(sizes) > 1:
            raise ValueError(
                f"row format needs equal batch sizes, got {sorted(sizes)}"
            )
        count = sizes.pop() if sizes else 0
        body = {
            "signature_name": signature_name,
            "instances": [
                {name: batch[i] for name, batch in encoded.items()}
                for i in range(count)
            ],
        }
    elif request_format == COLUMNAR:
        body = {"signature_name": signature_name, "inputs": encoded}
    else:
        raise ValueError(
            f"request_format must be {ROW!r} or {COLUMNAR!r}, got "
            f"{request_format!r}"
        )
    return json.dumps(body)


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {B64: base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _is_b64(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {B64}
        and isinstance(value[B64], str)
    )


def _decode_leaf(value: Any, dtype: tf.DType, where: str) -> Any:
    if _is_b64(value):
        if dtype != tf.string:
            raise RestRequestError(
                f"{where}: a {{'b64': ...}} value for a {dtype.name} input"
            )
        try:
            return base64.b64decode(value[B64], validate=True)
        except binascii.Error as err:
            raise RestRequestError(f"{where}: unable to base64 decode") from err
    if isinstance(value, list):
        return [_decode_leaf(v, dtype, where) for v in value]
    if isinstance(value, dict):
        raise RestRequestError(f"{where}: unexpected JSON object {value!r}")
    if dtype == tf.string:
        if not isinstance(value, str):
            raise RestRequestError(f"{where}: {value!r} is not a string")
        return value.encode()
    return value


def _to_tensor(value: Any, dtype: tf.DType, where: str) -> tf.Tensor:
    try:
        array = np.array(value, dtype=object if dtype == tf.string else None)
        return tf.constant(array, dtype=dtype)
    except (ValueError, TypeError) as err:
        raise RestRequestError(
            f"{where}: cannot make a {dtype.name} tensor ({err})"
        ) from err


def parse_rest_request(
    body: str | bytes,
    input_dtypes: Mapping[str, Mapping[str, tf.DType]],
) -> tuple[str, dict[str, tf.Tensor], str]:
    """Reads a REST predict body as the model server does.

    Args:
        body: the JSON text.
        input_dtypes: signature name -> {input name: dtype}, from the
            SavedModel's signatures.

    Returns:
        `(signature_name, inputs, request_format)`; the signature defaults
        to `serving_default`.

    Raises:
        RestRequestError: what the server answers with HTTP 400: not JSON,
            no `instances`/`inputs`, an empty `instances` list, unknown
            signature or input names, bad base64, ragged values.
    """
    try:
        document = json.loads(body)
    except json.JSONDecodeError as err:
        raise RestRequestError(f"JSON parse error: {err}") from err
    if not isinstance(document, dict):
        raise RestRequestError("the request body must be a JSON object")
    signature_name = document.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(signature_name, str):
        raise RestRequestError("'signature_name' must be a string")
    if signature_name not in input_dtypes:
        raise RestRequestError(
            f"serving signature name {signature_name!r} not found; the "
            f"export has {sorted(input_dtypes)}"
        )
    dtypes = input_dtypes[signature_name]
    has_rows, has_columns = "instances" in document, "inputs" in document
    if has_rows == has_columns:
        raise RestRequestError(
            "the body needs exactly one of 'instances' (row format) or "
            "'inputs' (columnar format)"
        )
    if has_rows:
        return signature_name, _rows(document["instances"], dtypes), ROW
    return signature_name, _columns(document["inputs"], dtypes), COLUMNAR


def _rows(instances: Any, dtypes: Mapping[str, tf.DType]) -> dict:
    if not isinstance(instances, list):
        raise RestRequestError("'instances' must be a list")
    if not instances:
        raise RestRequestError("no values in 'instances' list")
    named = isinstance(instances[0], dict) and not _is_b64(instances[0])
    if not named and len(dtypes) > 1:
        raise RestRequestError(
            "'instances' is a plain list, but the signature has several "
            f"inputs {sorted(dtypes)}"
        )
    columns: dict[str, list] = {name: [] for name in dtypes}
    for index, instance in enumerate(instances):
        where = f"instances[{index}]"
        if named:
            if not isinstance(instance, dict) or _is_b64(instance):
                raise RestRequestError(f"{where}: expected an object")
            if set(instance) != set(dtypes):
                raise RestRequestError(
                    f"{where}: keys {sorted(instance)} must be the inputs "
                    f"{sorted(dtypes)}"
                )
            for name, value in instance.items():
                columns[name].append(_decode_leaf(value, dtypes[name], where))
        else:
            (name,) = dtypes
            columns[name].append(_decode_leaf(instance, dtypes[name], where))
    return {
        name: _to_tensor(values, dtypes[name], f"input {name!r}")
        for name, values in columns.items()
    }


def _columns(inputs: Any, dtypes: Mapping[str, tf.DType]) -> dict:
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(dtypes) > 1:
            raise RestRequestError(
                "'inputs' is a plain value, but the signature has several "
                f"inputs {sorted(dtypes)}"
            )
        (name,) = dtypes
        inputs = {name: inputs}
    missing = sorted(set(dtypes) - set(inputs))
    if missing:
        raise RestRequestError(f"missing named inputs {missing} in 'inputs'")
    return {
        name: _to_tensor(
            _decode_leaf(inputs[name], dtypes[name], f"inputs[{name!r}]"),
            dtypes[name],
            f"input {name!r}",
        )
        for name in dtypes
    }


def rest_response(outputs: Mapping[str, Any], request_format: str = ROW) -> str:
    """The JSON the model server returns for `outputs`.

    Strings are base64-encoded (`{"b64": ...}`) only for outputs whose name
    ends in `_bytes`; other strings are written as they are and must then
    be UTF-8.

    Raises:
        ValueError: a non-`_bytes` string output that is not UTF-8 (the
            server would write invalid JSON), outputs of different batch
            sizes in row format, an unknown format.
    """
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    encoded = {
        name: _encode_output(name, array) for name, array in arrays.items()
    }
    if request_format == COLUMNAR:
        value = encoded if len(encoded) > 1 else next(iter(encoded.values()))
        return json.dumps({"outputs": value})
    if request_format != ROW:
        raise ValueError(
            f"request_format must be {ROW!r} or {COLUMNAR!r}, got "
            f"{request_format!r}"
        )
    sizes = {array.shape[0] for array in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"outputs have different batch sizes {sorted(sizes)}")
    count = sizes.pop()
    if len(encoded) == 1:
        predictions = next(iter(encoded.values()))
    else:
        predictions = [
            {name: values[i] for name, values in encoded.items()}
            for i in range(count)
        ]
    return json.dumps({"predictions": predictions})


def _encode_output(name: str, array: np.ndarray) -> Any:
    if array.dtype != object:
        return array.tolist()
    as_bytes = name.endswith(BYTES_SUFFIX)

    def encode(value):
        if isinstance(value, np.ndarray):
            return [encode(v) for v in value]
        if as_bytes:
            return {B64: base64.b64encode(value).decode("ascii")}
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"output {name!r} holds binary strings: the model server "
                f"base64-encodes only outputs named '*{BYTES_SUFFIX}'"
            ) from err

    return encode(array)


def parse_rest_response(body: str | bytes) -> dict[str, Any]:
    """A client's view of a REST predict reply: output name -> value, with
    `{"b64": ...}` decoded to bytes. Row-format replies are transposed to
    one batch per output.

    Raises:
        ValueError: the reply is an error (`{"error": ...}`) or malformed.
    """
    document = json.loads(body)
    if "error" in document:
        raise ValueError(f"the model server answered: {document['error']}")

    def decode(value):
        if _is_b64(value):
            return base64.b64decode(value[B64])
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    if "outputs" in document:
        outputs = document["outputs"]
        return {k: decode(v) for k, v in outputs.items()}
    if "predictions" not in document:
        raise ValueError("reply has neither 'predictions' nor 'outputs'")
    rows = document["predictions"]
    if not rows or not isinstance(rows[0], dict) or _is_b64(rows[0]):
        raise ValueError(
            "single-output row replies carry no output name; use the "
            "columnar format"
        )
    return {name: [decode(row[name]) for row in rows] for name in rows[0]}
