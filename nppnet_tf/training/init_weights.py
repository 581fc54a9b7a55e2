"""Initial weights for the stems and encoders (reference 2.12).

The authors initialise the final network from `encoder.pth`: a non-strict
load by parameter name in which only tensors whose name exists in the
model and whose shape matches are copied; everything else keeps its
initialisation. `load_init_weights` does the same for the two stems and
the two encoders (`train_step.ENCODER_PARTS`), from

* a `.keras` model file (any network with those parts, e.g. a trained
  `NPPNet` of the same width), or
* a training checkpoint of `nppnet train` (a checkpoint prefix, its
  `checkpoints/` directory or the training output directory), whose model
  variables are stored by path (`ModelVariables`).

Variables are matched by their path inside the model (`canonical_paths`:
the model's own name removed and Keras' process-wide layer counters
replaced by positions, e.g. `pose_encoder_3/dil_conv_1/bn/gamma`),
trainable weights and BatchNorm statistics alike (PyTorch's `state_dict` holds the
running statistics too). The returned `InitWeightsReport` lists what was
loaded, what was skipped for a shape mismatch and what the source lacks.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from nppnet_tf.training.train_step import encoder_variables

log = logging.getLogger(__name__)

# Where the training checkpoint keeps `ModelVariables`: the trackable
# named `model`, its dict `by_path`.
_MODEL_NAME = "model"
_BY_PATH = "by_path"
# A layer name and its optional trailing number: `conv_bn_12`, `stem`.
_NUMBERED = re.compile(r"^(?P<base>.*?)(?:_(?P<number>\d+))?$")


class ModelVariables(tf.Module):
    """Every variable of a Keras model, keyed by its path in the model.

    `tf.train.Checkpoint(model=keras_model)` does not save the layers a
    Keras 3 model holds in Python lists (Keras' `TrackedList` is not a
    TensorFlow trackable), which are most of NPPNet: its cells, heads and
    stem convolutions. The training checkpoint therefore saves this dict
    of all `model.variables` (trainable weights and BatchNorm statistics)
    by name instead, the names of `canonical_paths` (stable between
    processes and between two models of one process).

    Args:
        model: a built Keras model.

    Raises:
        ValueError: two variables share a path.
    """

    def __init__(self, model: keras.Model):
        super().__init__(name="model_variables")
        paths = canonical_paths(model)
        if len(set(paths)) != len(paths):
            duplicates = sorted({p for p in paths if paths.count(p) > 1})
            raise ValueError(
                f"{type(model).__name__} has variables sharing a path: "
                f"{duplicates[:5]}"
            )
        self.by_path = dict(zip(paths, model.variables))


def canonical_paths(model: keras.Model) -> list[str]:
    """Names of `model.variables` that agree between instances of one
    architecture, whatever else the process created before.

    A variable's Keras path joins the names of its layers, and Keras names
    the layers it names itself after their class with a process-wide
    counter (`npp_net_1/pose_encoder_0/re_lu_conv_bn_540/conv/kernel`).
    Here the model's own name is dropped, and among the sibling layers of
    one parent the names sharing a base (the name without a trailing
    `_<number>`) are numbered by their order (the counter's order is the
    creation order): `pose_encoder_0/re_lu_conv_bn_0/conv/kernel`. A base
    that occurs once keeps no number. Explicit names such as
    `pose_encoder_3` or `conv_1` come out unchanged.
    """
    paths = [variable.path.split("/") for variable in model.variables]
    if paths and all(len(p) > 1 and p[0] == model.name for p in paths):
        paths = [p[1:] for p in paths]
    siblings: dict[tuple[str, ...], set[str]] = collections.defaultdict(set)
    for parts in paths:
        for depth in range(len(parts) - 1):  # layers, not the variable
            siblings[tuple(parts[:depth])].add(parts[depth])
    renamed: dict[tuple[tuple[str, ...], str], str] = {}
    for parent, names in siblings.items():
        groups = collections.defaultdict(list)
        for name in names:
            match = _NUMBERED.match(name)
            number = int(match["number"]) if match["number"] else -1
            groups[match["base"]].append((number, name))
        for base, members in groups.items():
            if len(members) == 1:
                renamed[(parent, members[0][1])] = base
                continue
            for rank, (_, name) in enumerate(sorted(members)):
                renamed[(parent, name)] = f"{base}_{rank}"
    return [
        "/".join(
            [
                renamed[(tuple(parts[:d]), parts[d])]
                for d in range(len(parts) - 1)
            ]
            + [parts[-1]]
        )
        for parts in paths
    ]


@dataclasses.dataclass(frozen=True)
class InitWeightsReport:
    """What `load_init_weights` did.

    Attributes:
        source: the file or checkpoint prefix read.
        kind: `keras` or `checkpoint`.
        loaded: paths of the stem and encoder variables assigned.
        skipped_shape: `(path, model shape, source shape)` of the variables
            found in the source with another shape (kept at their init).
        missing: paths of stem and encoder variables the source lacks (kept
            at their init).
        unused: number of source variables not loaded (outside the stems
            and encoders, or without a counterpart).
        loaded_parameters: number of scalars assigned.
    """

    source: str
    kind: str
    loaded: tuple[str, ...]
    skipped_shape: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    missing: tuple[str, ...]
    unused: int
    loaded_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "counts": {
                "loaded": len(self.loaded),
                "skipped_shape": len(self.skipped_shape),
                "missing": len(self.missing),
                "unused": self.unused,
                "loaded_parameters": self.loaded_parameters,
            },
            "loaded": list(self.loaded),
            "skipped_shape": [
                {
                    "path": path,
                    "model_shape": list(ours),
                    "source_shape": list(theirs),
                }
                for path, ours, theirs in self.skipped_shape
            ],
            "missing": list(self.missing),
        }


def _checkpoint_prefix(path: Path) -> str | None:
    """The checkpoint prefix `path` designates, or None if it is not one."""
    if path.is_dir():
        for directory in (path, path / "checkpoints"):
            prefix = tf.train.latest_checkpoint(str(directory))
            if prefix:
                return prefix
        return None
    if Path(f"{path}.index").is_file():
        return str(path)
    return None


def _read_keras(path: Path) -> dict[str, np.ndarray]:
    import importlib
    import pkgutil

    import nppnet_tf.models

    # The model classes register themselves as serialisable on import.
    for module in pkgutil.iter_modules(nppnet_tf.models.__path__):
        importlib.import_module(f"nppnet_tf.models.{module.name}")
    try:
        source = keras.saving.load_model(path, compile=False)
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(
            f"train.init_weights = {str(path)!r}: Keras cannot load it: {err}"
        ) from err
    values = {
        name: np.asarray(variable.numpy())
        for name, variable in zip(canonical_paths(source), source.variables)
    }
    del source
    return values


def _read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """`{path: value}` of the `ModelVariables` saved as `model` in a
    training checkpoint, found through the checkpoint's object graph (a
    variable reachable along several paths is stored under one key only,
    e.g. an optimiser's)."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))

    def child(node, name):
        for reference in node.children:
            if reference.local_name == name:
                return graph.nodes[reference.node_id]
        return None

    holder = child(graph.nodes[0], _MODEL_NAME)
    by_path = None if holder is None else child(holder, _BY_PATH)
    if by_path is None:
        raise ValueError(
            f"train.init_weights: checkpoint {prefix} holds no model "
            "variables by path (not a checkpoint of `nppnet train`); give a "
            "training checkpoint or a .keras model"
        )
    values = {}
    for reference in by_path.children:
        for attribute in graph.nodes[reference.node_id].attributes:
            if attribute.name == "VARIABLE_VALUE":
                values[reference.local_name] = reader.get_tensor(
                    attribute.checkpoint_key
                )
    return values


