"""`--grappler` of `nppnet bench search` and `nppnet bench train`: the
variants it asks for and the off / on ratios (no TensorFlow work)."""

import pytest

from pipeline import allocator
from pipeline.bench import search, train
from pipeline.cli import build_parser


def _args(*argv):
    return build_parser().parse_args(["bench", *argv])


def test_search_runs_grappler_on_by_default():
    args = _args("search", "--xla", "off", "--replicas", "1")
    assert search.variants(args) == [
        {
            "xla": False,
            "replicas": 1,
            "shared_gradients": False,  # configs/lip.yaml
            "grappler": True,
            "allocator": allocator.active(),
            "supernet": "interaction",
        }
    ]


def test_search_times_the_encoder_decoder_supernet_on_request():
    args = _args(
        "search",
        "--xla",
        "off",
        "--replicas",
        "1",
        "--supernet",
        "encoder-decoder",
    )
    assert [v["supernet"] for v in search.variants(args)] == ["encoder-decoder"]


def test_search_shares_gradients_only_on_one_replica():
    args = _args(
        "search",
        "--xla",
        "off",
        "--replicas",
        "1",
        "2",
        "--shared-gradients",
        "both",
    )
    assert [
        (v["replicas"], v["shared_gradients"]) for v in search.variants(args)
    ] == [(1, False), (1, True), (2, False)]


def test_search_both_puts_the_pair_back_to_back():
    args = _args("search", "--grappler", "both", "--replicas", "1", "2")
    assert [
        (v["xla"], v["replicas"], v["grappler"]) for v in search.variants(args)
    ] == [
        (False, 1, False),
        (False, 1, True),
        (False, 2, False),
        (False, 2, True),
        (True, 1, False),
        (True, 1, True),
        (True, 2, False),
        (True, 2, True),
    ]


def test_train_grappler_off():
    args = _args(
        "train", "--precision", "float32", "--xla", "off", "--grappler", "off"
    )
    assert train.variants(args) == [
        {
            "precision": "float32",
            "xla": False,
            "replicas": r,
            "grappler": False,
            "allocator": allocator.active(),
        }
        for r in (1, 2)
    ]


def test_allocators_are_the_innermost_variants():
    args = _args(
        "train",
        "--precision",
        "float32",
        "--xla",
        "off",
        "--replicas",
        "1",
        "--allocators",
        "tensorflow",
        "tcmalloc",
    )
    assert [(v["grappler"], v["allocator"]) for v in train.variants(args)] == [
        (True, "tensorflow"),
        (True, "tcmalloc"),
    ]


def test_grappler_rejects_other_values():
    with pytest.raises(SystemExit):
        _args("search", "--grappler", "maybe")


def _result(grappler, replicas, first, median, status="ok"):
    return {
        "xla": False,
        "replicas": replicas,
        "shared_gradients": replicas == 1,
        "grappler": grappler,
        "status": status,
        "first_iteration_seconds": first,
        "seconds_per_iteration": median,
        "build_seconds": 2.0,
        "peak_rss_gib": 1.0,
        "load_average": [0.5, 0.5, 0.5],
    }


def test_ratios_pair_variants_that_differ_only_in_grappler():
    results = [
        _result(False, 1, 33.0, 0.7),
        _result(True, 1, 110.0, 0.7),
        _result(False, 2, 40.0, 1.0),
        _result(True, 2, 0.0, 0.0, status="timeout"),
    ]
    ratios = search.grappler_ratios(
        results,
        ("xla", "replicas", "shared_gradients"),
        "first_iteration_seconds",
        "seconds_per_iteration",
    )
    assert ratios == [
        {
            "xla": False,
            "replicas": 1,
            "shared_gradients": True,
            "first_off_over_on": 0.3,
            "median_off_over_on": 1.0,
        }
    ]
    table = search.markdown_table(results, ratios)
    assert "| off | 1 | 0.30 | 1.00 |" in table
    assert "| off | 2 | off | on | tensorflow | timeout" in table
