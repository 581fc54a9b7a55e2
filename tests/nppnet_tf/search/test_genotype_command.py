"""`nppnet genotype derive|draw|show` through `pipeline.cli.main`."""

import json
import logging
import re
from pathlib import Path

import numpy as np

from nppnet_tf.search.architecture_file import save_architecture
from nppnet_tf.search.genotype import (
    ALL_FIELDS,
    CELL_FIELDS,
    SEARCHED_BY_INTERACTION,
    Genotype,
)
from pipeline.cli import main

AUTHORS = str(
    Path(__file__).resolve().parents[3] / "configs/genotypes/nppnet_lip.json"
)


def _subset(arrays, fields):
    return {k: v for k, v in arrays.items() if k.split("/")[0] in fields}


def test_derive_interaction_file_with_stored_base(
    tmp_path, authors_arrays, authors_genotype, capsys
):
    npz = save_architecture(
        tmp_path / "architecture.npz",
        _subset(authors_arrays, SEARCHED_BY_INTERACTION),
        base_genotype=authors_genotype.cells_only(),
    )
    out = tmp_path / "derived" / "genotype.json"
    assert main(["genotype", "derive", str(npz), "--out", str(out)]) == 0
    assert Genotype.load(out) == authors_genotype
    printed = capsys.readouterr().out
    assert (
        f"{out} (complete, sha256 {authors_genotype.fingerprint()[:12]})"
        in printed
    )


def test_derive_with_base_and_pruning_options(
    tmp_path, authors_arrays, authors_genotype
):
    npz = save_architecture(
        tmp_path / "architecture.npz",
        _subset(authors_arrays, SEARCHED_BY_INTERACTION),
    )
    base = authors_genotype.cells_only().save(tmp_path / "base.json")
    out = tmp_path / "genotype.json"
    argv = ["genotype", "derive", str(npz), "--base", str(base)]
    assert main(argv + ["--threshold", "0.2", "--out", str(out)]) == 0
    derived = Genotype.load(out)
    assert derived.is_complete
    assert derived.decoder_parsing_to_pose == tuple(
        target[:1] for target in authors_genotype.decoder_parsing_to_pose
    )
    assert main(argv + ["--max-edges", "1", "--out", str(out)]) == 0
    assert Genotype.load(out) == derived


def test_derive_encoder_decoder_file_gives_a_partial_genotype(
    tmp_path, authors_arrays, authors_genotype
):
    npz = save_architecture(
        tmp_path / "architecture.npz", _subset(authors_arrays, CELL_FIELDS)
    )
    out = tmp_path / "genotype.json"
    assert main(["genotype", "derive", str(npz), "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())) == set(CELL_FIELDS) | {"format"}
    assert Genotype.load(out) == authors_genotype.cells_only()


def test_derive_errors_are_one_line(tmp_path, authors_arrays, caplog):
    caplog.set_level(logging.ERROR)
    out = str(tmp_path / "genotype.json")
    missing = tmp_path / "missing.npz"
    assert main(["genotype", "derive", str(missing), "--out", out]) == 2
    assert f"architecture file {missing} does not exist" in caplog.text

    caplog.clear()
    npz = tmp_path / "architecture.npz"
    np.savez(
        npz, **{"format": np.array("nppnet-architecture/1"), "x": np.zeros(2)}
    )
    assert main(["genotype", "derive", str(npz), "--out", out]) == 2
    assert f"{npz}: unknown key 'x'" in caplog.text

    caplog.clear()
    save_architecture(npz, _subset(authors_arrays, ["pose_fusion"]))
    assert main(["genotype", "derive", str(npz), "--out", out]) == 2
    assert "pass a base genotype" in caplog.text

    caplog.clear()
    assert (
        main(
            [
                "genotype",
                "derive",
                str(npz),
                "--base",
                AUTHORS,
                "--threshold",
                "0",
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "threshold must be a number > 0, got 0.0" in caplog.text
    assert not (tmp_path / "genotype.json").exists()


def test_draw_writes_svg_and_png(tmp_path, capsys):
    out = tmp_path / "drawings"
    assert main(["genotype", "draw", AUTHORS, "--out", str(out)]) == 0
    for field in ALL_FIELDS:
        for suffix in ("svg", "png"):
            path = out / f"{field}.{suffix}"
            assert path.is_file() and path.stat().st_size > 0, path
    assert len(list(out.iterdir())) == 24
    assert str(out / "pose_fusion.png") in capsys.readouterr().out


def test_show_prints_a_table(capsys, tmp_path, caplog):
    assert main(["genotype", "show", AUTHORS]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{AUTHORS}: complete genotype, sha256 ")
    assert re.search(r"pose stage 3 +std_conv_1x1 +2  parsing stage 2\n", text)

    bad = tmp_path / "bad.json"
    data = json.loads(open(AUTHORS).read())
    data["pose_fusion"][0] = ["conv_9x9", 1]
    bad.write_text(json.dumps(data))
    caplog.set_level(logging.ERROR)
    assert main(["genotype", "show", str(bad)]) == 2
    assert f"{bad}: pose_fusion[0]: unknown op 'conv_9x9'" in caplog.text
