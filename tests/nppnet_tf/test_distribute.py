"""Tests of strategy creation, and a 2-worker MultiWorkerMirroredStrategy
search on loopback."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf import distribute
from nppnet_tf.config import DistributeConfig

ROOT = Path(__file__).resolve().parents[2]


def _fresh_keys():
    # As the make_mirrored_strategy fixture: no collective-key collisions
    # with strategies made earlier in this process.
    tf.distribute.MirroredStrategy._collective_key_base += 100000


def test_devices_resolve_to_local_names():
    # tests/conftest.py split the CPU into two logical devices.
    assert distribute.resolve_devices(None) == [
        tf.config.list_logical_devices("CPU")[0].name
    ]
    assert len(distribute.resolve_devices(2)) == 2
    assert distribute.resolve_devices(["/cpu:1"]) == ["/cpu:1"]
    with pytest.raises(ValueError, match="not a local device"):
        distribute.resolve_devices(["/gpu:3"])
    with pytest.raises(RuntimeError, match="already initialised"):
        distribute.split_cpu(3)


def test_create_strategy_mirrors_over_the_configured_devices(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    _fresh_keys()
    strategy = distribute.create_strategy(DistributeConfig(devices=2))
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2
    assert distribute.is_chief(strategy)
    assert not distribute.is_multi_worker(strategy)
    _fresh_keys()
    single = distribute.create_strategy(DistributeConfig())
    assert single.num_replicas_in_sync == 1


def test_multi_worker_is_chosen_from_tf_config(monkeypatch):
    def cluster(workers, index=0):
        return json.dumps(
            {
                "cluster": {
                    "worker": [f"localhost:{1000 + i}" for i in range(workers)]
                },
                "task": {"type": "worker", "index": index},
            }
        )

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert not distribute.wants_multi_worker(DistributeConfig())
    with pytest.raises(ValueError, match="TF_CONFIG is not set"):
        distribute.wants_multi_worker(DistributeConfig(multi_worker=True))
    monkeypatch.setenv("TF_CONFIG", cluster(2))
    assert distribute.wants_multi_worker(DistributeConfig())
    assert not distribute.wants_multi_worker(
        DistributeConfig(multi_worker=False)
    )
    monkeypatch.setenv("TF_CONFIG", cluster(1))
    assert not distribute.wants_multi_worker(DistributeConfig())
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not JSON"):
        distribute.wants_multi_worker(DistributeConfig())
    monkeypatch.setenv("TF_CONFIG", '{"task": {}}')
    with pytest.raises(ValueError, match="'cluster'"):
        distribute.wants_multi_worker(DistributeConfig())


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


WORKER = """
import json, sys
import numpy as np
from nppnet_tf import distribute
from nppnet_tf.config import DistributeConfig

strategy = distribute.create_strategy(DistributeConfig(devices=1))
from nppnet_tf.search.genotype import Genotype
from nppnet_tf.search.loop import run_search
from tests.nppnet_tf.search.search_fixtures import tiny_config
from tests.nppnet_tf.search.toy_supernet import search_toy

records, out_dir, result_file = sys.argv[1:4]
models = []

def builder(stage, config, base):
    models.append(search_toy(stage, config, base))
    return models[-1]

config = tiny_config(epochs=2, warmup_epochs=1)
result = run_search(
    config, "interaction", records, out_dir,
    base_genotype=Genotype.load("configs/genotypes/nppnet_lip.json"),
    strategy=strategy, model_builder=builder,
)
arrays = {k: v for k, v in models[0].architecture_arrays().items() if not k.endswith("/ops")}
np.savez(result_file, **arrays)
print(json.dumps({"status": result.status, "step": result.global_step,
                  "chief": distribute.is_chief(strategy),
                  "replicas": strategy.num_replicas_in_sync,
                  "metrics": result.metrics}))
"""


@pytest.mark.slow
def test_two_workers_on_loopback_end_with_identical_architectures(
    tmp_path_factory,
):
    from tests.nppnet_tf.search.search_fixtures import search_records

    records, _ = search_records(tmp_path_factory)
    work = tmp_path_factory.mktemp("multi_worker")
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    processes = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
            "PYTHONPATH": str(ROOT),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    records,
                    str(work / "out"),
                    str(work / f"worker{index}.npz"),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    reports = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        assert process.returncode == 0, stderr[-3000:]
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [r["chief"] for r in reports] == [True, False]
    assert all(
        r["replicas"] == 2 and r["status"] == "completed" for r in reports
    )
    assert reports[0]["step"] == reports[1]["step"] == 8
    # Both workers validated the whole subset and agree.
    assert reports[0]["metrics"]["val/images"] == 4
    assert reports[0]["metrics"] == reports[1]["metrics"]
    first = np.load(work / "worker0.npz")
    second = np.load(work / "worker1.npz")
    assert sorted(first.files) == sorted(second.files)
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert np.abs(first["pose_fusion/alphas"] - 1e-3).max() > 1e-4  # searched
    # Only the chief wrote the outputs.
    out = work / "out"
    assert (out / "genotype.json").exists() and (
        out / "best_genotype.json"
    ).exists()
    assert tf.train.latest_checkpoint(str(out / "checkpoints")).endswith(
        "ckpt-8"
    )


def test_a_fresh_process_splits_the_cpu_for_two_replicas():
    """`distribute.devices: 2` on a CPU-only host, in a new process (the
    test process split its CPU already, in conftest): the split must come
    before anything lists logical devices."""
    code = (
        "from nppnet_tf.config import DistributeConfig\n"
        "from nppnet_tf.distribute import create_strategy\n"
        "s = create_strategy(DistributeConfig(devices=2))\n"
        "print('replicas', s.num_replicas_in_sync)\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "replicas 2" in result.stdout
