"""MLflow model registry: registration, idempotence, promotion by aliases,
the decision record, loading back, the CLI exit codes, and (slow) the same
through a real `mlflow server` over HTTP and with the tiny NPPNet."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from nppnet_tf.config import (
    ConfigError,
    RegistryConfig,
    RunConfig,
    RunSection,
    TrackingConfig,
    config_from_dict,
)
from nppnet_tf.search.genotype import Genotype
from pipeline.cli import main
from pipeline.promotion import decision_log_path, promote
from pipeline.registry import (
    check_metrics,
    download_model,
    read_data_fingerprint,
    read_saved_model_fingerprint,
    register_model,
    registered_aliases,
    registry_client,
    selection_metrics,
)
from pipeline.runner import EXIT_PROMOTION_REFUSED
from pipeline.tracking import Tracker

GENOTYPE = (
    Path(__file__).resolve().parents[2] / "configs/genotypes/nppnet_lip.json"
)
NAME = "nppnet-lip"


class _Scale(tf.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = tf.Variable(scale)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        return {"scaled": x * self.scale}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A small Keras model, five SavedModels with different weights and a
    records manifest, shared by the tests (each test has its own store)."""
    root = tmp_path_factory.mktemp("registry_artifacts")
    keras.utils.set_random_seed(0)
    images = keras.Input((16, 16, 3), name="images")
    features = keras.layers.Conv2D(4, 3, padding="same")(images)
    model = keras.Model(
        images,
        {
            "parsing": keras.layers.Conv2D(20, 1)(features),
            "pose": keras.layers.Conv2D(16, 1)(features),
        },
    )
    model.save(root / "model.keras")
    saved_models = []
    for scale in (1.0, 2.0, 3.0, 4.0, 5.0):
        module = _Scale(scale)
        path = root / f"saved_model_{int(scale)}"
        tf.saved_model.save(module, str(path), signatures=module.__call__)
        saved_models.append(path)
    records = root / "records"
    records.mkdir()
    (records / "manifest.json").write_text(
        json.dumps({"input_fingerprint": "0123abcd", "counts": {"val": 3}})
    )
    return {
        "model": model,
        "keras": root / "model.keras",
        "saved_models": saved_models,
        "records": records,
    }


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An initialised, empty sqlite store: creating the tables takes
    seconds, copying the file does not."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("registry_store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store):
    """This test's own sqlite store, `<tmp_path>/mlflow.db`."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def make_config(tmp_path, uri=None, **registry) -> RunConfig:
    return RunConfig(
        run=RunSection(work_dir=str(tmp_path / "work")),
        tracking=TrackingConfig(uri=uri or f"sqlite:///{tmp_path}/mlflow.db"),
        registry=RegistryConfig(**registry),
    )


def register(config, artifacts, index, miou, pckh, **kwargs):
    with Tracker(config).run("register") as logger:
        return register_model(
            logger,
            artifacts["keras"],
            artifacts["saved_models"][index],
            GENOTYPE,
            {"val_miou": miou, "val_pckh": pckh, "val_pixel_accuracy": 80.0},
            config=config,
            **kwargs,
        )


def test_registration_logs_tags_and_candidate_alias(tmp_path, artifacts, store):
    config = make_config(tmp_path)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"split": "val", "miou": 40.5, "pckh": 61.25}))
    data = read_data_fingerprint(artifacts["records"])
    result = register(
        config, artifacts, 0, 40.5, 61.25, report_path=report,
        data_fingerprint=data,
    )  # fmt: skip
    assert (result.version, result.created) == ("1", True)
    assert result.model_uri == f"models:/{NAME}/1"
    client = registry_client(config)
    version = client.get_model_version(NAME, "1")
    fingerprint = tf.saved_model.experimental.read_fingerprint(
        str(artifacts["saved_models"][0])
    )
    # A plain SavedModel (no export metadata): TensorFlow's singleprint.
    assert version.tags["saved_model_fingerprint"] == fingerprint.singleprint()
    assert version.tags == {
        "genotype_sha256": Genotype.load(GENOTYPE).fingerprint(),
        "data_fingerprint": "0123abcd",
        "saved_model_fingerprint": read_saved_model_fingerprint(
            artifacts["saved_models"][0]
        ).singleprint,
        "saved_model_checksum": str(fingerprint.saved_model_checksum),
        "val_miou": "40.5",
        "val_pckh": "61.25",
        "run_id": result.run_id,
    }
    assert version.run_id == result.run_id
    registered = client.get_registered_model(NAME)
    assert registered_aliases(client, NAME) == {"candidate": "1"}
    assert "saved_model/" in registered.description
    run = client.get_run(result.run_id)
    assert run.info.run_name == "register"
    assert run.data.metrics == {
        "val_miou": 40.5,
        "val_pckh": 61.25,
        "val_pixel_accuracy": 80.0,
    }
    assert run.data.tags["registry.model_version"] == f"{NAME}/1"
    assert run.data.tags["registry.created"] == "true"
    run_files = {f.path for f in client.list_artifacts(result.run_id)}
    assert {"genotype.json", "evaluation"} <= run_files
    assert [
        f.path for f in client.list_artifacts(result.run_id, "evaluation")
    ] == ["evaluation/report.json"]
    # The logged Keras model is linked to the run (MLflow 3 logged models).
    assert [o.model_id for o in run.outputs.model_outputs] == [
        version.source.removeprefix("models:/")
    ]


def test_same_saved_model_is_a_no_op_and_a_new_one_a_version(
    tmp_path, artifacts, store
):
    config = make_config(tmp_path)
    first = register(config, artifacts, 0, 40.0, 60.0)
    again = register(config, artifacts, 0, 40.0, 60.0)
    assert (again.version, again.created) == ("1", False)
    assert "already version 1" in again.reason
    client = registry_client(config)
    assert [
        v.version for v in client.search_model_versions(f"name='{NAME}'")
    ] == [1]
    # A no-op logs no second model into its run.
    assert client.get_run(again.run_id).outputs.model_outputs == []
    assert client.get_run(again.run_id).data.tags["registry.created"] == "false"

    second = register(config, artifacts, 1, 41.0, 61.0)
    assert (second.version, second.created) == ("2", True)
    assert registered_aliases(client, NAME) == {"candidate": "2"}
    # Registering version 1's SavedModel again makes it the candidate again.
    back = register(config, artifacts, 0, 40.0, 60.0)
    assert (back.version, back.created) == ("1", False)
    assert "candidate moved from version 2" in back.reason
    assert registered_aliases(client, NAME) == {"candidate": "1"}
    assert first.run_id != again.run_id


def test_promotion_rule_margins_and_decision_record(tmp_path, artifacts, store):
    config = make_config(tmp_path, miou_margin=0.5, pckh_margin=0.0)
    client = registry_client(config)
    register(config, artifacts, 0, 40.0, 60.0)
    first = promote(client, config)
    assert (first.outcome, first.promoted) == ("promoted", True)
    assert first.champion_version_before is None
    assert "no champion" in first.reason
    assert registered_aliases(client, NAME) == {
        "candidate": "1",
        "champion": "1",
    }
    same = promote(client, config)
    assert (same.outcome, same.promoted) == ("unchanged", False)

    # Better on PCKh, worse on mIoU: refused, and says on which metric.
    register(config, artifacts, 1, 39.0, 65.0)
    worse = promote(client, config)
    assert (worse.outcome, worse.promoted) == ("refused", False)
    assert worse.reason.startswith(
        "version 2 does not beat champion version 1 on val mIoU:"
    )
    assert "val mIoU 39.00 vs 40.00 (-1.00, needs > +0.50)" in worse.reason
    assert worse.champion_version_after == "1"
    # mIoU better by exactly the margin is not enough (strict).
    register(config, artifacts, 2, 40.5, 61.0)
    assert promote(client, config).outcome == "refused"
    # A tie on PCKh is not enough either.
    register(config, artifacts, 3, 41.0, 60.0)
    tie = promote(client, config)
    assert tie.outcome == "refused" and "on val PCKh" in tie.reason
    assert registered_aliases(client, NAME)["champion"] == "1"
    # Better than both margins: promoted.
    register(config, artifacts, 4, 40.6, 60.1)
    better = promote(client, config)
    assert (better.outcome, better.champion_version_before) == ("promoted", "1")
    assert registered_aliases(client, NAME) == {
        "candidate": "5",
        "champion": "5",
    }
    # Recorded either way: version tags and one log line per decision.
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion_decision"] == "refused"
    assert tags["promotion_reason"] == worse.reason
    assert tags["decided_at"] == worse.decided_at
    assert client.get_model_version(NAME, "5").tags["promotion_decision"] == (
        "promoted"
    )
    lines = decision_log_path(config).read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [(d["candidate_version"], d["outcome"]) for d in logged] == [
        ("1", "promoted"),
        ("1", "unchanged"),
        ("2", "refused"),
        ("3", "refused"),
        ("4", "refused"),
        ("5", "promoted"),
    ]
    assert logged[2] == worse.to_dict()
    assert logged[2]["champion_metrics"] == {"val_miou": 40.0, "val_pckh": 60.0}


def test_promote_a_given_version_and_errors(tmp_path, artifacts, store):
    config = make_config(tmp_path)
    client = registry_client(config)
    with pytest.raises(ValueError, match="no such registered model"):
        promote(client, config)
    register(config, artifacts, 0, 40.0, 60.0)
    register(config, artifacts, 1, 30.0, 50.0)
    # The older, better version 1 can be promoted by number.
    assert promote(client, config, version=1).outcome == "promoted"
    assert promote(client, config).outcome == "refused"
    with pytest.raises(ValueError, match="no such version"):
        promote(client, config, version=7)
    # A version without metric tags (registered by hand) is refused.
    client.delete_model_version_tag(NAME, "2", "val_pckh")
    decision = promote(client, config, version=2)
    assert decision.outcome == "refused"
    assert "no valid val_pckh tag" in decision.reason


def test_champion_loads_back_and_downloads_the_saved_model(
    tmp_path, artifacts, store
):
    import mlflow.keras

    config = make_config(tmp_path)
    register(config, artifacts, 2, 40.0, 60.0)
    promote(registry_client(config), config)
    images = np.random.default_rng(0).random((2, 16, 16, 3), "float32")
    expected = artifacts["model"].predict(images, verbose=0)
    loaded = mlflow.keras.load_model(f"models:/{NAME}@champion")
    actual = loaded.predict(images, verbose=0)
    for key in ("parsing", "pose"):
        np.testing.assert_array_equal(actual[key], expected[key])

    root = download_model(f"models:/{NAME}@champion", tmp_path / "dl", config)
    assert (root / "MLmodel").is_file()
    assert (root / "data" / "model.keras").is_file()
    assert json.loads((root / "genotype.json").read_text()) == json.loads(
        GENOTYPE.read_text()
    )
    assert read_saved_model_fingerprint(
        root / "saved_model"
    ) == read_saved_model_fingerprint(artifacts["saved_models"][2])
    served = tf.saved_model.load(str(root / "saved_model"))
    x = tf.ones((1, 4))
    np.testing.assert_array_equal(
        served.signatures["serving_default"](x=x)["scaled"], 3 * x
    )


def test_cli_register_and_promote_exit_codes(
    tmp_path, artifacts, store, capsys
):
    config_file = tmp_path / "registry.yaml"
    config_file.write_text(
        f"run: {{work_dir: {tmp_path / 'work'}}}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n"
        "registry: {model_name: nppnet-cli, miou_margin: 0.0}\n"
    )
    common = ["--config", str(config_file)]

    def cli_register(index, report):
        path = tmp_path / f"report_{index}.json"
        path.write_text(json.dumps(report))
        return main(
            ["register", *common, "--model", str(artifacts["keras"])]
            + ["--saved-model", str(artifacts["saved_models"][index])]
            + ["--genotype", str(GENOTYPE), "--metrics", str(path)]
            + ["--records", str(artifacts["records"])]
        )

    evaluate_report = {
        "split": "val",
        "units": "percent",
        "parsing": {"mean_iou": 45.0, "pixel_accuracy": 85.0},
        "pose": {"average": 70.0, "upper_body": 72.0},
    }
    assert cli_register(0, evaluate_report) == 0
    assert "models:/nppnet-cli/1 (new)" in capsys.readouterr().out
    assert main(["promote", *common]) == 0
    assert capsys.readouterr().out.startswith("promoted: version 1 becomes")

    worse = {
        **evaluate_report,
        "parsing": {"mean_iou": 46.0},
        "pose": {"average": 69.0},
    }
    assert cli_register(1, worse) == 0
    assert main(["promote", *common]) == EXIT_PROMOTION_REFUSED
    out = capsys.readouterr().out
    assert (
        "refused: version 2 does not beat champion version 1 on val PCKh"
        in (out)
    )
    assert "champion: 1 -> 1 (nppnet-cli)" in out
    # Bad input: a train-split report is a usage error (exit 2).
    assert cli_register(2, {**evaluate_report, "split": "train"}) == 2
    client = registry_client(make_config(tmp_path, model_name="nppnet-cli"))
    version = client.get_model_version("nppnet-cli", "2")
    assert version.tags["val_pckh"] == "69.0"
    assert version.tags["data_fingerprint"] == "0123abcd"
    assert version.tags["promotion_decision"] == "refused"
    assert len(client.search_model_versions("name='nppnet-cli'")) == 2
    assert main(["promote", *common, "--version", "9"]) == 2


@pytest.mark.parametrize(
    "report, expected",
    [
        (
            {
                "split": "val",
                "units": "percent",
                "parsing": {"mean_iou": 41.0, "mean_accuracy": 50.0},
                "pose": {"average": 62.5, "upper_body": float("nan")},
            },
            {"val_miou": 41.0, "val_pckh": 62.5, "val_mean_accuracy": 50.0},
        ),
        (
            {"miou": 41, "pckh": 62.5, "pixel_accuracy": 88.0},
            {"val_miou": 41.0, "val_pckh": 62.5, "val_pixel_accuracy": 88.0},
        ),
        (
            {"val_miou": 1.0, "val_pckh": 2.0},
            {"val_miou": 1.0, "val_pckh": 2.0},
        ),
    ],
)
def test_selection_metrics(report, expected):
    # NaN extras (undefined scores) are left out, not logged.
    assert selection_metrics(report) == expected


@pytest.mark.parametrize(
    "report, message",
    [
        ({"split": "train", "miou": 1.0, "pckh": 1.0}, "split 'train'"),
        ({"units": "fraction", "miou": 0.4, "pckh": 0.6}, "units 'fraction'"),
        ({"parsing": {"mean_iou": 40.0}, "pose": {}}, "no val_pckh"),
        ({"accuracy": 1.0}, "found keys accuracy"),
        ({"miou": float("nan"), "pckh": 60.0}, "val_miou = nan"),
        ({"miou": 140.0, "pckh": 60.0}, r"\[0, 100\] percent"),
    ],
)
def test_selection_metrics_rejects(report, message):
    with pytest.raises(ValueError, match=message):
        selection_metrics(report, "report.json")


def test_check_metrics_rejects_non_numbers():
    with pytest.raises(ValueError, match="metrics: val_pckh is missing"):
        check_metrics({"val_miou": 1.0})
    with pytest.raises(ValueError, match="loss = 'x' is not a number"):
        check_metrics({"val_miou": 1.0, "val_pckh": 1.0, "loss": "x"})


@pytest.mark.parametrize(
    "registry, message",
    [
        ({"model_name": "team/nppnet"}, "registry.model_name"),
        ({"model_name": "nppnet'lip"}, "registry.model_name"),
        ({"model_name": " "}, "registry.model_name"),
        ({"candidate_alias": "latest"}, "registry.candidate_alias"),
        ({"champion_alias": "v2"}, "registry.champion_alias"),
        ({"champion_alias": "my alias"}, "registry.champion_alias"),
        ({"champion_alias": "candidate"}, "must differ"),
        ({"miou_margin": -0.5}, "registry.miou_margin"),
        ({"pckh_margin": 100}, "registry.pckh_margin"),
    ],
)
def test_registry_config_range_checks(registry, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"registry": registry}, "test.yaml")


def test_register_needs_the_active_run_and_a_fingerprinted_saved_model(
    tmp_path, artifacts, store
):
    config = make_config(tmp_path)
    tracker = Tracker(config)
    with tracker.run("register") as logger:
        run_id = logger.run_id
    arguments = (
        artifacts["keras"],
        artifacts["saved_models"][0],
        GENOTYPE,
        {"val_miou": 1.0, "val_pckh": 1.0},
    )
    with pytest.raises(ValueError, match=f"run {run_id} is not the active"):
        register_model(run_id, *arguments, config=config)
    disabled = make_config(tmp_path)
    disabled = RunConfig(
        run=disabled.run, tracking=TrackingConfig(enabled=False)
    )
    with Tracker(disabled).run("register") as null_logger:
        with pytest.raises(ValueError, match="tracking.enabled is false"):
            register_model(null_logger, *arguments, config=disabled)

    copy = tmp_path / "no_fingerprint"
    copy.mkdir()
    (copy / "saved_model.pb").write_bytes(
        (artifacts["saved_models"][0] / "saved_model.pb").read_bytes()
    )
    with pytest.raises(ValueError, match="no fingerprint.pb"):
        read_saved_model_fingerprint(copy)
    with pytest.raises(FileNotFoundError, match="no saved_model.pb"):
        read_saved_model_fingerprint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no readable manifest"):
        read_data_fingerprint(tmp_path)
    # Nothing was registered by the failed calls.
    assert registry_client(config).search_registered_models() == []


# ---------------------------------------------------------------------------
# Slow: a real tracking server over HTTP, and the tiny NPPNet.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on loopback with a sqlite store and proxied
    artifacts; yields its URL and stops the server's process group."""
    port = _free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log_file = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(mlflow_cli), "server"]
        + ["--backend-store-uri", f"sqlite:///{tmp_path}/server.db"]
        + ["--artifacts-destination", str(tmp_path / "server_artifacts")]
        + ["--serve-artifacts", "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1"],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, stopped below
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log_file.flush()
                raise RuntimeError(
                    "mlflow server did not start:\n"
                    + (tmp_path / "server.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log_file.close()


@pytest.mark.slow
def test_registration_and_promotion_through_a_tracking_server(
    tmp_path, artifacts, mlflow_server
):
    config = make_config(tmp_path, uri=mlflow_server)
    first = register(config, artifacts, 0, 40.0, 60.0)
    again = register(config, artifacts, 0, 40.0, 60.0)
    assert (first.version, first.created) == ("1", True)
    assert (again.version, again.created) == ("1", False)
    client = registry_client(config)
    assert client.tracking_uri == mlflow_server
    assert promote(client, config).outcome == "promoted"
    register(config, artifacts, 1, 39.0, 61.0)
    assert promote(client, config).outcome == "refused"
    assert registered_aliases(client, NAME) == {
        "candidate": "2",
        "champion": "1",
    }
    root = download_model(f"models:/{NAME}@champion", tmp_path / "dl", config)
    assert read_saved_model_fingerprint(
        root / "saved_model"
    ) == read_saved_model_fingerprint(artifacts["saved_models"][0])
    # The artifacts went through the server, not to a local path.
    assert any((tmp_path / "server_artifacts").rglob("saved_model.pb"))
    assert not (tmp_path / "work" / "mlartifacts").exists()


@pytest.mark.slow
def test_tiny_nppnet_round_trip(tmp_path, artifacts, store):
    """The tiny NPPNet (init_channels 8, 4 cells, 64 x 64) registers and
    loads back from the champion alias with equal outputs."""
    import mlflow.keras

    from nppnet_tf.models.nppnet import NPPNet

    keras.utils.set_random_seed(0)
    model = NPPNet(Genotype.load(GENOTYPE), init_channels=8, num_cells=4)
    images = np.random.default_rng(0).random((1, 64, 64, 3), "float32")
    expected = model(images, training=False)
    model.save(tmp_path / "nppnet.keras")
    config = make_config(tmp_path)
    genotype = Genotype.load(GENOTYPE)
    other = genotype.replace(
        pose_decoder=genotype.pose_decoder[1::-1] + genotype.pose_decoder[2:]
    )
    other.save(tmp_path / "other.json")
    with Tracker(config).run("register") as logger:
        with pytest.raises(ValueError, match="was built from genotype"):
            register_model(
                logger,
                tmp_path / "nppnet.keras",
                artifacts["saved_models"][0],
                tmp_path / "other.json",
                {"val_miou": 10.0, "val_pckh": 20.0},
                config=config,
            )
        register_model(
            logger,
            tmp_path / "nppnet.keras",
            artifacts["saved_models"][0],
            GENOTYPE,
            {"val_miou": 10.0, "val_pckh": 20.0},
            config=config,
        )
    promote(registry_client(config), config)
    loaded = mlflow.keras.load_model(f"models:/{NAME}@champion")
    actual = loaded(images, training=False)
    for key in ("parsing", "pose"):
        np.testing.assert_allclose(actual[key], expected[key], atol=1e-6)


def test_the_fingerprint_covers_the_serving_options(tmp_path, artifacts):
    """TensorFlow's singleprint ignores the code inside the signature
    functions (a flip-on and a flip-off export of one model share it): the
    export metadata's image size and flip flag are folded in."""
    import shutil

    plain = read_saved_model_fingerprint(artifacts["saved_models"][0])
    fingerprints = []
    for flip in (True, False, True):
        copy = tmp_path / f"export_{len(fingerprints)}"
        shutil.copytree(artifacts["saved_models"][0], copy)
        (copy / "assets.extra").mkdir(exist_ok=True)
        (copy / "assets.extra" / "export_metadata.json").write_text(
            json.dumps({"image_size": 64, "flip": flip, "version": 7})
        )
        fingerprints.append(read_saved_model_fingerprint(copy).singleprint)
    assert fingerprints[0].startswith(plain.singleprint + "+serving:")
    assert fingerprints[0] != fingerprints[1]  # flip differs
    assert fingerprints[0] == fingerprints[2]  # other metadata ignored