def read_source(path: str | Path) -> tuple[str, str, dict[str, np.ndarray]]:
    """`(source, kind, {relative path: value})` of a `.keras` file or a
    training checkpoint.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: not a `.keras` file nor a training checkpoint, or one
            that cannot be read.
    """
    path = Path(path)
    prefix = _checkpoint_prefix(path)
    if prefix is not None:
        return prefix, "checkpoint", _read_checkpoint(prefix)
    if path.is_file() and path.suffix == ".keras":
        return str(path), "keras", _read_keras(path)
    if not path.exists():
        raise FileNotFoundError(
            f"train.init_weights = {str(path)!r} does not exist"
        )
    raise ValueError(
        f"train.init_weights = {str(path)!r} is neither a .keras model nor a "
        "training checkpoint (a prefix with an .index file, or a directory "
        "holding one, directly or under checkpoints/)"
    )


def load_init_weights(
    model: keras.Model, path: str | Path
) -> InitWeightsReport:
    """Assigns the stem and encoder variables found in `path` to `model`.

    Non-strict, as the authors' `load_pretrain_backbone`: a variable of the
    stems or encoders is assigned when the source has a variable of the
    same path (relative to the model) and shape; the others keep their
    initialisation. Call it on the built model before training, outside
    the strategy scope (the source is read into a temporary, undistributed
    copy; assigning a mirrored variable updates every replica).

    Args:
        model: a built network with stems and encoders (`NPPNet`).
        path: a `.keras` model file or a training checkpoint (prefix, its
            directory or the training output directory).

    Returns:
        An `InitWeightsReport`.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: an unreadable source, or one holding none of the stem
            and encoder variables by path (almost surely the wrong file).
    """
    source, kind, values = read_source(path)
    targets = encoder_variables(model, trainable_only=False)
    target_ids = {id(v) for v in targets}
    names = {
        id(variable): name
        for name, variable in zip(canonical_paths(model), model.variables)
    }
    loaded, skipped, missing = [], [], []
    parameters = 0
    for variable in model.variables:
        if id(variable) not in target_ids:
            continue
        name = names[id(variable)]
        if name not in values:
            missing.append(name)
            continue
        value = values[name]
        shape = tuple(int(d) for d in variable.shape)
        if tuple(value.shape) != shape:
            skipped.append((name, shape, tuple(int(d) for d in value.shape)))
            continue
        variable.assign(value.astype(variable.dtype))
        loaded.append(name)
        parameters += int(value.size)
    if not loaded and not skipped:
        raise ValueError(
            f"train.init_weights = {str(path)!r}: none of the "
            f"{len(targets)} stem and encoder variables of "
            f"{type(model).__name__} is in {source} (e.g. "
            f"{names[id(targets[0])]!r}); is it a model of this "
            "architecture?"
        )
    report = InitWeightsReport(
        source=source,
        kind=kind,
        loaded=tuple(loaded),
        skipped_shape=tuple(skipped),
        missing=tuple(missing),
        unused=len(values) - len(loaded),
        loaded_parameters=parameters,
    )
    log.info(
        "initial weights from %s: %d stem/encoder variables loaded (%d "
        "parameters), %d skipped (shape), %d missing, %d source variables "
        "unused",
        source,
        len(loaded),
        parameters,
        len(skipped),
        len(missing),
        report.unused,
    )
    return report
