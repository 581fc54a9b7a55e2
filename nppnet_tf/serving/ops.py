"""Which ops a SavedModel needs: the stock model server must know them all.

`saved_model_ops` reads `saved_model.pb` (the `saved_model_pb2` message, no
loading) and collects the op type of every node of every meta graph: the
top-level graph and every function of its library (the signatures' bodies,
`tf.map_fn` loops, `tf.cond` branches). A node whose op is the name of a
library function is a direct call of that function, not an op.
`non_core_ops` returns those that are not core TensorFlow ops (not in
`tf.raw_ops`), e.g. ops of `tensorflow_text` or `tensorflow_addons`, or
`tf.contrib` leftovers, which `tensorflow/serving` would fail to load.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

SAVED_MODEL_FILE = "saved_model.pb"


def read_saved_model(export_dir: str | Path) -> saved_model_pb2.SavedModel:
    """The parsed `saved_model.pb` of an export directory.

    Raises:
        FileNotFoundError: the directory has no `saved_model.pb`.
    """
    path = Path(export_dir) / SAVED_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not a SavedModel)")
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString(path.read_bytes())
    return saved_model


def saved_model_ops(export_dir: str | Path) -> set[str]:
    """Op types of every node of every graph and library function.

    Args:
        export_dir: a SavedModel directory (a version directory).

    Returns:
        The op type names (function calls by name excluded).
    """
    ops: set[str] = set()
    for meta_graph in read_saved_model(export_dir).meta_graphs:
        graph = meta_graph.graph_def
        functions = {f.signature.name for f in graph.library.function}
        node_lists = [graph.node] + [f.node_def for f in graph.library.function]
        for nodes in node_lists:
            ops.update(node.op for node in nodes if node.op not in functions)
    return ops


def non_core_ops(export_dir: str | Path) -> list[str]:
    """Sorted op types of the SavedModel that are not in `tf.raw_ops`."""
    core = set(dir(tf.raw_ops))
    return sorted(op for op in saved_model_ops(export_dir) if op not in core)
