"""Config loading: typed values, and errors that name the key, value and file."""

from pathlib import Path

import pytest

from nppnet_tf.config import ConfigError, RunConfig, load_config, section_hash

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo.yaml", "lip.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert isinstance(config, RunConfig)


def test_paper_settings_in_lip_yaml():
    config = load_config(REPO / "configs" / "lip.yaml")
    assert config.data.image_size == 384
    assert config.data.sigma == 7.0 and config.data.aux_sigma == 14.0
    assert config.loss.ohem_min_kept == 4 * 131072  # per GPU x 4 GPUs


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_override_replaces_one_key(tmp_path):
    path = write(tmp_path, "data: {image_size: 64}\n")
    config = load_config(path, ["data.image_size=256", "synth.seed=3"])
    assert config.data.image_size == 256
    assert config.synth.seed == 3
    assert config.data.sigma == 7.0  # untouched default


@pytest.mark.parametrize(
    "text, overrides, fragments",
    [
        (
            "data: {imagesize: 64}\n",
            [],
            ["unknown key data.imagesize", "image_size"],
        ),
        ("datta: {}\n", [], ["unknown key datta"]),
        (
            "data: {image_size: big}\n",
            [],
            ["data.image_size", "'big'", "integer"],
        ),
        (
            "data: {image_size: 100}\n",
            [],
            ["data.image_size = 100", "multiple of 32"],
        ),
        ("data: {sigma: -1}\n", [], ["data.sigma = -1", "> 0"]),
        (
            "data: {include_test: 1}\n",
            [],
            ["data.include_test = 1", "true or false"],
        ),
        (
            "beam: {pipeline_args: --runner=X}\n",
            [],
            ["beam.pipeline_args", "list"],
        ),
        ("data: 3\n", [], ["data = 3", "mapping"]),
        (
            "",
            ["data.image_size=33"],
            ["--set data.image_size=33", "multiple of 32"],
        ),
        ("", ["data.nope=1"], ["unknown key data.nope"]),
        ("", ["image_size"], ["expected section.key=value"]),
    ],
)
def test_errors_name_key_value_and_file(tmp_path, text, overrides, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_not_yaml(tmp_path):
    path = write(tmp_path, "data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_configs_are_frozen_and_hash_stably(tmp_path):
    config = load_config(write(tmp_path, "synth: {seed: 1}\n"))
    with pytest.raises(AttributeError):
        config.synth.seed = 2  # type: ignore[misc]
    same = load_config(write(tmp_path, "synth: {seed: 1}\n"))
    other = load_config(write(tmp_path, "synth: {seed: 2}\n"))
    assert section_hash(config.synth) == section_hash(same.synth)
    assert section_hash(config.synth) != section_hash(other.synth)
