"""Test-session set-up shared by every test.

TensorFlow's CPU is split into two logical devices before anything else
touches TensorFlow, so that MirroredStrategy tests can run 1 and 2 replicas
in the same process. Single-device code is unaffected (it uses CPU:0).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0],
    [
        tf.config.LogicalDeviceConfiguration(),
        tf.config.LogicalDeviceConfiguration(),
    ],
)


@pytest.fixture
def make_mirrored_strategy():
    """Factory of MirroredStrategy objects whose collective keys do not
    collide with those of strategies made earlier in this process (as
    TensorFlow's own tests do): two strategies sharing keys abort an
    all_gather whose shapes differ ("Shape mismatch in the collective
    instance")."""

    def make(devices=None):
        tf.distribute.MirroredStrategy._collective_key_base += 100000
        return tf.distribute.MirroredStrategy(devices)

    return make
