"""Distribution strategies: one code path for 1..N local devices and hosts.

`create_strategy(config.distribute)` returns

* a `tf.distribute.MultiWorkerMirroredStrategy` when `TF_CONFIG` describes
  a cluster of several workers (or `distribute.multi_worker` is true): each
  host runs the same command with its own `TF_CONFIG` (docs/search.md has
  examples); gradients are all-reduced over every replica of every worker;
* otherwise a `tf.distribute.MirroredStrategy` over the configured local
  devices, even for a single device, so that search and training loops
  have one code path (`strategy.run`, replica-sum losses, all-reduced
  gradients) whatever the number of replicas.

On a host without GPUs, `distribute.devices: N` splits the CPU into N
logical devices; this must happen before TensorFlow initialises its
devices, so create the strategy before running any TensorFlow op.

A strategy must be created before any other TensorFlow work in a
multi-worker process: `MultiWorkerMirroredStrategy` starts the gRPC server
of this worker.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import tensorflow as tf

from nppnet_tf.config import DistributeConfig

log = logging.getLogger(__name__)

TF_CONFIG = "TF_CONFIG"


def tf_config() -> dict | None:
    """The parsed `TF_CONFIG` environment variable, or None when unset.

    Raises:
        ValueError: `TF_CONFIG` is not a JSON object with a `cluster`.
    """
    text = os.environ.get(TF_CONFIG, "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{TF_CONFIG} is not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict) or not isinstance(
        value.get("cluster"), dict
    ):
        raise ValueError(
            f"{TF_CONFIG} must be a JSON object with a 'cluster' mapping, "
            f"got {text!r}"
        )
    return value


def cluster_size(config: dict | None) -> int:
    """Number of tasks (chief and workers) in a `TF_CONFIG` cluster."""
    if not config:
        return 0
    cluster = config["cluster"]
    return sum(len(cluster.get(job, [])) for job in ("chief", "worker"))


def wants_multi_worker(config: DistributeConfig) -> bool:
    """Whether `create_strategy` builds a `MultiWorkerMirroredStrategy`.

    Raises:
        ValueError: `multi_worker` is forced on without a `TF_CONFIG`
            cluster, or `TF_CONFIG` is malformed.
    """
    cluster = tf_config()
    if config.multi_worker is None:
        return cluster_size(cluster) > 1
    if config.multi_worker and cluster is None:
        raise ValueError(
            "distribute.multi_worker is true but TF_CONFIG is not set; "
            "set TF_CONFIG on every worker (docs/search.md, Distribution)"
        )
    return bool(config.multi_worker)


def split_cpu(count: int) -> list[str]:
    """Splits the host CPU into `count` logical devices (idempotent).

    Args:
        count: logical CPU devices wanted.

    Returns:
        The names of the first `count` logical CPU devices.

    Raises:
        RuntimeError: TensorFlow has already initialised fewer logical
            CPU devices than `count` (split before any TensorFlow op).
    """
    cpus = tf.config.list_physical_devices("CPU")
    configured = tf.config.get_logical_device_configuration(cpus[0])
    if configured is None or len(configured) < count:
        # Before listing logical devices: listing them initialises
        # TensorFlow's devices, after which they can no longer be split.
        try:
            tf.config.set_logical_device_configuration(
                cpus[0],
                [tf.config.LogicalDeviceConfiguration() for _ in range(count)],
            )
        except RuntimeError as err:
            logical = tf.config.list_logical_devices("CPU")
            if len(logical) < count:
                raise RuntimeError(
                    f"cannot split the CPU into {count} logical devices: "
                    f"TensorFlow already initialised {len(logical)} ({err}); "
                    "create the strategy before any other TensorFlow work"
                ) from None
    logical = tf.config.list_logical_devices("CPU")
    return [device.name for device in logical[:count]]


def resolve_devices(devices: int | Sequence[str] | None) -> list[str]:
    """Local device names for a `distribute.devices` value.

    Args:
        devices: None (every GPU, else the CPU), a count (GPUs if there
            are that many, else logical CPU devices), or device names.

    Returns:
        Device names for `tf.distribute.MirroredStrategy`.

    Raises:
        ValueError: a count larger than the GPUs of a GPU host, or a named
            device that does not exist.
    """
    # Physical, not logical: listing logical devices initialises them, and
    # the CPU could then no longer be split (`split_cpu`).
    if tf.config.list_physical_devices("GPU"):
        gpus = tf.config.list_logical_devices("GPU")
    else:
        gpus = []
    if devices is None:
        if gpus:
            return [device.name for device in gpus]
        return [tf.config.list_logical_devices("CPU")[0].name]
    if isinstance(devices, int):
        if gpus:
            if devices > len(gpus):
                raise ValueError(
                    f"distribute.devices = {devices}, but this host has "
                    f"{len(gpus)} GPUs"
                )
            return [device.name for device in gpus[:devices]]
        return split_cpu(devices)
    known = {
        _canonical(device.name)
        for kind in ("CPU", "GPU")
        for device in tf.config.list_logical_devices(kind)
    }
    for name in devices:
        if _canonical(name) not in known:
            raise ValueError(
                f"distribute.devices names {name!r}, which is not a local "
                f"device (known: {', '.join(sorted(known))})"
            )
    return list(devices)


def _canonical(name: str) -> str:
    """`/job:localhost/replica:0/task:0/device:CPU:1` and `/cpu:1` alike."""
    return (
        tf.DeviceSpec.from_string(name).device_type.upper()
        + ":"
        + str(tf.DeviceSpec.from_string(name).device_index or 0)
    )


def set_graph_optimizations(enabled: bool) -> None:
    """Turns Grappler, TensorFlow's graph optimiser, on or off for the
    functions traced from now on (`distribute.graph_optimizations`)."""
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": not enabled}
    )
    if not enabled:
        log.info("graph optimisations (Grappler) off")


def synchronise_batchnorm(requested: bool) -> bool:
    """Whether models built now should synchronise BatchNorm: when asked
    (`distribute.sync_batchnorm`) and the current strategy has more than
    one replica. Synchronising one replica changes nothing but replaces
    the fused BatchNorm kernel with Keras' op-by-op layer and a
    cross-replica call per BatchNorm."""
    return requested and tf.distribute.get_strategy().num_replicas_in_sync > 1


def create_strategy(
    config: DistributeConfig | None = None,
) -> tf.distribute.Strategy:
    """The strategy for `config` (see the module docstring).

    Args:
        config: the `distribute` section; None uses the defaults.

    Returns:
        A `MultiWorkerMirroredStrategy` or a `MirroredStrategy`.

    Raises:
        ValueError: bad devices or `TF_CONFIG`.
    """
    config = config or DistributeConfig()
    set_graph_optimizations(config.graph_optimizations)
    if wants_multi_worker(config):
        # No logical-device listing here: it would initialise TensorFlow's
        # context, after which collectives can no longer be configured.
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus and config.devices not in (None, 1):
            log.warning(
                "distribute.devices = %r is ignored across workers: a "
                "CPU-only MultiWorkerMirroredStrategy worker has one replica",
                config.devices,
            )
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.AUTO
            if gpus
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation
            )
        )
        resolver = strategy.cluster_resolver
        log.info(
            "MultiWorkerMirroredStrategy: task %s:%s of %d workers, %d "
            "replicas in sync",
            resolver.task_type,
            resolver.task_id,
            cluster_size(tf_config()),
            strategy.num_replicas_in_sync,
        )
        return strategy
    devices = resolve_devices(config.devices)
    strategy = tf.distribute.MirroredStrategy(devices)
    log.info(
        "MirroredStrategy over %d device(s): %s",
        len(devices),
        ", ".join(devices),
    )
    return strategy


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True for a `MultiWorkerMirroredStrategy` spanning several workers."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return False
    spec = resolver.cluster_spec().as_dict()
    return sum(len(spec.get(job, [])) for job in ("chief", "worker")) > 1


def task_id(strategy: tf.distribute.Strategy) -> tuple[str | None, int]:
    """`(task type, task id)` of this process (`(None, 0)` on one host)."""
    if not is_multi_worker(strategy):
        return None, 0
    resolver = strategy.cluster_resolver
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the shared outputs (logs, artifacts).

    The chief is the `chief` task if the cluster has one, else worker 0.
    """
    if not is_multi_worker(strategy):
        return True
    task_type, index = task_id(strategy)
    if task_type == "chief":
        return True
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and index == 0 and "chief" not in spec
